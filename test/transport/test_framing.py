"""Frames and chunking: round trips, corruption, truncation, oversize, timeouts."""
from __future__ import annotations

import hashlib
import random

import pytest

from cdcca_ros.errors import ChecksumError, ChunkError, PayloadTooLargeError, WireError
from cdcca_ros.transport.framing import (
    HEADER_SIZE,
    KIND_ACK,
    Frame,
    Reassembler,
    ack_frame,
    decode_frame,
    split_message,
)

CHUNK = 1000


def _frames(payload: bytes, seq: int = 7, chunk: int = CHUNK, topic: str = '/cdcca/uts') \
        -> list[bytes]:
    return list(split_message(payload, chunk_size=chunk, epoch=42, seq=seq, floor=3,
                              created_ns=123, topic=topic))


@pytest.mark.parametrize('size, chunks', [(0, 1), (1, 1), (CHUNK - 1, 1), (CHUNK, 1),
                                          (CHUNK + 1, 2), (10 * CHUNK, 10), (10 * CHUNK + 7, 11)])
def test_round_trip_in_any_order(size: int, chunks: int) -> None:
    payload = random.Random(size).randbytes(size)
    frames = _frames(payload)
    assert len(frames) == chunks
    random.Random(1).shuffle(frames)
    reasm = Reassembler(max_payload=1 << 20)
    results = [reasm.add('robot1', decode_frame(f), now=0.0) for f in frames]
    assert [r for r in results if r is not None] == [payload]
    assert results[-1] == payload  # complete exactly when the last chunk arrives
    assert reasm.pending_sets == 0 and reasm.buffered_bytes == 0
    first = decode_frame(frames[0])
    assert (first.epoch, first.seq, first.floor, first.created_ns, first.topic) == (
        42, 7, 3, 123, '/cdcca/uts')
    assert first.sha256 == hashlib.sha256(payload).digest()


def test_duplicate_chunks_are_harmless() -> None:
    payload = bytes(range(256)) * 20
    frames = _frames(payload)
    reasm = Reassembler(max_payload=1 << 20)
    assert reasm.add('d', decode_frame(frames[0]), 0.0) is None
    assert reasm.add('d', decode_frame(frames[0]), 0.0) is None  # resent chunk
    out = [reasm.add('d', decode_frame(f), 0.0) for f in frames[1:]]
    assert out[-1] == payload


def test_ack_frame_round_trip() -> None:
    f = decode_frame(ack_frame(epoch=9, seq=1234))
    assert (f.kind, f.epoch, f.seq, f.body) == (KIND_ACK, 9, 1234, b'')


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x40
    return bytes(b)


GOOD = _frames(b'x' * 2500)[1]


@pytest.mark.parametrize('data, error, match', [
    (GOOD[:HEADER_SIZE - 1], WireError, 'truncated frame'),
    (GOOD[:-1], WireError, 'truncated frame'),
    (GOOD + b'!', WireError, 'trailing bytes'),
    (b'XXXX' + GOOD[4:], WireError, 'magic'),
    (GOOD[:4] + b'\x09' + GOOD[5:], WireError, 'unsupported frame version 9'),
    (GOOD[:5] + b'\x77' + GOOD[6:], WireError, 'unknown frame kind'),
    (_flip(GOOD, len(GOOD) - 10), ChecksumError, 'CRC-32 mismatch'),
    (_flip(GOOD, 20), ChecksumError, 'CRC-32 mismatch'),
    (b'', WireError, 'truncated'),
])
def test_malformed_frames_raise_clear_errors(data: bytes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        decode_frame(data)


def _forge(**fields: object) -> bytes:
    base = dict(kind=1, epoch=1, seq=1, floor=1, created_ns=0, index=0, count=1, total_len=4,
                sha256=hashlib.sha256(b'abcd').digest(), topic='/t', body=b'abcd')
    base.update(fields)
    return Frame(**base).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize('fields, error', [
    ({'index': 3, 'count': 2}, ChunkError),
    ({'count': 0}, ChunkError),
    ({'total_len': 2}, ChunkError),  # body longer than the message
    ({'count': 9}, ChunkError),  # more chunks than bytes
])
def test_inconsistent_chunk_fields_are_refused(fields: dict, error: type) -> None:
    with pytest.raises(error):
        decode_frame(_forge(**fields))


def test_oversized_payloads_are_refused_from_the_header() -> None:
    frame = _forge(total_len=10 << 20, count=10 << 10)
    with pytest.raises(PayloadTooLargeError, match='over the limit of 1048576'):
        decode_frame(frame, max_payload=1 << 20)
    with pytest.raises(PayloadTooLargeError):
        Reassembler(max_payload=1 << 20).add('d', decode_frame(frame), 0.0)


def test_a_chunk_with_the_wrong_content_fails_the_sha256() -> None:
    frames = _frames(b'a' * 2500)
    forged = _frames(b'b' * 2500)
    # Same header fields but another body: a valid frame whose bytes do not belong.
    bad = decode_frame(forged[1])
    bad = Frame(**{**bad.__dict__, 'sha256': decode_frame(frames[0]).sha256})
    reasm = Reassembler(max_payload=1 << 20)
    reasm.add('d', decode_frame(frames[0]), 0.0)
    reasm.add('d', bad, 0.0)
    with pytest.raises(ChunkError, match='SHA-256 mismatch'):
        reasm.add('d', decode_frame(frames[2]), 0.0)
    assert reasm.pending_sets == 0


def test_contradicting_chunks_drop_the_set() -> None:
    reasm = Reassembler(max_payload=1 << 20)
    reasm.add('d', decode_frame(_frames(b'a' * 2500)[0]), 0.0)
    with pytest.raises(ChunkError, match='contradicts'):
        reasm.add('d', decode_frame(_frames(b'a' * 3500)[1]), 0.0)  # other length, same seq
    assert reasm.pending_sets == 0 and reasm.buffered_bytes == 0


def test_incomplete_sets_time_out_and_senders_never_mix() -> None:
    reasm = Reassembler(max_payload=1 << 20, timeout_s=5.0)
    frames = _frames(b'z' * 3000)
    reasm.add('robot1', decode_frame(frames[0]), now=0.0)
    reasm.add('robot2', decode_frame(frames[1]), now=4.0)  # same seq, other sender
    assert reasm.pending_sets == 2
    assert reasm.expire(now=5.5) == [('robot1', 42, 7)]
    assert reasm.timed_out == 1 and reasm.pending_sets == 1
    # robot1's late chunks start a fresh set instead of completing the expired one.
    assert reasm.add('robot1', decode_frame(frames[1]), now=6.0) is None


def test_buffered_bytes_are_bounded_by_evicting_the_oldest_set() -> None:
    reasm = Reassembler(max_payload=3000, max_buffered=2500)
    for seq in range(3):
        reasm.add('d', decode_frame(_frames(b'q' * 3000, seq=seq)[0]), now=float(seq))
    assert reasm.buffered_bytes <= 2500
    assert reasm.evicted == 1 and reasm.pending_sets == 2
