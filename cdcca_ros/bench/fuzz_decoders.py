"""Fuzz targets: every decoder of bytes that crossed a process or a network.

Each :class:`Decoder` pairs a hypothesis strategy (raw bytes, and valid encodings with mutated
bytes or fields: structure-aware) with a function that feeds one input through the decoder
and checks what comes out, and the error types the decoder documents. :func:`feed` runs one
input and returns ``None`` when the decoder either decoded it (checks passed) or refused it
with a documented error; anything else is a crash and comes back as its description. The test
suite runs every decoder for a few dozen examples (``test/bench/test_fuzz_decoders.py``); the
``fuzz`` bench for ten thousand and more.

Decoders: the UTS token packings (``uts.fp16``, ``uts.int8``, ``uts.int4``, ``uts.ecq``), the
DWC containers and codecs (``dwc.fp16``, ``dwc.nf4``, ``dwc.sparse``), the signed delta
envelope through the device's gate (``delta.envelope``, ``delta.gate_signed``: validly signed
envelopes with hostile fields), the key list (``trust.key_list``), chunk reassembly
(``wire.chunks``, ``delta.chunks``: DwcDelta messages), the link's framing (``link.framing``),
the spool's and the inbox's on-disk records (``spool.records``, ``inbox.records``), the
recording reader (``recording.mcap``), the image converter (``image.raw`` for every encoding
with wrong steps and sizes, ``image.compressed``) and the ``scene`` JSON (``scene.json``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from cdcca_ros.errors import (
    CodecError,
    ConfigError,
    DeltaRejectedError,
    ImageConversionError,
    SpoolError,
    TrustError,
    WireError,
)


class InvariantError(AssertionError):
    """A decoder returned something its contract rules out."""


@dataclass(frozen=True)
class Decoder:
    """One fuzz target.

    Attributes:
        name: ``area.decoder``.
        strategy: Builds the hypothesis strategy of inputs.
        run: Feeds one input (raises a documented error to refuse it; InvariantError when the
            output breaks the contract).
        allowed: The documented error types.
    """

    name: str
    strategy: Callable[[], st.SearchStrategy]
    run: Callable[[Any], None]
    allowed: tuple[type[BaseException], ...]


def feed(decoder: Decoder, value: Any, counts: dict[str, int] | None = None) -> str | None:
    """Run one input; None when decoded or refused as documented, else what went wrong.

    ``counts``, when given, gets ``decoded`` or ``refused`` incremented.
    """
    outcome = 'decoded'
    try:
        decoder.run(value)
    except decoder.allowed:
        outcome = 'refused'
    except Exception as err:  # noqa: BLE001 - counting crashes is the point
        return f'{type(err).__name__}: {err}'[:500]
    if counts is not None:
        counts[outcome] = counts.get(outcome, 0) + 1
    return None


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise InvariantError(what)


# --- mutations ------------------------------------------------------------------------------
_OPS = ('flip', 'set', 'truncate', 'insert', 'delete', 'duplicate', 'zero')


@st.composite
def _mutation(draw: st.DrawFn) -> tuple[str, int, int, bytes]:
    return (draw(st.sampled_from(_OPS)), draw(st.integers(0, 1 << 20)),
            draw(st.integers(0, 255)), draw(st.binary(max_size=64)))


def mutate(data: bytes, mutations: list[tuple[str, int, int, bytes]]) -> bytes:
    """Apply byte-level mutations (positions taken modulo the length)."""
    buf = bytearray(data)
    for op, pos, value, extra in mutations:
        n = len(buf)
        at = pos % (n + 1)
        if op == 'flip' and n:
            buf[pos % n] ^= 1 << (value % 8)
        elif op == 'set' and n:
            buf[pos % n] = value
        elif op == 'truncate':
            del buf[at:]
        elif op == 'insert':
            buf[at:at] = extra
        elif op == 'delete':
            del buf[at:at + 1 + value]
        elif op == 'duplicate' and n:
            buf[at:at] = buf[at:at + 1 + value * 4]
        elif op == 'zero':
            buf[at:at + 1 + value] = bytes(len(buf[at:at + 1 + value]))
    return bytes(buf)


@dataclass(frozen=True)
class Mutation:
    """A valid encoding and the mutations to apply, applied only when fed (:func:`realize`):
    hypothesis keeps every generated value of a run in its cache, so large inputs are
    generated as this small description instead."""

    base: bytes
    mutations: tuple[tuple[str, int, int, bytes], ...]

    def __repr__(self) -> str:
        return f'Mutation(<{len(self.base)} bytes>, {self.mutations!r})'


def realize(value: bytes | Mutation) -> bytes:
    """The bytes of an input (a :class:`Mutation` applied)."""
    return mutate(value.base, list(value.mutations)) if isinstance(value, Mutation) else value


def mutated(valid: st.SearchStrategy[bytes], raw_max: int = 4096, *,
            lazy: bool = False) -> st.SearchStrategy[Any]:
    """Raw bytes, or a valid encoding with 1-4 byte mutations (or none: the valid one);
    ``lazy``: the mutated ones as :class:`Mutation` (see there)."""
    muts = st.lists(_mutation(), min_size=1, max_size=4)
    changed = (st.builds(lambda b, m: Mutation(b, tuple(m)), valid, muts) if lazy
               else st.builds(mutate, valid, muts))
    return st.one_of(st.binary(max_size=raw_max), changed, valid)


_EDGE_FLOATS = st.sampled_from([0.0, -0.0, 1e-45, -1.0, 1.0, 65504.0, 7e4, 1e38, 3.5e38,
                                float('nan'), float('inf'), -float('inf')])
_FLOATS = st.one_of(_EDGE_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
_BIG_INTS = st.one_of(st.integers(0, 64), st.sampled_from([0, 1, 255, 256, 65535, 65536,
                                                            (1 << 31) - 1, 1 << 31,
                                                            (1 << 32) - 1, 1 << 32,
                                                            (1 << 63) - 1, (1 << 64) - 1]))
_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(['', ' 1', '1_0', '٣', '-1', '01',
                                                         '1e3', 'fp16', 'sparse', 'nf4']))


def _rng_array(seed: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --- uplink tokens --------------------------------------------------------------------------
def _uts_strategy(dtype: str) -> Callable[[], st.SearchStrategy]:
    def build() -> st.SearchStrategy:
        import torch

        from cdcca_ros.core.uts import PackedTokens, pack_tokens

        def valid(seed: int, k: int, d: int, scale: float) -> PackedTokens:
            return pack_tokens(torch.from_numpy(_rng_array(seed, (k, d), scale)), dtype)

        base = st.builds(valid, st.integers(0, 2**32 - 1), st.integers(0, 12),
                         st.integers(1, 64), st.sampled_from([1e-3, 1.0, 30.0, 1e3]))

        @st.composite
        def hostile(draw: st.DrawFn) -> PackedTokens:
            p = draw(base)
            data = draw(mutated(st.just(p.data), raw_max=1024))
            scale = draw(st.one_of(st.just(list(p.scale)),
                                   st.lists(_FLOATS, max_size=16)))
            shape = draw(st.one_of(st.just(p.shape), st.tuples(_BIG_INTS, _BIG_INTS),
                                   st.tuples(st.integers(-3, 3), st.integers(-3, 70))))
            kind = draw(st.one_of(st.just(dtype), st.sampled_from(['fp16', 'int8', 'int4',
                                                                   'ecq', 'bf16', ''])))
            return PackedTokens(data=data, dtype=kind, scale=scale, shape=shape)
        return hostile()
    return build


def _uts_run(p: Any) -> None:
    from cdcca_ros.core.uts import unpack_tokens

    out = unpack_tokens(p)
    _check(tuple(out.shape) == tuple(p.shape), f'decoded shape {tuple(out.shape)} != {p.shape}')
    _check(bool(np.isfinite(out.numpy()).all()), 'decoded non-finite tokens')


# --- DWC payloads ---------------------------------------------------------------------------
_SPEC = {'a.lora_A': (4, 24), 'b.norm': (24,), 'c.query_tokens': (1, 3, 24)}


def _dwc_strategy(codec_name: str) -> Callable[[], st.SearchStrategy]:
    def build() -> st.SearchStrategy:
        import torch

        from cdcca_ros.core import codecs

        codec = codecs.get_codec(codec_name)

        def valid(seed: int, scale: float, compact: bool) -> tuple[bytes, bool]:
            delta = {k: torch.from_numpy(_rng_array(seed + i, s, scale))
                     for i, (k, s) in enumerate(_SPEC.items())}
            return codec.encode(delta, self_describing=not compact), compact

        base = st.builds(valid, st.integers(0, 2**32 - 1), st.sampled_from([1e-4, 0.01, 1.0]),
                         st.booleans())
        return base.flatmap(lambda v: st.tuples(mutated(st.just(v[0])), st.just(v[1]),
                                                st.just(codec_name)))
    return build


def _dwc_run(value: tuple[bytes, bool, str]) -> None:
    from cdcca_ros.core import codecs

    payload, compact, name = value
    kind, describing = codecs.read_payload_kind(payload)
    codec = codecs.get_codec(kind)
    numel = sum(int(np.prod(s)) for s in _SPEC.values())
    if describing:
        out = codec.decode(payload)
        _check(sum(t.numel() for t in out.values()) <= codecs.DEFAULT_MAX_NUMEL,
               'decoded more values than the limit')
    else:
        flat = codec.decode_flat(payload, _SPEC)
        _check(flat.values.numel() == numel, f'decode_flat gave {flat.values.numel()} values')
        out = codec.decode(payload, spec=_SPEC)
        _check({k: tuple(v.shape) for k, v in out.items()} == _SPEC, 'decode shapes != spec')


# --- the signed envelope and the gate -------------------------------------------------------
@functools.cache
def _keys() -> tuple[Any, Any]:
    from cdcca_ros.core import wire

    return wire.generate_keypair()


def _base() -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(_rng_array(i, s, 0.02)) for i, (k, s) in enumerate(_SPEC.items())}


@functools.cache
def _base_hash() -> str:
    from cdcca_ros.core import wire

    return wire.state_dict_hash(_base())


def _sealed(seed: int, scale: float, fields: dict[str, Any]) -> Any:
    import torch

    from cdcca_ros.core import codecs
    from cdcca_ros.core.updates import seal_delta

    delta = {k: torch.from_numpy(_rng_array(seed + i, s, scale))
             for i, (k, s) in enumerate(_SPEC.items())}
    args = dict(device_id='robot1', round=1, base_version=0, base_hash=_base_hash(),
                new_version=1, new_hash='ff' * 32, codec='sparse',
                payload=codecs.get_codec('sparse').encode(delta, self_describing=False))
    args.update(fields)
    return seal_delta(_keys()[0], **args)


def _envelope_strategy() -> st.SearchStrategy:
    valid = st.builds(lambda seed: _sealed(seed, 1e-3, {}).encode(), st.integers(0, 1000))
    return mutated(valid)


def _gate() -> Any:
    from cdcca_ros.core.updates import DeltaGate

    return DeltaGate('robot1', _keys()[1], 0, _base_hash(), _SPEC)


def _gate_accept(env: Any) -> None:
    gate = _gate()
    flat = gate.accept_flat(env)
    _check(flat.first_non_finite() is None, 'the gate accepted non-finite values')
    _check(flat.values.numel() == sum(int(np.prod(s)) for s in _SPEC.values()),
           'the gate accepted a delta of another size')


def _envelope_run(data: bytes) -> None:
    from cdcca_ros.core.updates import DeltaEnvelope

    env = DeltaEnvelope.decode(data)
    _check(DeltaEnvelope.decode(env.encode()) == env, 'envelope does not round-trip')
    _gate_accept(env)


def _signed_strategy() -> st.SearchStrategy:
    """Validly signed envelopes whose fields and payload are hostile (a leaked key, a broken
    cloud): what gets past the signature reaches the gate's later checks."""
    @st.composite
    def build(draw: st.DrawFn) -> Any:
        fields: dict[str, Any] = {}
        for name, strategy in (('device_id', st.sampled_from(['robot1', 'robot2', ''])),
                               ('base_version', _BIG_INTS), ('new_version', _BIG_INTS),
                               ('base_hash', st.sampled_from([_base_hash(), '', 'ab' * 32])),
                               ('codec', st.sampled_from(['sparse', 'fp16', 'nf4', 'zip',
                                                          ''])),
                               ('round', _BIG_INTS)):
            if draw(st.booleans()):
                fields[name] = draw(strategy)
        env = _sealed(draw(st.integers(0, 1000)), draw(st.sampled_from([1e-4, 1.0, 1e4])),
                      fields)
        if draw(st.booleans()):
            payload = draw(mutated(st.just(env.payload), raw_max=512))
            fields['payload'] = payload
            env = _sealed(0, 1.0, fields)
        return env
    return build()


# --- key lists ------------------------------------------------------------------------------
@functools.cache
def _root() -> tuple[Any, Any]:
    from cdcca_ros.core import wire

    return wire.generate_keypair()


def _key_list_strategy() -> st.SearchStrategy:
    from cdcca_ros.core.trust import KeyList

    def valid(version: int, n: int) -> bytes:
        from cdcca_ros.core import wire

        keys = [(wire.generate_keypair()[1], ['delta']) for _ in range(n)]
        return KeyList.create(_root()[0], version=version, expires=2**40, keys=keys).encode()

    deep = st.integers(1, 100_000).map(lambda n: b'[' * n + b']' * (n % 3))
    return st.one_of(mutated(st.builds(valid, _BIG_INTS, st.integers(0, 3))), deep)


def _key_list_run(data: bytes) -> None:
    from cdcca_ros.core.trust import TrustStore

    store = TrustStore(_root()[1], clock=lambda: 0.0)
    store.update(data)
    _check(store.key_list is not None, 'an adopted key list is not in force')


# --- chunk reassembly -----------------------------------------------------------------------
def _chunks_strategy() -> st.SearchStrategy:
    from cdcca_ros.core import wire

    @st.composite
    def build(draw: st.DrawFn) -> list[bytes]:
        payloads = draw(st.lists(st.binary(max_size=2000), min_size=1, max_size=3))
        chunks: list[bytes] = []
        for p in payloads:
            chunks += wire.split_chunks(p, draw(st.integers(1, 700)))
        chunks = [draw(mutated(st.just(c), raw_max=256)) if draw(st.integers(0, 3)) == 0
                  else c for c in chunks]
        return draw(st.permutations(chunks + chunks[:draw(st.integers(0, 2))]))
    return build()


def _chunks_run(chunks: list[bytes]) -> None:
    from cdcca_ros.core import wire

    asm = wire.ChunkAssembler(max_total_bytes=4096, max_pending=3)
    errors: list[BaseException] = []
    for c in chunks:
        try:
            out = asm.add(c, now=0.0)
        except WireError as err:
            errors.append(err)
            continue
        _check(asm.pending <= 3, 'more incomplete messages than max_pending')
        if out is not None:
            _check(len(out) <= 4096, 'a payload over the limit came out')
    if errors:
        raise errors[0]


@functools.lru_cache(maxsize=128)
def _sealed_cached(seed: int) -> Any:
    return _sealed(seed, 1e-3, {})


@dataclass(frozen=True)
class ChunkStream:
    """A delta's DwcDelta chunks with edits, realized only when fed (:func:`realize_chunks`):
    hypothesis keeps every generated value, so the messages are described, not built."""

    seed: int
    chunk_bytes: int
    edits: tuple[tuple[int, str, Any], ...]
    order: tuple[int, ...]  # a shuffle seed, then chunks sent again


def realize_chunks(spec: ChunkStream) -> list[Any]:
    """The chunk messages of a :class:`ChunkStream`, edited and in its order."""
    from cdcca_ros.nodes.delta_msgs import envelope_to_msgs

    msgs = envelope_to_msgs(_sealed_cached(spec.seed), spec.chunk_bytes)
    for i, name, value in spec.edits:
        m = msgs[i % len(msgs)]
        if name == 'chunk':
            value = mutate(bytes(m.chunk), list(value))
        setattr(m, name, value)
    # Every chunk in a shuffled order (seeded by the first number), then a few repeated.
    perm = np.random.default_rng(spec.order[0]).permutation(len(msgs))
    return [msgs[int(i)] for i in perm] + [msgs[i % len(msgs)] for i in spec.order[1:4]]


def _delta_chunks_strategy() -> st.SearchStrategy:
    fields = (('chunk_index', _BIG_INTS.map(lambda v: v & 0xFFFFFFFF)),
              ('chunk_count', _BIG_INTS.map(lambda v: v & 0xFFFFFFFF)),
              ('total_size', _BIG_INTS), ('new_version', _TEXT), ('base_version', _TEXT),
              ('payload_sha256', _TEXT), ('device_id', _TEXT), ('key_id', _TEXT),
              ('signature', st.binary(max_size=80)),
              ('chunk', st.lists(_mutation(), min_size=1, max_size=3).map(tuple)))
    edit = st.one_of(*(st.tuples(st.integers(0, 400), st.just(name), values)
                       for name, values in fields))
    return st.builds(ChunkStream, st.integers(0, 100), st.integers(1, 400),
                     st.lists(edit, max_size=4).map(tuple),
                     st.lists(st.integers(0, 400), min_size=1, max_size=12).map(tuple))


def _delta_chunks_run(spec: ChunkStream) -> None:
    from cdcca_ros.nodes.delta_msgs import DeltaReassembler

    msgs = realize_chunks(spec)
    asm = DeltaReassembler(max_bytes=1 << 16, max_pending=2, max_pending_bytes=1 << 16)
    errors: list[BaseException] = []
    for m in msgs:
        try:
            env = asm.add(m, now=0.0)
        except WireError as err:
            errors.append(err)
            continue
        _check(asm.pending <= 2 and asm.pending_bytes <= 1 << 16, 'reassembly over its bounds')
        if env is not None:
            try:
                _gate_accept(env)
            except DeltaRejectedError as err:
                errors.append(err)
    if errors:
        raise errors[0]


# --- link framing ---------------------------------------------------------------------------
def _framing_strategy() -> st.SearchStrategy:
    from cdcca_ros.transport import framing

    valid = st.builds(
        lambda payload, size, seq: list(framing.split_message(
            payload, chunk_size=size, epoch=1, seq=seq, floor=1, created_ns=0, topic='t')),
        st.binary(max_size=1500), st.integers(1, 600), st.integers(0, 5))
    fields = st.builds(
        lambda kind, seq, index, count, total, body, topic: framing.Frame(
            kind, 1, seq, 0, 0, index, count, total, hashlib.sha256(body).digest(), topic,
            body).encode(),
        st.integers(0, 4), st.integers(0, 3), _BIG_INTS.map(lambda v: v & 0xFFFFFFFF),
        _BIG_INTS.map(lambda v: v & 0xFFFFFFFF), _BIG_INTS, st.binary(max_size=300),
        st.text(max_size=20))
    return st.lists(st.one_of(valid.flatmap(lambda fs: st.permutations(fs)),
                              st.lists(mutated(fields, raw_max=200), max_size=4)),
                    max_size=3).map(lambda groups: [f for g in groups for f in g])


def _framing_run(frames: list[bytes]) -> None:
    from cdcca_ros.transport import framing

    asm = framing.Reassembler(max_payload=2048, max_buffered=4096)
    errors: list[BaseException] = []
    for data in frames:
        try:
            frame = framing.decode_frame(data, max_payload=2048)
            _check(framing.decode_frame(frame.encode()) == frame, 'frame does not round-trip')
            if frame.kind == framing.KIND_DATA:
                out = asm.add('src', frame, now=0.0)
                _check(out is None or len(out) == frame.total_len, 'message of wrong length')
        except WireError as err:
            errors.append(err)
        _check(asm.buffered_bytes <= 4096, 'reassembler over its memory bound')
    if errors:
        raise errors[0]


# --- on-disk records ------------------------------------------------------------------------
_LOCAL = threading.local()


def _scratch() -> Path:
    if getattr(_LOCAL, 'dir', None) is None:
        _LOCAL.dir = Path(tempfile.mkdtemp(prefix='cdcca-fuzz-'))
    return _LOCAL.dir


@functools.cache
def _template(kind: str) -> bytes:
    from cdcca_ros.transport.spool import Inbox, Spool

    path = Path(tempfile.mkdtemp(prefix='cdcca-fuzz-tpl-')) / f'{kind}.db'
    if kind == 'spool':
        with Spool(path, max_bytes=1 << 20) as spool:
            for i in range(5):
                spool.append('uts_tokens', bytes([i]) * (100 + 200 * i))
            spool.ack(1)
    else:
        with Inbox(path) as inbox:
            for seq in range(1, 5):
                inbox.offer('robot1', 7, seq, 1, 'uts_tokens', bytes([seq]) * 300, 0)
            inbox.done(1)
    conn = sqlite3.connect(path)
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.execute('PRAGMA journal_mode=DELETE')
    conn.close()
    return path.read_bytes()


_SQL_EDITS = {
    'spool': ["UPDATE spool SET payload = 'text' WHERE seq = 2",
              'UPDATE spool SET payload = NULL WHERE seq = 3',
              "UPDATE spool SET seq = 'x' WHERE seq = 4",
              'UPDATE spool SET created_ns = 1e300 WHERE seq = 5',
              "UPDATE meta SET v = 'seven' WHERE k = 'epoch'",
              "UPDATE meta SET v = x'00' WHERE k = 'dropped'",
              "DELETE FROM meta WHERE k = 'last_seq'",
              'DROP TABLE spool', 'DROP TABLE meta',
              "UPDATE spool SET topic = x'ff00' WHERE seq = 2",
              'UPDATE spool SET seq = -5 WHERE seq = 5'],
    'inbox': ["UPDATE inbox SET payload = 'text'", 'UPDATE inbox SET seq = NULL',
              "UPDATE peers SET epoch = 'x'", 'UPDATE peers SET next_seq = 1e300',
              'DROP TABLE peers', 'DROP TABLE inbox', "UPDATE inbox SET topic = x'ff'",
              'UPDATE inbox SET received_ns = -1'],
}


def _records_strategy(kind: str) -> Callable[[], st.SearchStrategy]:
    def build() -> st.SearchStrategy:
        valid = st.just(_template(kind))
        return st.tuples(st.just(kind), mutated(valid, raw_max=4096, lazy=True),
                         st.lists(st.sampled_from(_SQL_EDITS[kind]), max_size=3))
    return build


def _records_run(value: tuple[str, bytes | Mutation, list[str]]) -> None:
    from cdcca_ros.transport.spool import Inbox, Spool

    kind, data, edits = value
    data = realize(data)
    path = _scratch() / f'{kind}.db'
    for suffix in ('', '-wal', '-shm'):
        Path(f'{path}{suffix}').unlink(missing_ok=True)
    path.write_bytes(data)
    if edits:
        conn = sqlite3.connect(path)
        try:
            for sql in edits:
                conn.execute(sql)
            conn.commit()
        except (sqlite3.Error, ValueError):  # ValueError: undecodable text in an error
            pass  # the file is too broken to edit: it is fuzzed as it is
        finally:
            conn.close()
    if kind == 'spool':
        with Spool(path, max_bytes=4096) as spool:
            entries = spool.pending()
            _check(all(isinstance(e.payload, bytes) and isinstance(e.topic, str)
                       for e in entries), 'spool returned a non-bytes payload')
            spool.stats()
            spool.append('t', b'x' * 100)
            spool.ack_through(3)
            _check(spool.stats().bytes <= 4096 or len(spool) <= 1, 'spool over its bound')
    else:
        with Inbox(path) as inbox:
            rows = inbox.undelivered()
            _check(all(isinstance(e.payload, bytes) for _, e in rows),
                   'inbox returned a non-bytes payload')
            inbox.offer('robot1', 7, 5, 1, 't', b'y', 0)
            inbox.position('robot1')
            inbox.undelivered_count()
            for row_id, _ in rows[:2]:
                inbox.done(row_id)


# --- recordings -----------------------------------------------------------------------------
@functools.cache
def _mcap_template(compression: str) -> bytes:
    from cdcca_ros.transport.recording import McapRecorder

    path = Path(tempfile.mkdtemp(prefix='cdcca-fuzz-mcap-')) / 'r.mcap'
    with McapRecorder(path, {'uts_tokens': ('cdcca_ros/msg/UtsTokens', 'string device_id\n')},
                      compression=compression) as rec:
        for i in range(4):
            rec.write('uts_tokens', b'\x00\x01\x00\x00' + bytes([i]) * 40, i, i, i)
        rec.write('other', b'raw', 9, 9, 9)
    return path.read_bytes()


def _mcap_strategy() -> st.SearchStrategy:
    return mutated(st.sampled_from(['zstd', 'lz4', 'none']).map(_mcap_template), raw_max=2048,
                   lazy=True)


def _mcap_run(data: bytes | Mutation) -> None:
    from cdcca_ros.transport.recording import decode_recording, read_recording

    path = _scratch() / 'r.mcap'
    path.write_bytes(realize(data))
    n = 0
    for msg in read_recording(path):
        _check(isinstance(msg.data, bytes), 'recording message data is not bytes')
        n += 1
    for _ in decode_recording(path):
        pass


# --- images ---------------------------------------------------------------------------------
_ENCODINGS = ['rgb8', 'bgr8', 'mono8', '16UC1', 'mono16', 'rgba8', 'bgra8', '32FC1', '',
              'RGB8', 'yuv422']


def _image_strategy() -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> Any:
        from sensor_msgs.msg import Image

        encoding = draw(st.sampled_from(_ENCODINGS))
        h = draw(st.one_of(st.integers(0, 40), _BIG_INTS.map(lambda v: v & 0xFFFFFFFF)))
        w = draw(st.one_of(st.integers(0, 40), _BIG_INTS.map(lambda v: v & 0xFFFFFFFF)))
        channels = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, '16UC1': 2}.get(encoding, 1)
        step = draw(st.one_of(st.just(w * channels),
                              st.integers(0, 200), st.just((w * channels + 3) & 0xFFFFFFFF)))
        step &= 0xFFFFFFFF
        size = step * h
        data = draw(st.one_of(st.just(size), st.integers(0, 5000))) if size < 1 << 22 else \
            draw(st.integers(0, 5000))
        msg = Image(height=h, width=w, encoding=encoding, step=step,
                    is_bigendian=draw(st.sampled_from([0, 1, 2, 255])),
                    data=np.random.default_rng(draw(st.integers(0, 99))).integers(
                        0, 256, data, dtype=np.uint8).tobytes())
        return msg
    return build()


def _image_run(msg: Any) -> None:
    from cdcca_ros.camera.convert import msg_to_image, msg_to_rgb
    from cdcca_ros.nodes.device_node import frame_rgb

    if msg.encoding in ('rgb8', 'bgr8', 'mono8'):
        rgb = frame_rgb(msg)
        _check(rgb.shape == (msg.height, msg.width, 3) and rgb.dtype == np.uint8,
               f'frame_rgb gave {rgb.shape} {rgb.dtype} for {msg.width}x{msg.height}')
        out = msg_to_rgb(msg)
        _check(out.shape == (msg.height, msg.width, 3), 'msg_to_rgb shape')
    else:
        out = msg_to_image(msg)
        _check(out.shape[:2] == (msg.height, msg.width), 'msg_to_image shape')


@functools.cache
def _compressed_templates() -> list[tuple[str, bytes]]:
    import cv2

    rgb = (np.random.default_rng(0).integers(0, 256, (24, 32, 3))).astype(np.uint8)
    return [('jpeg', cv2.imencode('.jpg', rgb)[1].tobytes()),
            ('png', cv2.imencode('.png', rgb)[1].tobytes()),
            ('png', cv2.imencode('.png', rgb[:, :, 0].astype(np.uint16) * 200)[1].tobytes())]


def _compressed_strategy() -> st.SearchStrategy:
    @st.composite
    def build(draw: st.DrawFn) -> Any:
        from sensor_msgs.msg import CompressedImage

        fmt, data = draw(st.sampled_from(_compressed_templates()))
        fmt = draw(st.one_of(st.just(fmt), st.sampled_from(['rgb8; jpeg compressed bgr8',
                                                            'jpg', 'PNG', 'tiff', ''])))
        return CompressedImage(format=fmt, data=draw(mutated(st.just(data), raw_max=512)))
    return build()


def _compressed_run(msg: Any) -> None:
    from cdcca_ros.camera.convert import compressed_to_image

    out = compressed_to_image(msg)
    _check(out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8, 'compressed shape')


# --- scene JSON -----------------------------------------------------------------------------
def _scene_strategy() -> st.SearchStrategy:
    import json

    good = {'domain': 'fog', 'stamp_ns': 1, 'question': 'q', 'answer': 'a', 'answers': ['a'],
            'qtype': 'color', 'choices': ['a', 'b'], 'frame_index': 3, 'seed': 0}
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                       st.lists(st.integers(), max_size=3))
    edited = st.builds(lambda changes: json.dumps({**good, **changes}),
                       st.dictionaries(st.sampled_from(sorted(good)), values, max_size=3))
    dropped = st.builds(lambda keys: json.dumps({k: v for k, v in good.items()
                                                 if k not in keys}),
                        st.sets(st.sampled_from(sorted(good)), max_size=3))
    raw = st.one_of(st.text(max_size=200), st.integers(1, 50_000).map(lambda n: '[' * n),
                    mutated(st.just(json.dumps(good).encode()), raw_max=300).map(
                        lambda b: b.decode('utf-8', 'replace')))
    return st.one_of(edited, dropped, raw)


def _scene_run(text: str) -> None:
    from cdcca_ros.camera.synthetic import scene_from_json

    meta = scene_from_json(text)
    _check(isinstance(meta['stamp_ns'], int) and meta['stamp_ns'] >= 0, 'bad stamp_ns passed')


DECODERS: dict[str, Decoder] = {d.name: d for d in [
    *(Decoder(f'uts.{k}', _uts_strategy(k), _uts_run, (WireError,))
      for k in ('fp16', 'int8', 'int4', 'ecq')),
    *(Decoder(f'dwc.{k}', _dwc_strategy(k), _dwc_run, (CodecError,))
      for k in ('fp16', 'nf4', 'sparse')),
    Decoder('delta.envelope', _envelope_strategy, _envelope_run,
            (WireError, DeltaRejectedError)),
    Decoder('delta.gate_signed', _signed_strategy, _gate_accept, (DeltaRejectedError,)),
    Decoder('trust.key_list', _key_list_strategy, _key_list_run, (TrustError,)),
    Decoder('wire.chunks', _chunks_strategy, _chunks_run, (WireError,)),
    Decoder('delta.chunks', _delta_chunks_strategy, _delta_chunks_run,
            (WireError, DeltaRejectedError)),
    Decoder('link.framing', _framing_strategy, _framing_run, (WireError,)),
    Decoder('spool.records', _records_strategy('spool'), _records_run,
            (SpoolError, ConfigError)),
    Decoder('inbox.records', _records_strategy('inbox'), _records_run,
            (SpoolError, ConfigError)),
    Decoder('recording.mcap', _mcap_strategy, _mcap_run, (WireError,)),
    Decoder('image.raw', _image_strategy, _image_run, (ImageConversionError,)),
    Decoder('image.compressed', _compressed_strategy, _compressed_run,
            (ImageConversionError,)),
    Decoder('scene.json', _scene_strategy, _scene_run, (WireError,)),
]}


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open(f'/proc/{os.getpid()}/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return 0
