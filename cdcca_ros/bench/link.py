"""The link vs plain DDS (issue 6): latency and throughput of uplink ``UtsTokens`` by size.

Messages are serialized ``UtsTokens`` (CDR, what ``cloud_bridge_node`` puts on the link) shaped
like UTS output of a real BLIP-2 (EVA ViT-g/14 at 224 px: 257 tokens of 1408 channels): a few
kept tokens (~2, ~8, ~32 KB), the device's UTS defaults (``uts.keep_ratio``,
``uts.pack_dtype``: the reference size of the summary), ~256 KB, and every token in fp16 (what
the official code sends, ~0.72 MB).

Two paths, both between two processes on this machine:

* **link**: ``DeviceLink`` in the bench's process -> a router process
  (``python -m cdcca_ros.transport.router``, mutual TLS, access control) -> ``CloudLink`` in
  the receiving process, configured as ``cloud_bridge_node`` configures it (its parameter
  table's defaults). The sender serializes with ``rclpy.serialization``, the receiver
  deserializes back to ``UtsTokens`` before taking its time.
* **DDS**: an rclpy publisher in the bench's process -> an rclpy subscription in the same
  receiving process; reliable, keep-all (nothing dropped in bursts, like the link), a
  domain id of its own, localhost-only discovery, the environment's RMW.

Latency is one-way, application to application: the sender writes its wall clock into the
message's ``header.stamp`` just before serializing/publishing, the receiver compares with its
own clock once it holds the message (same machine, same clock). One message in flight at a
time; the two paths alternate sample by sample (alternating which goes first). Throughput:
bursts of back-to-back messages, time from the first send to the last receipt; the paths
alternate burst by burst. Ratios are link / DDS: above 1 the link is slower in latency, below
1 it moves fewer messages per second.

Run as a module (``python -m cdcca_ros.bench.link --certs ...``) it is the receiving process;
the bench starts it. The bench itself: ``python -m cdcca_ros.bench link --out FILE.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    describe_ms,
    device_uts_config,
    median,
    ratio,
)
from cdcca_ros.errors import CdccaError, ConfigError

NAME = 'link'
DESCRIPTION = ('uplink UtsTokens over the mutual-TLS Zenoh link (DeviceLink -> router -> '
               'CloudLink) vs plain DDS between two processes: latency and throughput by size')
# No bound was set for these figures (issue 6 asks for the measurement); the summary holds them.
TARGETS: tuple[Target, ...] = ()

# A real BLIP-2's vision tokens: EVA ViT-g/14 at 224 px = 16x16 patches + CLS, 1408 channels.
BLIP2_TOKENS = 257
BLIP2_DIM = 1408
BLIP2_GRID = (16, 16)
PACK_DTYPES = ('fp16', 'int8', 'int4', 'ecq')  # as cdcca_ros.core.uts (which imports torch)
DEVICE = 'robot1'
CLOUD = 'cloud'
TOPIC = 'uts_tokens'  # the bridge's link topic; the DDS path uses the same name
REFERENCE = 'uts'
PATHS = ('link', 'dds')
BURST_BYTES = 32 << 20  # bytes per throughput burst (message count clamped below)
READY_TIMEOUT_S = 30.0
SAMPLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SizeCase:
    """One message shape: ``kept`` BLIP-2 tokens packed as ``dtype``.

    Attributes:
        name: Row label.
        kept: Tokens in the message, in ``[1, BLIP2_TOKENS]``.
        dtype: One of :data:`PACK_DTYPES` (the payload is real packed random tokens).
        note: What the shape stands for.
    """

    name: str
    kept: int
    dtype: str
    note: str = ''

    def __post_init__(self) -> None:
        if not 1 <= self.kept <= BLIP2_TOKENS:
            raise ConfigError(f'SizeCase {self.name!r}: kept={self.kept} must be in '
                              f'[1, {BLIP2_TOKENS}]')
        if self.dtype not in PACK_DTYPES:
            raise ConfigError(f'SizeCase {self.name!r}: dtype={self.dtype!r} must be one of '
                              f'{PACK_DTYPES}')


def size_cases(keep_ratio: float, pack_dtype: str) -> list[SizeCase]:
    """The message shapes, smallest first; ``uts`` follows the device's UTS defaults."""
    uts_kept = max(1, math.ceil(keep_ratio * BLIP2_TOKENS - 1e-9))  # as core.uts.select_tokens
    return [
        SizeCase('~2KB', 1, 'int8', 'one kept token, int8'),
        SizeCase('~8KB', 5, 'int8', 'five kept tokens, int8'),
        SizeCase('~32KB', 22, 'int8', '22 kept tokens, int8'),
        SizeCase(REFERENCE, uts_kept, pack_dtype,
                 f'UTS defaults: keep_ratio {keep_ratio:g} of {BLIP2_TOKENS}, {pack_dtype}'),
        SizeCase('~256KB', 90, 'fp16', '90 kept tokens, fp16'),
        SizeCase('all-fp16', BLIP2_TOKENS, 'fp16',
                 f'every token fp16 ({BLIP2_TOKENS}x{BLIP2_DIM}): the official uplink'),
    ]


def build_message(case: SizeCase, seed: int) -> Any:
    """A consistent ``UtsTokens`` of ``case``'s shape with random token bytes."""
    import numpy as np
    import torch

    from cdcca_ros.core.uts import pack_tokens
    from cdcca_ros.msg import UtsTokens

    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(BLIP2_TOKENS, size=case.kept, replace=False)).astype(np.uint16)
    tokens = rng.standard_normal((case.kept, BLIP2_DIM), dtype=np.float32)
    packed = pack_tokens(torch.from_numpy(tokens), case.dtype)
    rows, cols = BLIP2_GRID
    msg = UtsTokens(
        device_id=DEVICE, sample_id=f'{DEVICE}-0', model_version=f'{DEVICE}:v0',
        vision_space=f'blip2-vit/224px/p14/d{BLIP2_DIM}:d{BLIP2_DIM}:n{BLIP2_TOKENS}'
                     f':g{rows}x{cols}:cls',
        question='what colour is the object on the left?', device_answer='red',
        entropy_mean=1.7, entropy_max=2.9, num_tokens=BLIP2_TOKENS, token_dim=BLIP2_DIM,
        grid_rows=rows, grid_cols=cols, has_cls=True,
        kept_indices=[int(i) for i in kept],
        token_variance=[float(v) for v in rng.random(case.kept, dtype=np.float32)],
        dtype=case.dtype, scales=packed.scale, payload=packed.data)
    msg.header.frame_id = 'camera_color_optical_frame'
    return msg


def stamp_ns(stamp: Any) -> int:
    """Nanoseconds of a ``builtin_interfaces/Time``."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _set_stamp(msg: Any, now_ns: int) -> None:
    msg.header.stamp.sec = now_ns // 1_000_000_000
    msg.header.stamp.nanosec = now_ns % 1_000_000_000


def bench_qos() -> Any:
    """Reliable and keep-all: a burst is delivered whole, as on the link."""
    from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy

    return QoSProfile(depth=1, history=QoSHistoryPolicy.KEEP_ALL,
                      reliability=QoSReliabilityPolicy.RELIABLE,
                      durability=QoSDurabilityPolicy.VOLATILE)


def bridge_link_config(connect: str, certs: Path, name: str) -> Any:
    """The ``LinkConfig`` ``cloud_bridge_node`` builds from its default parameters."""
    from cdcca_ros.nodes.cloud_bridge_node import link_config
    from cdcca_ros.nodes.tables import validate

    params = validate('cloud_bridge_node', {'connect': connect, 'certs_dir': str(certs)})
    return link_config(params, name)


# --- the receiving process ---------------------------------------------------------------
def receiver_main(argv: Sequence[str] | None = None) -> int:
    """The receiving process: ``CloudLink`` and a DDS subscription, one JSON line per message.

    Prints ``{"ev": "ready"}`` once the link is connected, then per message ``{"ev": "got",
    "path", "id", "sent_ns", "recv_ns", "len", ...}``. Stops at ``quit`` or end of stdin.
    """
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.bench.link',
                                     description='receiving end of the link bench '
                                                 '(started by `python -m cdcca_ros.bench link`)')
    parser.add_argument('--certs', type=Path, required=True)
    parser.add_argument('--connect', required=True, help='router endpoint, tls/HOST:PORT')
    parser.add_argument('--store', type=Path, required=True, help='CloudLink store folder')
    parser.add_argument('--topic', default=TOPIC)
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.serialization import deserialize_message

    from cdcca_ros.msg import UtsTokens
    from cdcca_ros.transport.link import CloudLink, LinkMessage

    lock = threading.Lock()

    def emit(**fields: Any) -> None:
        with lock:
            sys.stdout.write(json.dumps(fields) + '\n')
            sys.stdout.flush()

    def report(path: str, msg: Any, recv_ns: int, **extra: Any) -> None:
        emit(ev='got', path=path, id=msg.sample_id, sent_ns=stamp_ns(msg.header.stamp),
             recv_ns=recv_ns, len=len(msg.payload), **extra)

    def on_link(m: LinkMessage) -> None:
        msg = deserialize_message(m.payload, UtsTokens)
        recv_ns = time.time_ns()
        report('link', msg, recv_ns, created_ns=m.created_ns, stored_ns=m.received_ns,
               wire=len(m.payload))

    def on_dds(msg: Any) -> None:
        report('dds', msg, time.time_ns())

    context = Context()
    rclpy.init(context=context)
    link = None
    executor = None
    thread = None
    try:
        node = Node('link_bench_receiver', context=context)
        node.create_subscription(UtsTokens, args.topic, on_dds, bench_qos())
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        thread = threading.Thread(target=executor.spin, daemon=True)
        thread.start()
        link = CloudLink(bridge_link_config(args.connect, args.certs, CLOUD), args.store,
                         on_uplink=on_link, devices=[DEVICE])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not link.stats()['connected']:
            if time.monotonic() > deadline:
                emit(ev='error', message=f'link not connected after {READY_TIMEOUT_S} s: '
                                         f'{link.stats()["last_error"]}')
                return 1
            time.sleep(0.02)
        emit(ev='ready', pid=os.getpid())
        for line in sys.stdin:
            if line.strip() == 'quit':
                break
            if line.strip() == 'stats':
                emit(ev='stats', **{k: v for k, v in link.stats().items()
                                    if not isinstance(v, dict)})
    finally:
        if link is not None:
            link.close()
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if thread is not None:
            thread.join(timeout=5.0)
        if context.ok():
            rclpy.shutdown(context=context)
    return 0


# --- the bench's side ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


class _Child:
    """A Python subprocess whose stdout lines are read by a thread (JSON ones parsed)."""

    def __init__(self, args: list[str], name: str, stderr_path: Path,
                 stop_on_eof: bool = True) -> None:
        self.name = name
        self.stop_on_eof = stop_on_eof  # else SIGTERM (the router runs until a signal)
        self.stderr_path = stderr_path
        self._stderr: IO[bytes] = open(stderr_path, 'wb')
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        self.popen = subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                      bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name=f'{name}-stdout', daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue  # Zenoh's own log lines, if any
            if isinstance(event, dict):
                self.events.put(event)

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return self.stderr_path.read_text(errors='replace')[-chars:]
        except OSError:
            return ''

    def fail(self, what: str) -> CdccaError:
        code = self.popen.poll()
        state = 'running' if code is None else f'exited with {code}'
        return CdccaError(f'{self.name} ({state}): {what}; stderr: {self.stderr_tail()}')

    def wait_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        raise self.fail(f'no line starting with {prefix!r} within {timeout_s} s')

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + '\n')
        self.popen.stdin.flush()

    def close(self, timeout_s: float = 15.0) -> None:
        if self.popen.poll() is None:
            try:
                if self.stop_on_eof:
                    self.popen.stdin.close()  # type: ignore[union-attr]  # EOF: it stops
                else:
                    self.popen.terminate()
                self.popen.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.terminate()
                try:
                    self.popen.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5.0)
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        self._stderr.close()


class _Receipts:
    """Receipt records of the receiving process, by sample id."""

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.got: dict[str, dict[str, Any]] = {}

    def _pump(self, timeout_s: float) -> bool:
        try:
            event = self.child.events.get(timeout=timeout_s)
        except queue.Empty:
            return False
        if event.get('ev') == 'got':
            self.got[event['id']] = event
        elif event.get('ev') == 'error':
            raise self.child.fail(event.get('message', 'error'))
        return True

    def wait(self, ids: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        """The records of ``ids`` (those that arrived within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        missing = [i for i in ids if i not in self.got]
        while missing and time.monotonic() < deadline:
            if not self._pump(0.05) and self.child.popen.poll() is not None:
                raise self.child.fail('the receiver exited')
            missing = [i for i in missing if i not in self.got]
        return [self.got.pop(i) for i in ids if i in self.got]


class _Sender:
    """Both paths' sending ends in this process: a ``DeviceLink`` and an rclpy publisher."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.context import Context
        from rclpy.node import Node
        from rclpy.serialization import serialize_message

        from cdcca_ros.msg import UtsTokens

        self._serialize = serialize_message
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node('link_bench_sender', context=self.context)
        self.pub = self.node.create_publisher(UtsTokens, TOPIC, bench_qos())
        self.link: Any = None
        self.counter = 0

    def connect(self, connect: str, certs: Path, spool: Path) -> None:
        """Open the ``DeviceLink`` (once the router listens: its first retries back off)."""
        from cdcca_ros.transport.link import DeviceLink

        self.link = DeviceLink(DEVICE, bridge_link_config(connect, certs, DEVICE), spool,
                               on_downlink=lambda _m: None)

    def ready(self) -> bool:
        return (self.pub.get_subscription_count() > 0 and self.link is not None
                and bool(self.link.stats()['cloud_reachable']))

    def send(self, path: str, msg: Any) -> str:
        """Stamp, name and send ``msg`` on ``path``; return its sample id."""
        self.counter += 1
        msg.sample_id = sample_id = f'{DEVICE}-{path}-{self.counter}'
        _set_stamp(msg, time.time_ns())
        if path == 'link':
            self.link.send(TOPIC, self._serialize(msg))
        else:
            self.pub.publish(msg)
        return sample_id

    def close(self) -> None:
        import rclpy

        if self.link is not None:
            self.link.close()
        self.node.destroy_node()
        if self.context.ok():
            rclpy.shutdown(context=self.context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--samples', type=int, default=None,
                        help='latency samples per size and path (default 60, quick 4)')
    parser.add_argument('--bursts', type=int, default=None,
                        help='throughput bursts per size and path (default 3, quick 1)')
    parser.add_argument('--max-burst', type=int, default=None,
                        help='most messages per burst (default 400, quick 20); a burst is '
                             f'about {BURST_BYTES >> 20} MiB, at least 10 messages')
    parser.add_argument('--sizes', default=None,
                        help='comma-separated size names (default all; quick: ~2KB,uts)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID (default: a free one in 1..101)')


def _burst_count(wire_bytes: int, max_burst: int) -> int:
    return max(min(10, max_burst), min(max_burst, BURST_BYTES // max(1, wire_bytes)))


def _measure_latency(sender: _Sender, receipts: _Receipts, msg: Any, n: int, warmup: int
                     ) -> tuple[dict[str, list[float]], list[float], int]:
    """One-way latencies (ms) per path, the link's spool-to-store times, and losses."""
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    spool_to_store: list[float] = []
    lost = 0
    for i in range(warmup + n):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            sid = sender.send(path, msg)
            got = receipts.wait([sid], SAMPLE_TIMEOUT_S)
            if not got:
                lost += 1
                continue
            if i < warmup:
                continue
            rec = got[0]
            lat[path].append((rec['recv_ns'] - rec['sent_ns']) / 1e6)
            if path == 'link':
                spool_to_store.append((rec['stored_ns'] - rec['created_ns']) / 1e6)
    return lat, spool_to_store, lost


def _measure_throughput(sender: _Sender, receipts: _Receipts, msg: Any, count: int,
                        bursts: int, wire_bytes: int) -> tuple[dict[str, list[float]], int]:
    """Messages per second of each burst, per path, and losses."""
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    lost = 0
    timeout = 60.0 + count * wire_bytes / 1e6  # generous: at least 1 MB/s
    for b in range(bursts):
        for path in (PATHS if b % 2 == 0 else PATHS[::-1]):
            ids = [sender.send(path, msg) for _ in range(count)]
            got = receipts.wait(ids, timeout)
            lost += count - len(got)
            if len(got) < 2:
                continue
            span_s = (max(r['recv_ns'] for r in got) - min(r['sent_ns'] for r in got)) / 1e9
            rates[path].append(len(got) / span_s if span_s > 0 else math.nan)
    return rates, lost


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring), in a ROS domain of the bench's own
    (the receiving process inherits it); the caller's environment is restored after."""
    from cdcca_ros.nodes.ros_domain import isolated_ros_env

    with isolated_ros_env(ctx.args.domain_id) as domain_id:
        return _run(ctx, domain_id)


def _run(ctx: BenchContext, domain_id: int) -> BenchResult:
    import rclpy
    from rclpy.serialization import serialize_message

    from cdcca_ros.transport.certs import create_certificates

    quick = ctx.quick
    n = ctx.args.samples or (4 if quick else 60)
    bursts = ctx.args.bursts or (1 if quick else 3)
    max_burst = ctx.args.max_burst or (20 if quick else 400)
    warmup = 1 if quick else 5
    if n < 1 or bursts < 1 or max_burst < 2:
        raise ConfigError(f'--samples {n}, --bursts {bursts} must be >= 1 and --max-burst '
                          f'{max_burst} >= 2')
    uts = device_uts_config()
    cases = size_cases(uts.keep_ratio, uts.pack_dtype)
    names = [c.name for c in cases]
    wanted = ctx.args.sizes or ('~2KB,uts' if quick else ','.join(names))
    chosen = [s.strip() for s in wanted.split(',') if s.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        raise ConfigError(f'--sizes {wanted!r}: unknown {unknown}; known: {", ".join(names)}')
    cases = [c for c in cases if c.name in chosen]

    certs = ctx.workdir / 'certs'
    create_certificates(certs, devices=[DEVICE], cloud=CLOUD)
    port = _free_port()
    connect = f'tls/localhost:{port}'
    children: list[_Child] = []
    sender: _Sender | None = None
    rows: list[list[Any]] = []
    per_size: dict[str, dict[str, Any]] = {}
    lost_total = 0
    try:
        # DDS first: its discovery (seconds here) runs while the router and receiver start.
        sender = _Sender()
        router = _Child(['-m', 'cdcca_ros.transport.router', '--certs', str(certs), '--listen',
                         f'tls/127.0.0.1:{port}', '--devices', DEVICE, '--cloud', CLOUD],
                        'router', ctx.workdir / 'router.err', stop_on_eof=False)
        children.append(router)
        router.wait_line('READY', READY_TIMEOUT_S)
        receiver = _Child(['-m', 'cdcca_ros.bench.link', '--certs', str(certs), '--connect',
                           connect, '--store', str(ctx.workdir / 'cloud-store')],
                          'receiver', ctx.workdir / 'receiver.err')
        children.append(receiver)
        receiver.wait_line('{"ev": "ready"', READY_TIMEOUT_S)
        receipts = _Receipts(receiver)
        sender.connect(connect, certs, ctx.workdir / 'device-spool')
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not sender.ready():
            if time.monotonic() > deadline:
                raise receiver.fail(f'paths not ready after {READY_TIMEOUT_S} s: DDS '
                                    f'subscribers {sender.pub.get_subscription_count()}, '
                                    f'link {sender.link.stats()}')
            time.sleep(0.02)

        for k, case in enumerate(cases):
            msg = build_message(case, ctx.seed * 1000 + k)
            wire = len(serialize_message(msg))
            lat, s2s, lost_lat = _measure_latency(sender, receipts, msg, n, warmup)
            count = _burst_count(wire, max_burst)
            rates, lost_thr = _measure_throughput(sender, receipts, msg, count, bursts, wire)
            lost_total += lost_lat + lost_thr
            lat_med = {p: median(lat[p]) for p in PATHS}
            rate_med = {p: median(rates[p]) for p in PATHS}
            mb_s = {p: rate_med[p] * wire / 1e6 for p in PATHS}
            per_size[case.name] = {
                'kept_tokens': case.kept, 'dtype': case.dtype, 'note': case.note,
                'wire_bytes': wire, 'payload_bytes': len(msg.payload),
                'latency_ms': {p: describe_ms(lat[p]) for p in PATHS},
                'link_spool_to_store_ms': describe_ms(s2s),
                'throughput_msgs_per_s': {p: rate_med[p] for p in PATHS},
                'throughput_mb_per_s': mb_s,
                'throughput_bursts': {p: rates[p] for p in PATHS},
                'burst_messages': count,
                'link_over_dds_latency': ratio(lat_med['link'], lat_med['dds']),
                'link_over_dds_throughput': ratio(rate_med['link'], rate_med['dds']),
                'lost': lost_lat + lost_thr,
            }
            d = per_size[case.name]
            rows.append([case.name, wire, lat_med['link'], lat_med['dds'],
                         d['link_over_dds_latency'], rate_med['link'], rate_med['dds'],
                         mb_s['link'], mb_s['dds'], d['link_over_dds_throughput']])
        receiver.send('stats')
        link_rx_stats: dict[str, Any] = {}
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                event = receiver.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if event.get('ev') == 'stats':
                link_rx_stats = event
                break
        link_tx_stats = sender.link.stats()
        rmw = rclpy.get_rmw_implementation_identifier()
    finally:
        if sender is not None:
            sender.close()
        for child in reversed(children):
            child.close()

    ref = per_size.get(REFERENCE) or per_size[cases[-1].name]
    ref_name = REFERENCE if REFERENCE in per_size else cases[-1].name
    lat_ratios = [d['link_over_dds_latency'] for d in per_size.values()]
    thr_ratios = [d['link_over_dds_throughput'] for d in per_size.values()]
    summary = {
        'link_over_dds_latency': ref['link_over_dds_latency'],
        'link_over_dds_throughput': ref['link_over_dds_throughput'],
        'reference_size': ref_name,
        'reference_bytes': ref['wire_bytes'],
        'link_over_dds_latency_median_over_sizes': median(lat_ratios),
        'link_over_dds_throughput_median_over_sizes': median(thr_ratios),
        'link_latency_ms': ref['latency_ms']['link'].get('median'),
        'dds_latency_ms': ref['latency_ms']['dds'].get('median'),
        'link_msgs_per_s': ref['throughput_msgs_per_s']['link'],
        'dds_msgs_per_s': ref['throughput_msgs_per_s']['dds'],
        'link_mb_per_s': ref['throughput_mb_per_s']['link'],
        'dds_mb_per_s': ref['throughput_mb_per_s']['dds'],
        'lost': lost_total,
    }
    link_cfg = bridge_link_config(connect, certs, DEVICE)
    return BenchResult(
        summary=summary,
        headers=['size', 'bytes', 'link ms', 'DDS ms', 'lat x', 'link msg/s', 'DDS msg/s',
                 'link MB/s', 'DDS MB/s', 'thr x'],
        rows=rows,
        detail={'sizes': per_size, 'rmw': rmw, 'ros_domain_id': domain_id,
                'latency_samples': n, 'warmup_samples': warmup, 'bursts': bursts,
                'link_config': {'chunk_size': link_cfg.chunk_size,
                                'window_messages': link_cfg.window_messages,
                                'window_bytes': link_cfg.window_bytes,
                                'durable': link_cfg.durable, 'tls': True,
                                'access_control': True},
                'link_sender_stats': link_tx_stats, 'link_receiver_stats': link_rx_stats,
                'blip2_geometry': {'tokens': BLIP2_TOKENS, 'dim': BLIP2_DIM,
                                   'grid': list(BLIP2_GRID)}},
        notes=[f'summary ratios at the "{ref_name}" size ({ref["wire_bytes"]} bytes of CDR: '
               f'{ref["note"]}); the *_median_over_sizes keys take the median of the '
               'per-size ratios',
               'latency: one-way app to app (sender stamp before serialize/publish -> '
               'receiver clock after deserialize), one message in flight, paths alternated; '
               f'{n} samples per size and path after {warmup} warm-up',
               'throughput: bursts of back-to-back messages (first send -> last receipt), '
               f'paths alternated, median of {bursts} burst(s); MB = 10^6 bytes of CDR',
               f'link: DeviceLink (this process) -> router process (mutual TLS, access '
               f'control) -> CloudLink (receiver process), cloud_bridge_node defaults '
               f'(chunk {link_cfg.chunk_size} B, window {link_cfg.window_messages} msgs); '
               'the link spools to SQLite on both ends',
               f'DDS: {rmw}, reliable keep-all, domain {domain_id}, localhost discovery; '
               'same two processes',
               f'messages lost: {lost_total} (expected 0 on both paths)'])


if __name__ == '__main__':
    sys.exit(receiver_main())
