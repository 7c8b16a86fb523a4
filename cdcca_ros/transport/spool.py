"""Persistent, ordered, bounded message stores of the link (SQLite, stdlib).

- :class:`Spool` is the sender's side: every outgoing message is appended (and thereby given
  its sequence number) before it is sent, and removed only when the receiver acknowledges it.
  It is bounded in bytes; when full, the *oldest* messages are dropped and counted. It
  survives a restart of the process, so nothing is lost while the link or the peer is down.
- :class:`Inbox` is the receiver's side: it remembers, per sender and sequence space, the
  next sequence number expected, stores each accepted message in the same transaction (so a
  restart neither loses nor duplicates one), and hands messages to the application in order.

SQLite in WAL mode makes each append/accept atomic; ``synchronous=NORMAL`` (the default here)
survives a crash of the process, ``durable=True`` (``FULL``) also a power cut, at the cost of
an fsync per write.
"""
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cdcca_ros.errors import ConfigError, PayloadTooLargeError, SpoolError


class SpoolEntry(NamedTuple):
    """One stored outgoing message."""

    seq: int
    topic: str
    payload: bytes
    created_ns: int


class InboxEntry(NamedTuple):
    """One accepted incoming message, not yet handed to the application."""

    source: str
    epoch: int
    seq: int
    topic: str
    payload: bytes
    created_ns: int
    received_ns: int


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn what a damaged store raises while being read into a SpoolError."""
    try:
        yield
    except (sqlite3.Error, TypeError, ValueError, IndexError, OverflowError) as err:
        raise SpoolError(f'cannot read {what} from {path}: {type(err).__name__}: {err}; '
                         'the file is damaged (move it away to start empty)') from err


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'expected an integer column, got {type(value).__name__}')
    return value


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f'expected a blob column, got {type(value).__name__}')
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f'expected a text column, got {type(value).__name__}')
    return value


def _connect(path: Path, durable: bool) -> sqlite3.Connection:
    conn = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: explicit BEGIN/COMMIT; the object's lock serializes threads.
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        conn.execute('PRAGMA page_size=65536')  # fewer overflow pages per large payload
        conn.execute('PRAGMA journal_mode=WAL')
        # Checkpoint every 4 MiB of log (1000 pages would be 64 MiB beside the bound) and
        # give the space back beyond 16 MiB.
        conn.execute('PRAGMA wal_autocheckpoint=64')
        conn.execute(f'PRAGMA journal_size_limit={16 << 20}')
        conn.execute(f'PRAGMA synchronous={"FULL" if durable else "NORMAL"}')
    except (sqlite3.Error, OSError, ValueError) as err:
        # ValueError: on some damaged files the message SQLite gives does not decode (a
        # UnicodeDecodeError instead of a sqlite3 error).
        if conn is not None:
            conn.close()
        raise SpoolError(f'cannot open store {path}: {err!r}'[:500]) from err
    return conn


@dataclass(frozen=True)
class SpoolStats:
    """Counters of a :class:`Spool` (``dropped*`` persist across restarts;
    ``dropped_disk_full`` counts the messages dropped because the disk was full, within
    ``dropped``)."""

    messages: int
    bytes: int
    dropped: int
    dropped_bytes: int
    first_seq: int | None
    last_seq: int
    dropped_disk_full: int = 0


def _disk_full(err: sqlite3.Error) -> bool:
    """Whether a write failed for lack of room: SQLITE_FULL, or an I/O error writing (what a
    file-size limit gives)."""
    code = getattr(err, 'sqlite_errorcode', 0) & 0xFF
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


class Spool:
    """Ordered on-disk queue of outgoing messages, bounded with drop-oldest.

    Args:
        path: SQLite file (created with its folder if missing).
        max_bytes: Bound on the stored payload bytes.
        max_messages: Optional bound on the number of stored messages.
        durable: fsync every write (survive power loss), not only process crashes.
    """

    def __init__(self, path: str | Path, max_bytes: int, max_messages: int | None = None,
                 durable: bool = False) -> None:
        if max_bytes < 1:
            raise ConfigError(f'spool max_bytes={max_bytes} must be positive')
        if max_messages is not None and max_messages < 1:
            raise ConfigError(f'spool max_messages={max_messages} must be positive')
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._conn = _connect(self.path, durable)
        try:
            with self._lock:
                self._conn.executescript(
                    'CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);'
                    'CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT,'
                    ' topic TEXT NOT NULL, payload BLOB NOT NULL, created_ns INTEGER NOT NULL);')
                # The epoch names this sequence space: a receiver that sees a new epoch knows
                # the sender's spool was recreated and restarts its expectations.
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)",
                                   (time.time_ns() // 1000,))
                for key in ('dropped', 'dropped_bytes', 'last_seq', 'dropped_disk_full'):
                    self._conn.execute('INSERT OR IGNORE INTO meta VALUES (?, 0)', (key,))
                self.epoch = self._meta('epoch')
                row = self._conn.execute(
                    'SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool').fetchone()
                self._count, self._bytes = _int(row[0]), _int(row[1])
        except (sqlite3.Error, TypeError, ValueError) as err:
            self._conn.close()  # a damaged file: do not keep its connection open
            raise SpoolError(f'cannot initialize spool {self.path}: {err}') from err

    def _meta(self, key: str) -> int:
        """A counter of the meta table.

        Raises:
            SpoolError: It is missing or not an integer (a damaged file).
        """
        with _reading(self.path, f'spool counter {key!r}'):
            return _int(self._conn.execute('SELECT v FROM meta WHERE k = ?',
                                           (key,)).fetchone()[0])

    def append(self, topic: str, payload: bytes, created_ns: int | None = None) -> int:
        """Store a message; return its sequence number (1, 2, ... never reused).

        Drops the oldest messages first when the bounds would be exceeded, and when the disk
        is full before them (counted in ``dropped_disk_full`` too).

        Raises:
            PayloadTooLargeError: the payload alone is over ``max_bytes``.
            SpoolError: the database cannot be written.
        """
        size = len(payload)
        if size > self.max_bytes:
            raise PayloadTooLargeError(f'message of {size} bytes on {topic!r} exceeds the '
                                       f'spool bound of {self.max_bytes} bytes')
        created_ns = time.time_ns() if created_ns is None else created_ns
        with self._lock:
            free = 0
            for _ in range(4):
                try:
                    return self._insert(topic, payload, created_ns, free)
                except sqlite3.OperationalError as err:
                    self._rollback()
                    if not _disk_full(err) or not self._count:
                        raise SpoolError(f'cannot append to spool {self.path}: {err}') from err
                    # The disk is full before the bound: make room by dropping the oldest
                    # messages (at least this message's size, then more), after moving the
                    # write-ahead log into the database so its space is reused.
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute('PRAGMA wal_checkpoint(RESTART)')
                    free = max(2 * free, size, self._bytes // 10)
                except (sqlite3.Error, TypeError, ValueError) as err:
                    self._rollback()
                    raise SpoolError(f'cannot append to spool {self.path}: {err}') from err
            raise SpoolError(f'cannot append to spool {self.path}: the disk stays full after '
                             'dropping older messages')

    def _insert(self, topic: str, payload: bytes, created_ns: int, free: int) -> int:
        """One append transaction; ``free``: bytes of old messages to drop beyond the bound
        (the disk is full), counted in ``dropped_disk_full``."""
        size = len(payload)
        self._conn.execute('BEGIN IMMEDIATE')
        self._make_room(size, free)
        cur = self._conn.execute(
            'INSERT INTO spool (topic, payload, created_ns) VALUES (?, ?, ?)',
            (topic, sqlite3.Binary(payload), created_ns))
        seq = int(cur.lastrowid or 0)
        self._conn.execute("UPDATE meta SET v = ? WHERE k = 'last_seq'", (seq,))
        self._conn.execute('COMMIT')
        self._count += 1
        self._bytes += size
        return seq

    def _make_room(self, size: int, free: int = 0) -> None:
        dropped = dropped_bytes = 0
        while self._count > 0 and (
                self._bytes + size > self.max_bytes or dropped_bytes < free
                or (self.max_messages is not None and self._count + 1 > self.max_messages)):
            seq, n = self._conn.execute(
                'SELECT seq, LENGTH(payload) FROM spool ORDER BY seq LIMIT 1').fetchone()
            self._conn.execute('DELETE FROM spool WHERE seq = ?', (seq,))
            self._count -= 1
            self._bytes -= int(n)
            dropped += 1
            dropped_bytes += int(n)
        if dropped:
            self._conn.execute("UPDATE meta SET v = v + ? WHERE k = 'dropped'", (dropped,))
            self._conn.execute("UPDATE meta SET v = v + ? WHERE k = 'dropped_bytes'",
                               (dropped_bytes,))
            if free:
                self._conn.execute("UPDATE meta SET v = v + ? WHERE k = 'dropped_disk_full'",
                                   (dropped,))

    def _rollback(self) -> None:
        try:
            self._conn.execute('ROLLBACK')
        except sqlite3.Error:
            pass  # no transaction was open: nothing to undo
        with _reading(self.path, 'spool size'):
            row = self._conn.execute(
                'SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool').fetchone()
            self._count, self._bytes = _int(row[0]), _int(row[1])

    def pending(self, after: int = 0, limit: int | None = None) -> list[SpoolEntry]:
        """Stored messages with ``seq > after``, oldest first.

        Raises:
            SpoolError: The store cannot be read, or a row is damaged.
        """
        with self._lock, _reading(self.path, 'spooled messages'):
            rows = self._conn.execute(
                'SELECT seq, topic, payload, created_ns FROM spool WHERE seq > ? ORDER BY seq'
                ' LIMIT ?', (after, -1 if limit is None else limit)).fetchall()
            return [SpoolEntry(_int(s), _str(t), _blob(p), _int(c)) for s, t, p, c in rows]

    def next_after(self, after: int) -> SpoolEntry | None:
        """The first stored message with ``seq > after``, or ``None``."""
        entries = self.pending(after, limit=1)
        return entries[0] if entries else None

    def first_seq(self) -> int | None:
        """Lowest stored sequence number (``None`` when empty)."""
        with self._lock, _reading(self.path, 'the first sequence number'):
            row = self._conn.execute('SELECT MIN(seq) FROM spool').fetchone()
            return None if row[0] is None else _int(row[0])

    def ack(self, seq: int) -> bool:
        """Remove one message; return whether it was stored."""
        return self._delete('seq = ?', seq) > 0

    def ack_through(self, seq: int) -> int:
        """Remove every message with ``seq`` or below (cumulative ack); return how many."""
        return self._delete('seq <= ?', seq)

    def _delete(self, where: str, seq: int) -> int:
        for attempt in range(2):
            try:
                return self._delete_once(where, seq)
            except SpoolError as err:
                cause = err.__cause__
                if attempt or not isinstance(cause, sqlite3.Error) or not _disk_full(cause):
                    raise
                # A full disk: move the write-ahead log into the database so its space is
                # reused, then try again.
                with self._lock, contextlib.suppress(sqlite3.Error):
                    self._conn.execute('PRAGMA wal_checkpoint(RESTART)')
        raise AssertionError('unreachable')  # pragma: no cover

    def _delete_once(self, where: str, seq: int) -> int:
        with self._lock:
            try:
                self._conn.execute('BEGIN IMMEDIATE')
                n, size = self._conn.execute(
                    f'SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM spool '
                    f'WHERE {where}', (seq,)).fetchone()
                if n:
                    self._conn.execute(f'DELETE FROM spool WHERE {where}', (seq,))
                self._conn.execute('COMMIT')
                n, size = _int(n), _int(size)
            except (sqlite3.Error, TypeError, ValueError) as err:
                self._rollback()
                raise SpoolError(f'cannot acknowledge seq {seq} in {self.path}: {err}') from err
            self._count -= int(n)
            self._bytes -= int(size)
            return int(n)

    def stats(self) -> SpoolStats:
        """Current counters."""
        with self._lock:
            dropped, dropped_bytes = self._meta('dropped'), self._meta('dropped_bytes')
            last, full = self._meta('last_seq'), self._meta('dropped_disk_full')
            with _reading(self.path, 'spool statistics'):
                row = self._conn.execute('SELECT MIN(seq) FROM spool').fetchone()
                first = None if row[0] is None else _int(row[0])
            return SpoolStats(self._count, self._bytes, dropped, dropped_bytes, first, last,
                              full)

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Accepted(NamedTuple):
    """What :meth:`Inbox.offer` decided about one message."""

    status: str  # 'accepted', 'duplicate', 'gap' (ahead of the next expected), 'stale'
    ack: int  # last sequence number stored in order (to acknowledge), 0 if none
    skipped: int  # messages the sender dropped (learned from its floor) and we stop awaiting


class Inbox:
    """The receiver's persistent dedup state and undelivered messages.

    One row per ``source`` (device id, or ``'cloud'``) holds its current epoch and the next
    sequence number expected. A message is accepted only in order (``seq == next``): a
    duplicate is re-acknowledged, one ahead of the expected is refused (the sender goes back
    and resends in order, so delivery stays ordered). Accepted messages wait in the ``inbox``
    table until :meth:`done` removes them after the application took them.

    Args:
        path: SQLite file.
        durable: fsync every write.
    """

    def __init__(self, path: str | Path, durable: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path, durable)
        try:
            with self._lock:
                self._conn.executescript(
                    'CREATE TABLE IF NOT EXISTS peers (source TEXT PRIMARY KEY,'
                    ' epoch INTEGER NOT NULL, next_seq INTEGER NOT NULL,'
                    ' skipped INTEGER NOT NULL DEFAULT 0);'
                    'CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY AUTOINCREMENT,'
                    ' source TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,'
                    ' topic TEXT NOT NULL, payload BLOB NOT NULL, created_ns INTEGER NOT NULL,'
                    ' received_ns INTEGER NOT NULL);')
        except (sqlite3.Error, ValueError) as err:
            self._conn.close()  # a damaged file: do not keep its connection open
            raise SpoolError(f'cannot initialize inbox {self.path}: {err}') from err

    def offer(self, source: str, epoch: int, seq: int, floor: int, topic: str,
              payload: bytes, created_ns: int) -> Accepted:
        """Store the message if it is the next one expected from ``source``.

        A newer ``epoch`` than the stored one means the sender's spool was recreated: the
        expectation restarts at its ``floor``. An older epoch is stale and ignored.
        """
        with self._lock:
            try:
                self._conn.execute('BEGIN IMMEDIATE')
                row = self._conn.execute('SELECT epoch, next_seq FROM peers WHERE source = ?',
                                         (source,)).fetchone()
                if row is None or epoch > _int(row[0]):
                    cur_epoch, nxt = epoch, max(1, floor)
                    self._conn.execute('INSERT OR REPLACE INTO peers VALUES (?, ?, ?, 0)',
                                       (source, epoch, nxt))
                else:
                    cur_epoch, nxt = _int(row[0]), _int(row[1])
                if epoch < cur_epoch:
                    self._conn.execute('COMMIT')
                    return Accepted('stale', 0, 0)
                skipped = 0
                if floor > nxt:
                    # The sender no longer holds nxt..floor-1 (dropped from its bounded spool).
                    skipped, nxt = floor - nxt, floor
                status = 'duplicate' if seq < nxt else 'gap' if seq > nxt else 'accepted'
                if status == 'accepted':
                    self._conn.execute(
                        'INSERT INTO inbox (source, epoch, seq, topic, payload, created_ns,'
                        ' received_ns) VALUES (?, ?, ?, ?, ?, ?, ?)',
                        (source, epoch, seq, topic, sqlite3.Binary(payload), created_ns,
                         time.time_ns()))
                    nxt += 1
                self._conn.execute(
                    'UPDATE peers SET next_seq = ?, skipped = skipped + ? WHERE source = ?',
                    (nxt, skipped, source))
                self._conn.execute('COMMIT')
            except (sqlite3.Error, TypeError, ValueError) as err:
                try:
                    self._conn.execute('ROLLBACK')
                except sqlite3.Error:
                    pass  # the failed statement already ended the transaction
                raise SpoolError(f'cannot store seq {seq} from {source!r} in {self.path}: '
                                 f'{err}') from err
            return Accepted(status, nxt - 1, skipped)

    def position(self, source: str) -> tuple[int, int] | None:
        """``(epoch, last sequence number stored)`` for ``source``, or ``None``."""
        with self._lock, _reading(self.path, f'the position of {source!r}'):
            row = self._conn.execute('SELECT epoch, next_seq FROM peers WHERE source = ?',
                                     (source,)).fetchone()
            return None if row is None else (_int(row[0]), _int(row[1]) - 1)

    def undelivered(self, limit: int = 64) -> list[tuple[int, InboxEntry]]:
        """Up to ``limit`` stored messages not yet handed over, in arrival order."""
        with self._lock, _reading(self.path, 'undelivered messages'):
            rows = self._conn.execute(
                'SELECT id, source, epoch, seq, topic, payload, created_ns, received_ns '
                'FROM inbox ORDER BY id LIMIT ?', (limit,)).fetchall()
            return [(_int(r[0]), InboxEntry(_str(r[1]), _int(r[2]), _int(r[3]), _str(r[4]),
                                            _blob(r[5]), _int(r[6]), _int(r[7])))
                    for r in rows]

    def done(self, row_id: int) -> None:
        """Forget a message the application has taken."""
        with self._lock:
            try:
                self._conn.execute('DELETE FROM inbox WHERE id = ?', (row_id,))
            except (sqlite3.Error, ValueError) as err:
                raise SpoolError(f'cannot mark inbox row {row_id} delivered: {err}') from err

    def undelivered_count(self) -> int:
        with self._lock, _reading(self.path, 'the undelivered count'):
            return _int(self._conn.execute('SELECT COUNT(*) FROM inbox').fetchone()[0])

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class LatestStore:
    """Persistent "latest value" per key, with a counter bumped on every change.

    The cloud keeps each device's current model-version announcement here, so it can repeat
    it to a device that (re)connects, also after the cloud restarted.
    """

    def __init__(self, path: str | Path, durable: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path, durable)
        try:
            with self._lock:
                self._conn.execute(
                    'CREATE TABLE IF NOT EXISTS latest (k TEXT PRIMARY KEY,'
                    ' counter INTEGER NOT NULL, value BLOB NOT NULL)')
        except (sqlite3.Error, ValueError) as err:
            self._conn.close()  # a damaged file: do not keep its connection open
            raise SpoolError(f'cannot initialize store {self.path}: {err}') from err

    def put(self, key: str, value: bytes) -> int:
        """Store ``value`` for ``key``; return its new counter (1, 2, ...)."""
        with self._lock:
            try:
                self._conn.execute(
                    'INSERT INTO latest VALUES (?, 1, ?) ON CONFLICT(k) DO UPDATE SET '
                    'counter = counter + 1, value = excluded.value',
                    (key, sqlite3.Binary(value)))
                row = self._conn.execute('SELECT counter FROM latest WHERE k = ?',
                                         (key,)).fetchone()
            except (sqlite3.Error, ValueError) as err:
                raise SpoolError(f'cannot store latest value of {key!r}: {err}') from err
        return int(row[0])

    def get(self, key: str) -> tuple[int, bytes] | None:
        """``(counter, value)`` for ``key``, or ``None``."""
        with self._lock, _reading(self.path, f'the latest value of {key!r}'):
            row = self._conn.execute('SELECT counter, value FROM latest WHERE k = ?',
                                     (key,)).fetchone()
            return None if row is None else (_int(row[0]), _blob(row[1]))

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._conn.close()
