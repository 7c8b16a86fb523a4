"""A command-line end of the link, driven by JSON lines (manual checks, tests, demos).

Run one side per terminal::

    python -m cdcca_ros.transport.peer cloud --certs DIR --connect tls/localhost:7447 \\
        --dir /tmp/cloud --devices robot1
    python -m cdcca_ros.transport.peer device --id robot1 --certs DIR \\
        --connect tls/localhost:7447 --dir /tmp/robot1

Commands on stdin, one JSON object per line::

    {"op": "send", "topic": "/t", "text": "hello"}              (device)
    {"op": "send", "device": "robot1", "topic": "/t", "hex": "00ff"}   (cloud)
    {"op": "send_many", "count": 100, "size": 2048, "interval_ms": 5, "label": "u"}
    {"op": "version", "device": "robot1", "text": "v2"}        (cloud)
    {"op": "stats"}     {"op": "quit"}

Events on stdout, one JSON object per line: ``ready``, ``sent`` (seqs), ``msg`` (seq, topic,
length, the first 40 bytes as text, SHA-256 prefix), ``version``, ``stats``, ``error``.
``send_many`` payloads start with ``<label>:<i>:`` so the other side can check order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from cdcca_ros.errors import CdccaError
from cdcca_ros.transport.config import SessionConfig
from cdcca_ros.transport.link import CloudLink, DeviceLink, LinkConfig, LinkMessage

_out_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Write one JSON event line to stdout."""
    with _out_lock:
        sys.stdout.write(json.dumps({'ev': event, **fields}) + '\n')
        sys.stdout.flush()


def make_payload(label: str, index: int, size: int) -> bytes:
    """A payload of ``size`` bytes (at least its prefix) starting with ``label:index:``."""
    head = f'{label}:{index}:'.encode()
    body = hashlib.sha256(head).digest() * (max(0, size - len(head)) // 32 + 1)
    return head + body[:max(0, size - len(head))]


def _on_msg(msg: LinkMessage) -> None:
    emit('msg', device=msg.device, seq=msg.seq, topic=msg.topic, len=len(msg.payload),
         text=msg.payload[:40].decode('utf-8', 'replace'),
         sha=hashlib.sha256(msg.payload).hexdigest()[:16],
         latency_ms=round((msg.received_ns - msg.created_ns) / 1e6, 3))


def _payload(cmd: dict[str, Any]) -> bytes:
    if 'hex' in cmd:
        return bytes.fromhex(cmd['hex'])
    return str(cmd.get('text', '')).encode()


def _send(link: DeviceLink | CloudLink, cmd: dict[str, Any], data: bytes) -> int:
    topic = cmd.get('topic', '/t')
    if isinstance(link, CloudLink):
        return link.send(cmd['device'], topic, data)
    return link.send(topic, data)


def _serve(link: DeviceLink | CloudLink) -> None:
    emit('ready')
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            op = cmd['op']
            if op == 'quit':
                break
            if op == 'stats':
                emit('stats', **link.stats())
            elif op == 'send':
                emit('sent', seqs=[_send(link, cmd, _payload(cmd))])
            elif op == 'send_many':
                seqs = []
                for i in range(int(cmd['count'])):
                    data = make_payload(cmd.get('label', 'm'), i, int(cmd.get('size', 64)))
                    seqs.append(_send(link, cmd, data))
                    if cmd.get('report_each'):
                        emit('sent', seqs=[seqs[-1]])
                    if cmd.get('interval_ms'):
                        time.sleep(cmd['interval_ms'] / 1000)
                emit('sent', seqs=seqs)
            elif op == 'version' and isinstance(link, CloudLink):
                emit('version_set', counter=link.announce_version(cmd['device'],
                                                                  _payload(cmd)))
            else:
                emit('error', message=f'unknown op {op!r}')
        except (CdccaError, KeyError, ValueError, TypeError) as err:
            emit('error', message=f'{type(err).__name__}: {err}')


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.transport.peer')
    parser.add_argument('role', choices=('device', 'cloud'))
    parser.add_argument('--id', default='cloud', help='device id, or the cloud cert name')
    parser.add_argument('--certs', required=True)
    parser.add_argument('--connect', nargs='+', required=True)
    parser.add_argument('--dir', required=True, help='spool / store folder')
    parser.add_argument('--devices', nargs='*', default=[], help='cloud: devices served')
    parser.add_argument('--prefix', default='cdcca')
    parser.add_argument('--chunk-size', type=int, default=1 << 20)
    parser.add_argument('--max-payload', type=int, default=64 << 20)
    parser.add_argument('--spool-max-bytes', type=int, default=512 << 20)
    parser.add_argument('--ack-timeout', type=float, default=3.0)
    parser.add_argument('--retry-init-ms', type=int, default=250)
    parser.add_argument('--retry-max-ms', type=int, default=4000)
    parser.add_argument('--open-timeout-ms', type=int, default=3000)
    parser.add_argument('--record', default=None, help='cloud: MCAP file to record into')
    parser.add_argument('-v', '--verbose', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format='%(asctime)s %(name)s %(message)s')
    try:
        config = LinkConfig(
            SessionConfig(args.connect, args.certs, args.id, retry_init_ms=args.retry_init_ms,
                          retry_max_ms=args.retry_max_ms, open_timeout_ms=args.open_timeout_ms),
            prefix=args.prefix, chunk_size=args.chunk_size, max_payload_bytes=args.max_payload,
            spool_max_bytes=args.spool_max_bytes, ack_timeout_s=args.ack_timeout)
        recorder = None
        if args.role == 'cloud':
            if args.record:
                from cdcca_ros.transport.recording import McapRecorder

                recorder = McapRecorder(args.record)
            link: DeviceLink | CloudLink = CloudLink(config, args.dir, _on_msg, args.devices,
                                                     recorder=recorder)
        else:
            link = DeviceLink(args.id, config, args.dir, _on_msg,
                              lambda p: emit('version', text=p.decode('utf-8', 'replace')))
    except CdccaError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    try:
        _serve(link)
    finally:
        link.close()
        if recorder is not None:
            recorder.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
