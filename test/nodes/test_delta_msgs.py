"""DwcDelta chunking and reassembly: strict versions, bounded memory, hostile chunk streams."""
from __future__ import annotations

import time

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from cdcca_ros.core import wire  # noqa: E402
from cdcca_ros.core.trust import Signer  # noqa: E402
from cdcca_ros.core.updates import seal_delta  # noqa: E402
from cdcca_ros.errors import ChunkError, PayloadTooLargeError  # noqa: E402
from cdcca_ros.nodes.delta_msgs import (  # noqa: E402
    DeltaReassembler,
    envelope_to_msgs,
    parse_version,
)

KEY = wire.generate_keypair()[0]
SIGNER = Signer(KEY, key_list=b'{"list": 1}')


def _envelope(payload: bytes = b'p' * 1000, version: int = 1, signer: Signer = SIGNER,
              **fields):
    args = dict(device_id='robot1', round=version, base_version=version - 1,
                base_hash='aa' * 32, new_version=version, new_hash='bb' * 32, codec='sparse',
                payload=payload)
    args.update(fields)
    return seal_delta(signer, **args)


def test_chunks_round_trip_every_field_in_any_order() -> None:
    env = _envelope()
    msgs = envelope_to_msgs(env, 300)
    assert len(msgs) == 4
    asm = DeltaReassembler()
    out = [asm.add(m) for m in reversed(msgs)]
    assert out[:-1] == [None] * 3 and out[-1] == env
    assert asm.pending == 0 and asm.pending_bytes == 0
    # A chunk repeated with the same bytes is ignored; a delivered payload comes again whole
    # (the gate refuses it as a replay).
    assert asm.add(msgs[0]) is None and asm.add(msgs[0]) is None
    assert asm.duplicates == 1


@pytest.mark.parametrize('text', [' 1', '1 ', '1_0', '٣', '+1', '-1', '01', '', '1.0', '0x1',
                                  str(1 << 64), '1' * 30, '١٢'])
def test_version_strings_are_strict(text: str) -> None:
    with pytest.raises(ChunkError, match='decimal integer'):
        parse_version(text)
    msg = envelope_to_msgs(_envelope(), 4096)[0]
    msg.new_version = text
    with pytest.raises(ChunkError):
        DeltaReassembler().add(msg)


def test_version_strings_that_are_fine() -> None:
    assert parse_version('0') == 0 and parse_version('17') == 17
    assert parse_version(str((1 << 64) - 1)) == (1 << 64) - 1


def test_incomplete_payloads_are_bounded_in_count_and_bytes() -> None:
    """400 first chunks of 4 KB of never-finished deltas: at most max_pending held, within
    max_pending_bytes, the rest evicted and counted."""
    asm = DeltaReassembler(max_bytes=1 << 20, max_pending=4, max_pending_bytes=10_000)
    for i in range(400):
        first = envelope_to_msgs(_envelope(bytes([i % 256]) * 8192, version=i + 1), 4096)[0]
        assert asm.add(first) is None
        assert asm.pending <= 4 and asm.pending_bytes <= 10_000
    assert asm.evicted >= 396
    assert asm.status()['delta_partials_evicted'] == asm.evicted
    # A good delta still gets through afterwards.
    env = _envelope(version=999)
    assert [asm.add(m) for m in envelope_to_msgs(env, 600)][-1] == env


def test_endless_and_oversized_chunk_streams_are_refused() -> None:
    asm = DeltaReassembler(max_bytes=10_000)
    big = envelope_to_msgs(_envelope(b'x' * 20_000), 4096)[0]
    with pytest.raises(PayloadTooLargeError):
        asm.add(big)
    endless = envelope_to_msgs(_envelope(), 100)[0]
    endless.chunk_count = (1 << 32) - 1  # far more chunks than bytes
    with pytest.raises(ChunkError, match='at least one byte'):
        asm.add(endless)
    empty = envelope_to_msgs(_envelope(), 100)[1]
    empty.chunk = b''
    with pytest.raises(ChunkError, match='carries 0 bytes'):
        asm.add(empty)
    # More bytes than announced: dropped.
    msgs = envelope_to_msgs(_envelope(), 500)
    asm.add(msgs[0])
    over = msgs[1]
    over.chunk = bytes(over.chunk) + b'!'
    with pytest.raises(ChunkError):
        asm.add(over)
    # A stream that never completes expires.
    asm.add(envelope_to_msgs(_envelope(version=5), 500)[0], now=0.0)
    assert asm.expire(now=asm.timeout_s + 1) >= 1 and asm.pending == 0


def test_chunks_mixed_from_two_deltas_are_refused() -> None:
    """Mix-and-match: the chunks of two deltas of the same round/version interleaved under one
    header set fail the payload hash; a chunk claiming another delta's signature or key list
    drops the payload."""
    a = _envelope(b'a' * 1000)
    b = _envelope(b'b' * 1000, signer=Signer(wire.generate_keypair()[0], key_list=b'{}'),
                  now=time.time() - 60)
    ma, mb = envelope_to_msgs(a, 500), envelope_to_msgs(b, 500)
    mixed = ma[1]
    mixed.chunk = bytes(mb[1].chunk)  # b's bytes under a's header
    asm = DeltaReassembler()
    asm.add(ma[0])
    with pytest.raises(ChunkError, match='sha256'):
        asm.add(mixed)
    for field in ('signature', 'key_list', 'expires', 'key_id'):
        asm = DeltaReassembler()
        asm.add(ma[0])
        other = envelope_to_msgs(a, 500)[1]
        setattr(other, field, getattr(mb[1], field))
        with pytest.raises(ChunkError, match=field):
            asm.add(other)
        assert asm.pending == 0
