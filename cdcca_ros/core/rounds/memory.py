"""What the cloud keeps of a device's uplink: every sample, its label, its split (no rclpy).

A :class:`Memory` holds one device's :class:`Record` s: the uplinked tokens (float16), the
question, what the device answered and with which adapter version, the teacher's label with
its confidence and the teacher's AKD targets (query features and fused answer states,
float16) so a replayed sample needs no teacher forward. It is

- **split** once, by a hash of the sample id: ``train`` (trained on), ``val`` (early stopping
  within a round) or ``gate`` (the update gate's evidence, never trained on). Audit samples --
  a random fraction of everything the device answered, sent whatever its uncertainty -- always
  go to ``gate``: they are the unbiased estimate of the live distribution.
- **bounded in bytes**: past ``max_bytes`` the oldest record of the largest cluster goes, so
  a long stay in one domain does not push the others out (per-cluster reservoir).
- **clustered**: the cloud does not know domains, so records are grouped by k-means on a
  token statistic (mean and spread of the uplinked tokens); replay samples clusters evenly
  and the gate checks every cluster large enough to say something.
- **persisted**, one safetensors file per record written atomically under ``directory``,
  so a restart resumes with everything (files that do not parse are skipped and counted).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cdcca_ros.core.atomic import atomic_write
from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from cdcca_ros.core.akd import AkdSample

SPLITS = ('train', 'val', 'gate')
RECORD_FORMAT = 'cdcca-memory-v1'
PULL_STATES = ('', 'requested', 'done', 'unavailable')


def split_of(sample_id: str, val_fraction: float, gate_fraction: float) -> str:
    """The split of a sample, a pure function of its id (stable across restarts and clouds).

    Raises:
        ConfigError: The fractions are negative or sum to 1 or more.
    """
    if val_fraction < 0 or gate_fraction < 0 or val_fraction + gate_fraction >= 1.0:
        raise ConfigError(f'val_fraction={val_fraction} and gate_fraction={gate_fraction} '
                          'must be >= 0 and leave room for training (sum < 1)')
    digest = hashlib.sha256(sample_id.encode('utf-8')).digest()
    u = int.from_bytes(digest[:8], 'big') / 2.0 ** 64
    if u < gate_fraction:
        return 'gate'
    if u < gate_fraction + val_fraction:
        return 'val'
    return 'train'


def audit_split(sample_id: str, gate_fraction: float) -> str:
    """The split of an audit sample: ``gate`` for a ``gate_fraction`` share (the gate's and
    the live audit's unbiased samples), ``train`` for the rest (a pure function of the id)."""
    if gate_fraction >= 1.0:
        return 'gate'
    return split_of(sample_id, 0.0, gate_fraction)


@dataclass
class TeacherTargets:
    """The teacher's side of Eq. 5-6 for one labelled sample (float16).

    Attributes:
        query: ``[L, C]`` teacher query features (Q-Former outputs / projector outputs).
        fused: ``[A, H]`` teacher LM states at the label's answer positions (eos included).
    """

    query: Tensor
    fused: Tensor

    def nbytes(self) -> int:
        return int(self.query.numel() * self.query.element_size()
                   + self.fused.numel() * self.fused.element_size())


@dataclass(eq=False)
class Record:
    """One uplinked sample as the cloud keeps it.

    Attributes:
        sample_id: The device's id of the sample (unique per device).
        seq: Arrival order on this cloud (never reused).
        tokens: ``[K, D]`` kept vision tokens (float16).
        indices: ``[K]`` positions of the kept tokens in ``0..N-1``; None: all ``N`` in order.
        question: The question the device was asked.
        split: ``train``, ``val`` or ``gate`` (see :func:`split_of`).
        device_answer: What the device answered.
        device_version: The adapter version that answered (-1: unknown).
        audit: Sent by the random audit stream (independent of uncertainty).
        label: The reference answer (teacher pseudo-label, or a given one); None: not yet
            labelled, or the teacher was too unsure to keep one.
        confidence: The teacher's confidence in ``label`` (geometric mean of its tokens'
            probabilities); 1.0 for a given label.
        label_tokens: How many tokens the label was made from.
        targets: The teacher's AKD targets for ``label`` (None: computed when needed).
        pull: Token pull state: '' (never asked), 'requested', 'done', 'unavailable'.
        cluster: Cluster id from the last :meth:`Memory.recluster` (-1: none yet).
        parent: For a question the cloud derived from an uplinked one
            (:mod:`cdcca_ros.core.rounds.extra_questions`), the uplinked sample's id; '' otherwise.
    """

    sample_id: str
    seq: int
    tokens: Tensor
    indices: Tensor | None
    question: str
    split: str = 'train'
    device_answer: str = ''
    device_version: int = -1
    audit: bool = False
    label: str | None = None
    confidence: float = float('nan')
    label_tokens: int = 0
    labelled: bool = False
    targets: TeacherTargets | None = None
    pull: str = ''
    pull_round: int = -1
    cluster: int = -1
    parent: str = ''
    feature: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    soft: tuple[Tensor, Tensor] | None = None
    """Anchor records: the base student's answer distribution at each answer position,
    its top entries as ``(token ids [A, k], probabilities [A, k])`` (not persisted)."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f'record {self.sample_id!r}: split {self.split!r} is not one of '
                              f'{SPLITS}')
        if self.pull not in PULL_STATES:
            raise ConfigError(f'record {self.sample_id!r}: pull state {self.pull!r}')
        if self.feature.size == 0:
            self.feature = token_feature(self.tokens)

    @property
    def usable(self) -> bool:
        """Labelled with a non-empty label."""
        return bool(self.label)

    @property
    def num_kept(self) -> int:
        return int(self.tokens.shape[0])

    def nbytes(self) -> int:
        """Bytes this record holds (tensors and strings)."""
        size = self.tokens.numel() * self.tokens.element_size()
        if self.indices is not None:
            size += self.indices.numel() * self.indices.element_size()
        if self.targets is not None:
            size += self.targets.nbytes()
        return int(size + len(self.question) + len(self.device_answer) + len(self.label or '')
                   + len(self.sample_id) + len(self.parent) + 64)

    def to_akd(self) -> AkdSample:
        """The sample as AKD trains on it (float32 tokens, the label as answer)."""
        from cdcca_ros.core.akd import AkdSample

        return AkdSample(tokens=self.tokens.float(), indices=self.indices,
                         question=self.question, answer=self.label)

    # ---------------------------------------------------------------- persistence
    def to_bytes(self) -> bytes:
        """The record as one safetensors blob (tensors + a JSON metadata entry)."""
        from safetensors.torch import save

        tensors = {'tokens': self.tokens.contiguous()}
        if self.indices is not None:
            tensors['indices'] = self.indices.contiguous()
        if self.targets is not None:
            tensors['targets.query'] = self.targets.query.contiguous()
            tensors['targets.fused'] = self.targets.fused.contiguous()
        meta = {'sample_id': self.sample_id, 'seq': self.seq, 'question': self.question,
                'split': self.split, 'device_answer': self.device_answer,
                'device_version': self.device_version, 'audit': self.audit,
                'label': self.label, 'confidence': self.confidence,
                'label_tokens': self.label_tokens, 'labelled': self.labelled,
                'pull': self.pull, 'pull_round': self.pull_round, 'parent': self.parent}
        return save(tensors, metadata={'format': RECORD_FORMAT, 'record': json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: Not a record written by :meth:`to_bytes`.
        """
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as err:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f'not a safetensors blob: {err}') from err
        meta_all = _safetensors_metadata(data)
        if meta_all.get('format') != RECORD_FORMAT:
            raise ValueError(f'format {meta_all.get("format")!r} is not {RECORD_FORMAT!r}')
        meta = json.loads(meta_all['record'])
        targets = None
        if 'targets.query' in tensors:
            targets = TeacherTargets(tensors['targets.query'], tensors['targets.fused'])
        confidence = meta.get('confidence')
        return cls(sample_id=str(meta['sample_id']), seq=int(meta['seq']),
                   tokens=tensors['tokens'], indices=tensors.get('indices'),
                   question=str(meta['question']), split=str(meta['split']),
                   device_answer=str(meta.get('device_answer', '')),
                   device_version=int(meta.get('device_version', -1)),
                   audit=bool(meta.get('audit', False)), label=meta.get('label'),
                   confidence=float('nan') if confidence is None else float(confidence),
                   label_tokens=int(meta.get('label_tokens', 0)),
                   labelled=bool(meta.get('labelled', False)), targets=targets,
                   pull=str(meta.get('pull', '')),
                   pull_round=int(meta.get('pull_round', -1)),
                   parent=str(meta.get('parent', '')))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header only, nothing else parsed)."""
    if len(data) < 8:
        raise ValueError('truncated safetensors header')
    n = int.from_bytes(data[:8], 'little')
    if n > len(data) - 8:
        raise ValueError('truncated safetensors header')
    header = json.loads(data[8:8 + n])
    meta = header.get('__metadata__') or {}
    return {str(k): str(v) for k, v in meta.items()}


def token_feature(tokens: Tensor) -> np.ndarray:
    """What records are clustered on: mean and spread of the kept tokens, ``[2 D]``.

    Domains move these first (fog lowers contrast, night shifts and darkens, clutter adds
    texture), and both are defined for any subset of tokens.
    """
    x = tokens.detach().float().cpu().numpy().reshape(-1, tokens.shape[-1])
    return np.concatenate([x.mean(axis=0), x.std(axis=0)]).astype(np.float32)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 25
           ) -> tuple[np.ndarray, np.ndarray]:
    """Plain k-means (k-means++ seeding, Lloyd iterations) on standardised ``points``.

    Returns:
        ``(labels [n], centroids [k, F])`` in the standardised space; ``k`` is capped at the
        number of distinct points.
    """
    n = points.shape[0]
    rng = np.random.default_rng(seed)
    k = max(1, min(k, n))
    centroids = points[[int(rng.integers(n))]]
    for _ in range(1, k):
        d2 = ((points[:, None, :] - centroids[None]) ** 2).sum(-1).min(axis=1)
        total = float(d2.sum())
        if total <= 0:
            break
        centroids = np.vstack([centroids, points[int(rng.choice(n, p=d2 / total))]])
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        d2 = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
        new = d2.argmin(axis=1)
        if (new == labels).all() and _ > 0:
            break
        labels = new
        for c in range(centroids.shape[0]):
            members = points[labels == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
    return labels, centroids


@dataclass
class MemoryStats:
    """Counters for diagnostics."""

    records: int = 0
    bytes: int = 0
    evicted: int = 0
    unreadable: int = 0
    clusters: int = 0


class Memory:
    """One device's records (see the module docstring).

    Args:
        max_bytes: Bound on what the records hold (tensors + strings).
        directory: Where records persist; None keeps them in memory only.
        clusters: Largest number of clusters.
        min_cluster: Records a cluster needs on average (fewer records: fewer clusters).
        seed: Seed of the clustering and of sampling.
    """

    def __init__(self, max_bytes: int, directory: Path | None = None, clusters: int = 6,
                 min_cluster: int = 24, seed: int = 0) -> None:
        if max_bytes < 1024:
            raise ConfigError(f'memory max_bytes must be >= 1024, got {max_bytes}')
        if clusters < 1 or min_cluster < 1:
            raise ConfigError(f'clusters={clusters} and min_cluster={min_cluster} must be >= 1')
        self.max_bytes = int(max_bytes)
        self.dir = directory
        self.max_clusters = clusters
        self.min_cluster = min_cluster
        self.seed = seed
        self.records: dict[str, Record] = {}
        self.next_seq = 0
        self.stats = MemoryStats()
        self._bytes = 0
        self._sizes: dict[str, int] = {}
        self._centroids: np.ndarray | None = None
        self._scale: tuple[np.ndarray, np.ndarray] | None = None
        self._rng = np.random.default_rng(seed)
        if directory is not None:
            self._load()

    # ---------------------------------------------------------------- contents
    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.records

    def get(self, sample_id: str) -> Record | None:
        return self.records.get(sample_id)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def add(self, record: Record) -> list[str]:
        """Store ``record`` (persisted), assign it a cluster, evict past the bound.

        Returns:
            The ids of the records evicted to make room.
        """
        if record.sample_id in self.records:
            self._drop(record.sample_id, count=False)
        record.seq = self.next_seq if record.seq < 0 else record.seq
        self.next_seq = max(self.next_seq, record.seq + 1)
        record.cluster = self._nearest(record.feature)
        self.records[record.sample_id] = record
        self._count(record)
        self._write(record)
        return self._evict()

    def update(self, record: Record) -> None:
        """Persist a changed record (label, targets, pull state) and recount its bytes."""
        self._bytes -= self._sizes.pop(record.sample_id, 0)
        self.records[record.sample_id] = record
        self._count(record)
        self._write(record)
        self._evict()

    def _count(self, record: Record) -> None:
        size = record.nbytes()
        self._sizes[record.sample_id] = size
        self._bytes += size

    def select(self, split: str | None = None, *, usable: bool | None = None,
               since_seq: int | None = None, before_seq: int | None = None,
               audit: bool | None = None) -> list[Record]:
        """Records in arrival order, filtered."""
        out = []
        for r in sorted(self.records.values(), key=lambda r: r.seq):
            if split is not None and r.split != split:
                continue
            if usable is not None and r.usable != usable:
                continue
            if since_seq is not None and r.seq < since_seq:
                continue
            if before_seq is not None and r.seq >= before_seq:
                continue
            if audit is not None and r.audit != audit:
                continue
            out.append(r)
        return out

    def unlabelled(self) -> list[Record]:
        """Records the teacher has not labelled yet (arrival order)."""
        return [r for r in self.select() if not r.labelled]

    def clear(self) -> None:
        """Forget every record (files too); sequence numbers are never reused."""
        for sample_id in list(self.records):
            self._drop(sample_id, count=False)

    # ---------------------------------------------------------------- clusters
    def recluster(self) -> int:
        """Refit the clusters on every record; returns their number."""
        records = list(self.records.values())
        if not records:
            self._centroids, self._scale = None, None
            self.stats.clusters = 0
            return 0
        points = np.stack([r.feature for r in records])
        mean, std = points.mean(axis=0), points.std(axis=0) + 1e-6
        k = max(1, min(self.max_clusters, len(records) // self.min_cluster))
        labels, centroids = kmeans((points - mean) / std, k, seed=self.seed)
        for r, c in zip(records, labels, strict=True):
            r.cluster = int(c)
        self._centroids, self._scale = centroids, (mean, std)
        self.stats.clusters = int(len(set(labels.tolist())))
        return self.stats.clusters

    def _nearest(self, feature: np.ndarray) -> int:
        if self._centroids is None or self._scale is None:
            return 0
        mean, std = self._scale
        z = (feature - mean) / std
        return int(((self._centroids - z) ** 2).sum(axis=1).argmin())

    def clusters_of(self, records: Iterable[Record]) -> dict[int, list[Record]]:
        """``records`` grouped by cluster (arrival order within each)."""
        out: dict[int, list[Record]] = {}
        for r in records:
            out.setdefault(r.cluster, []).append(r)
        return out

    def balanced_sampler(self, records: Sequence[Record]) -> Iterator[Record]:
        """Endless draws from ``records``: a cluster uniformly, then a record in it."""
        groups = list(self.clusters_of(records).values())
        if not groups:
            return
        while True:
            group = groups[int(self._rng.integers(len(groups)))]
            yield group[int(self._rng.integers(len(group)))]

    # ---------------------------------------------------------------- bounds
    def _evict(self) -> list[str]:
        evicted: list[str] = []
        while self._bytes > self.max_bytes and len(self.records) > 1:
            sizes: dict[int, int] = {}
            for r in self.records.values():
                sizes[r.cluster] = sizes.get(r.cluster, 0) + self._sizes[r.sample_id]
            largest = max(sizes, key=lambda c: sizes[c])
            victim = min((r for r in self.records.values() if r.cluster == largest),
                         key=lambda r: r.seq)
            self._drop(victim.sample_id)
            evicted.append(victim.sample_id)
        return evicted

    def _drop(self, sample_id: str, count: bool = True) -> None:
        record = self.records.pop(sample_id)
        self._bytes -= self._sizes.pop(sample_id, 0)
        if count:
            self.stats.evicted += 1
        if self.dir is not None:
            self._path(record).unlink(missing_ok=True)

    # ---------------------------------------------------------------- persistence
    def _path(self, record: Record) -> Path:
        assert self.dir is not None
        return self.dir / f'{record.seq:012d}.safetensors'

    def _write(self, record: Record) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(record), record.to_bytes())

    def _load(self) -> None:
        assert self.dir is not None
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob('*.safetensors')):
            try:
                record = Record.from_bytes(path.read_bytes())
            except (OSError, ValueError, KeyError):
                # A torn or foreign file: kept aside for a human, never trusted.
                self.stats.unreadable += 1
                path.rename(path.with_suffix('.unreadable'))
                continue
            self.records[record.sample_id] = record
            self._count(record)
            self.next_seq = max(self.next_seq, record.seq + 1)
        if self.records:
            self.recluster()
        self._evict()

    def summary(self) -> dict[str, Any]:
        """Counts for diagnostics and round reports."""
        self.stats.records = len(self.records)
        self.stats.bytes = self._bytes
        by_split = {s: 0 for s in SPLITS}
        usable = 0
        for r in self.records.values():
            by_split[r.split] += 1
            usable += int(r.usable)
        return {'records': len(self.records), 'bytes': self._bytes,
                'max_bytes': self.max_bytes, 'evicted': self.stats.evicted,
                'unreadable': self.stats.unreadable, 'clusters': self.stats.clusters,
                'usable': usable, **{f'split_{k}': v for k, v in by_split.items()}}


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (for reports)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)
