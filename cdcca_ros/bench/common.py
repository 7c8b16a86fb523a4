"""The benchmark harness: registry, common arguments, models, timing, tables and JSON records.

A bench is a module with ``NAME``, ``DESCRIPTION``, ``TARGETS`` (what its summary figures should
reach), ``add_arguments(parser)`` and ``run(ctx) -> BenchResult``. :func:`run_bench` parses the
common arguments (``--out``, ``--seed``, ``--quick``, ``--threads``, ``--teacher``,
``--student``), prepares the models, runs the bench, prints its table and the targets, and
writes the JSON record::

    {"bench", "description", "created", "seed", "quick", "args", "machine", "duration_s",
     "summary": {...named figures...}, "targets": [{"key", "op", "value", "measured", "met"}],
     "table": {"headers", "rows"}, "notes": [...], "detail": {...}}

Figures that compare speeds are ratios measured in one run, with the two sides interleaved
sample by sample, so the machine's load affects both alike.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cdcca_ros.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

# Bench name -> module; modules (and with them torch, rclpy) are imported only when run.
BENCHES: dict[str, str] = {
    'uplink': 'cdcca_ros.bench.uplink',
    'uts_cost': 'cdcca_ros.bench.uts_cost',
    'node_overhead': 'cdcca_ros.bench.node_overhead',
    'downlink': 'cdcca_ros.bench.downlink',
    'apply': 'cdcca_ros.bench.apply',
    'link': 'cdcca_ros.bench.link',
    # The three families at their real sizes (random weights), and the uplink there.
    'realscale': 'cdcca_ros.bench.realscale',
    # The paper's tables on the drifting world (accuracy per round, ablation, bytes).
    'table1': 'cdcca_ros.bench.table1',
    'table2': 'cdcca_ros.bench.table2',
    'table3': 'cdcca_ros.bench.table3',
    'table4': 'cdcca_ros.bench.table4',
    'table5': 'cdcca_ros.bench.table5',
    # Continual adaptation over a long stream with revisits (the guarded round).
    'continual': 'cdcca_ros.bench.continual',
    # The trainable set's ceiling: AKD on one domain alone, nothing holding it.
    'capacity': 'cdcca_ros.bench.capacity',
    # What the uplink's coding does to the teacher's labels, per domain.
    'label_fidelity': 'cdcca_ros.bench.label_fidelity',
    # Many devices against the cloud on Ray: throughput, fairness, a worker killed.
    'fleet': 'cdcca_ros.bench.fleet',
    # Reliability (issue 16): hostile input at volume, and hours of running.
    'fuzz': 'cdcca_ros.bench.fuzz',
    'soak': 'cdcca_ros.bench.soak',
}

TINY_SPEC = 'tiny'
DEFAULT_TEACHER = 'bundled:teacher'
DEFAULT_STUDENT = 'bundled:student'
KEY_SEP = '/'
OPS = ('<=', '>=', '==')


# --- records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What one summary figure should reach.

    Attributes:
        key: Path of the figure in the summary, parts joined by ``'/'``
            (e.g. ``'codecs/sparse@1bit/bits_per_param'``).
        op: ``'<='``, ``'>='`` or ``'=='``.
        value: The bound.
        source: Where the target comes from (e.g. ``'issue 4'``).
    """

    key: str
    op: str
    value: float
    source: str = ''

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f'Target {self.key!r}: op must be one of {OPS}, got {self.op!r}')

    def measured(self, summary: Mapping[str, Any]) -> Any:
        """The figure this target reads from ``summary`` (None when absent)."""
        node: Any = summary
        for part in self.key.split(KEY_SEP):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def met(self, summary: Mapping[str, Any]) -> bool | None:
        """Whether the figure meets the bound; None when it is missing or not a number."""
        value = self.measured(summary)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            return None
        if self.op == '<=':
            return value <= self.value
        if self.op == '>=':
            return value >= self.value
        return value == self.value

    def text(self) -> str:
        """``key op value`` for tables."""
        return f'{self.key} {self.op} {self.value:g}'


@dataclass
class BenchResult:
    """What a bench hands back to the harness.

    Attributes:
        summary: The named figures (JSON-ready: numbers, strings, dicts, lists, None).
        headers: Column names of the printed table.
        rows: Rows of the printed table.
        detail: Everything else worth keeping.
        notes: Lines for the reader (how a figure was measured, what was chosen).
    """

    summary: dict[str, Any]
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --- models ----------------------------------------------------------------------------------
def build_tiny_pair(seed: int) -> tuple[MLLM, MLLM]:
    """A random tiny BLIP-2 teacher and a smaller student sharing its ViT (LoRA configured).

    Shapes like the bundled models' (64 px, 8 px patches), far fewer weights; answers are
    meaningless. For ``--teacher tiny --student tiny`` (tests, or before the bundled models
    exist).
    """
    import torch

    from cdcca_ros.models import build_tiny
    from cdcca_ros.models.base import TrainableConfig
    from cdcca_ros.sim.questions import vocabulary

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = build_tiny('blip2', vocabulary(), seed=seed + 1, qformer_layers=2,
                             dropout=0.0)
        student = build_tiny('blip2', vocabulary(), seed=seed + 2, qformer_layers=1,
                             dropout=0.1, vision_from=teacher)
    student.configure_trainable(TrainableConfig(lora_r=4, lora_alpha=8,
                                                lora_targets=('q_proj', 'k_proj', 'v_proj',
                                                              'out_proj', 'fc1', 'fc2',
                                                              'query', 'key', 'value')))
    return teacher, student


class Models:
    """The bench's model specs, resolved to something :func:`bundled.load` reads.

    ``'tiny'`` builds a tiny pair once (:func:`build_tiny_pair`) and saves it in ``workdir``;
    any other spec (``bundled:<name>``, a directory, a hub id) is loaded as the nodes load it.
    Every call of :meth:`student` / :meth:`teacher` loads a fresh copy, as a device and a cloud
    each hold their own.
    """

    def __init__(self, teacher: str, student: str, workdir: Path, seed: int) -> None:
        if (teacher == TINY_SPEC) != (student == TINY_SPEC):
            raise ConfigError(f'--teacher {teacher!r} and --student {student!r}: "tiny" builds '
                              'a matching pair, so give it for both or for neither')
        self.teacher_spec = teacher
        self.student_spec = student
        self._workdir = workdir
        self._seed = seed
        self._paths: dict[str, str] | None = None

    def spec(self, which: str) -> str:
        """A spec a node's ``model`` parameter (or :func:`bundled.load`) accepts for
        ``'teacher'`` or ``'student'`` (a tiny pair is built and saved first)."""
        return self._resolve(which)

    def _resolve(self, which: str) -> str:
        spec = self.teacher_spec if which == 'teacher' else self.student_spec
        if spec != TINY_SPEC:
            return spec
        if self._paths is None:
            teacher, student = build_tiny_pair(self._seed)
            self._paths = {'teacher': str(self._workdir / 'tiny-teacher'),
                           'student': str(self._workdir / 'tiny-student')}
            teacher.save(self._paths['teacher'])
            student.save(self._paths['student'])
        return self._paths[which]

    def student(self) -> MLLM:
        """A fresh copy of the student (eval mode, trainable set configured)."""
        from cdcca_ros.models import bundled

        return bundled.load(self._resolve('student'))

    def teacher(self) -> MLLM:
        """A fresh copy of the teacher (eval mode)."""
        from cdcca_ros.models import bundled

        return bundled.load(self._resolve('teacher'))

    def describe(self) -> dict[str, str]:
        """The specs, for the JSON record."""
        return {'teacher': self.teacher_spec, 'student': self.student_spec}


@dataclass
class BenchContext:
    """What a bench's ``run`` gets.

    Attributes:
        args: The parsed arguments (common and the bench's own).
        models: The model specs.
        workdir: A temporary folder removed after the run.
    """

    args: argparse.Namespace
    models: Models
    workdir: Path

    @property
    def seed(self) -> int:
        return int(self.args.seed)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)


# --- timing and statistics -----------------------------------------------------------------
def ms_since(t0: float) -> float:
    """Milliseconds since ``t0`` (a :func:`time.perf_counter` value)."""
    return (time.perf_counter() - t0) * 1000.0


def timed_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; returns (milliseconds, its result)."""
    t0 = time.perf_counter()
    out = fn()
    return ms_since(t0), out


def median(values: Iterable[float]) -> float:
    """Median, NaN for no value."""
    values = list(values)
    return float(statistics.median(values)) if values else math.nan


def describe_ms(values: Sequence[float]) -> dict[str, float | int]:
    """``{n, median, p10, p90, min, max}`` of a list of times."""
    if not values:
        return {'n': 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))])

    return {'n': len(values), 'median': median(values), 'p10': pct(0.1), 'p90': pct(0.9),
            'min': float(ordered[0]), 'max': float(ordered[-1])}


def ratio(num: float, den: float) -> float:
    """``num / den``; NaN when ``den`` is 0 or either side is not finite."""
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return math.nan
    return num / den


# --- machine, JSON, tables -----------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU count, torch version and threads, platform, Python, load average."""
    info: dict[str, Any] = {
        'cpu_count': os.cpu_count(),
        'platform': platform.platform(),
        'machine': platform.machine(),
        'python': platform.python_version(),
    }
    if hasattr(os, 'sched_getaffinity'):
        info['cpus_usable'] = len(os.sched_getaffinity(0))
    if hasattr(os, 'getloadavg'):
        info['loadavg'] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info['torch'] = torch.__version__
        info['torch_threads'] = torch.get_num_threads()
        info['cuda'] = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        info['torch'] = None
    return info


def jsonable(value: Any) -> Any:
    """``value`` with numpy/torch scalars as Python numbers, paths as strings, NaN/inf as None
    (strict JSON has no NaN), tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, 'item') and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as strict JSON (atomic replace; parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(jsonable(record), indent=2, allow_nan=False) + '\n'
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(value: Any) -> str:
    """A table cell: floats with 4 significant digits, None as '-'."""
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        if not math.isfinite(value):
            return '-'
        return f'{value:.4g}'
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns right-aligned (the first left-aligned)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            if i < len(widths):
                widths[i] = max(widths[i], len(c))
    def line(row: Sequence[str]) -> str:
        return '  '.join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(row))
    out = [line(list(headers)), line(['-' * w for w in widths])]
    out.extend(line(row) for row in cells)
    return '\n'.join(out)


def target_rows(targets: Sequence[Target], summary: Mapping[str, Any]
                ) -> list[dict[str, Any]]:
    """One record per target: key, op, bound, measured value, met."""
    return [{'key': t.key, 'op': t.op, 'value': t.value, 'source': t.source,
             'measured': jsonable(t.measured(summary)), 'met': t.met(summary)}
            for t in targets]


# --- plug-ins ----------------------------------------------------------------------------------
def load_plugin(spec: str) -> ModuleType:
    """Import a module by name, or a Python file by path (for shifts and domains registered
    from outside the package).

    Raises:
        ConfigError: It cannot be found or imported.
    """
    import importlib.util

    path = Path(spec)
    try:
        if spec.endswith('.py') or path.is_file():
            if not path.is_file():
                raise ConfigError(f'plug-in file {spec!r} does not exist')
            module_spec = importlib.util.spec_from_file_location(f'cdcca_plugin_{path.stem}',
                                                                 path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except ImportError as err:
        raise ConfigError(f'cannot import plug-in {spec!r}: {err}') from err


# --- running ---------------------------------------------------------------------------------
def load_bench(name: str) -> ModuleType:
    """The module of bench ``name``.

    Raises:
        ConfigError: Unknown name.
    """
    if name not in BENCHES:
        raise ConfigError(f'unknown bench {name!r}; known: {", ".join(BENCHES)}')
    return importlib.import_module(BENCHES[name])


def make_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    """The argument parser of one bench: the common arguments and the bench's own."""
    parser = argparse.ArgumentParser(prog=f'python -m cdcca_ros.bench {name}',
                                     description=module.DESCRIPTION)
    parser.add_argument('--out', type=Path, required=True, help='JSON file to write')
    parser.add_argument('--seed', type=int, default=0, help='seed of the world and the models')
    parser.add_argument('--quick', action='store_true',
                        help='reduced sizes (seconds; used by the tests)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: steadier on a shared machine)')
    parser.add_argument('--teacher', default=DEFAULT_TEACHER,
                        help=f'teacher model spec (default {DEFAULT_TEACHER}; "tiny": a '
                             'random tiny pair built in-process)')
    parser.add_argument('--student', default=DEFAULT_STUDENT,
                        help=f'student model spec (default {DEFAULT_STUDENT})')
    module.add_arguments(parser)
    return parser


def restore_environ(saved: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal to ``saved`` again (set, changed and removed variables)."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def run_bench(name: str, argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv``, run bench ``name``, print its tables and write its JSON record.

    Returns:
        The record written.
    """
    module = load_bench(name)
    args = make_parser(name, module).parse_args(list(argv))
    if args.seed < 0 or args.threads < 1:
        raise ConfigError(f'--seed must be >= 0 and --threads >= 1, got {args.seed}, '
                          f'{args.threads}')
    # A bench never changes its caller's environment (a test process runs benches in itself):
    # everything set below or by the bench (ROS domain, DDS profile...) is undone after it.
    saved_env = dict(os.environ)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # model save/load bars would drown the tables

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f'cdcca-bench-{name}-') as tmp:
            workdir = Path(tmp)
            ctx = BenchContext(args=args, models=Models(args.teacher, args.student, workdir,
                                                        args.seed), workdir=workdir)
            result: BenchResult = module.run(ctx)
    finally:
        torch.set_num_threads(threads_before)
        restore_environ(saved_env)
    duration = time.perf_counter() - t0
    targets = target_rows(module.TARGETS, result.summary)
    record = {
        'bench': name, 'description': module.DESCRIPTION,
        'created': _dt.datetime.now(_dt.UTC).isoformat(timespec='seconds'),
        'seed': args.seed, 'quick': args.quick,
        'args': {k: v for k, v in vars(args).items()}, 'models': ctx.models.describe(),
        'machine': machine, 'duration_s': round(duration, 2),
        'summary': result.summary, 'targets': targets,
        'table': {'headers': result.headers, 'rows': result.rows},
        'notes': result.notes, 'detail': result.detail,
    }
    record['machine']['loadavg_end'] = ([round(x, 2) for x in os.getloadavg()]
                                        if hasattr(os, 'getloadavg') else None)
    print(f'== {name}: {module.DESCRIPTION}')
    if result.rows:
        print(format_table(result.headers, result.rows))
    print()
    print(format_table(['target', 'measured', 'met'],
                       [[f'{t["key"]} {t["op"]} {t["value"]:g}', t['measured'],
                         '-' if t['met'] is None else t['met']] for t in targets]))
    for note in result.notes:
        print(f'  * {note}')
    write_json(args.out, record)
    print(f'wrote {args.out} ({duration:.1f} s)')
    sys.stdout.flush()
    return record


# --- the device's defaults and the world's samples ----------------------------------------
# Sample indices the benches draw from: beyond the bundled models' training (0..) and
# validation (500,000..) ranges; 1,000,000.. is the held-out evaluation range of sim.evaluate.
BENCH_START = 1_500_000
EVAL_START = 1_000_000


def device_params(**overrides: Any) -> dict[str, Any]:
    """The device node's parameter values: table defaults, then ``overrides`` (checked)."""
    from cdcca_ros.nodes.tables import validate

    return validate('device_node', overrides)


def device_uts_config(params: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """The :class:`UtsConfig` a device node builds from its ``uts.*`` parameters (``params``:
    a full device parameter set, e.g. with a bench's ``--device`` overrides; None: the table
    defaults).

    Mirrors ``cdcca_ros.nodes.uts_node.uts_config`` (which imports rclpy) on the table
    defaults: a packing UTS does not do itself (``basis``, the default) is ``ecq`` here, the
    node's fallback and the packing of its pulls and audit samples; :func:`device_uplink`
    builds the uplink as the node does, basis included. ``overrides`` are ``UtsConfig``
    fields.
    """
    from dataclasses import replace

    from cdcca_ros.core.uts import PACK_DTYPES, UtsConfig

    p = device_params() if params is None else params
    pack = p['uts.pack_dtype'] if p['uts.pack_dtype'] in PACK_DTYPES else 'ecq'
    cfg = UtsConfig(mc_masks=p['uts.mc_masks'], dropout_p=p['uts.dropout_p'],
                    stage1_mode=p['uts.stage1_mode'],
                    stage1_threshold=p['uts.entropy_threshold'],
                    stage1_fraction=p['uts.top_fraction'], stage1_window=p['uts.window'],
                    stage2_mode=p['uts.stage2_mode'], beta=p['uts.beta'],
                    keep_ratio=p['uts.keep_ratio'], pack_dtype=pack,
                    audit_fraction=p['uts.audit_fraction'])
    return replace(cfg, **overrides)


def device_uplink(spec: str, space: Any, features: Callable[..., Any],
                  params: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """The uplink a device node builds for the student ``spec`` from its ``uts.*`` defaults
    (mirrors ``uts_node``'s pipeline): the ``uts.pack_dtype`` packing; for ``basis`` the
    token basis beside the model (``uplink_basis.safetensors``) with stage 2 keeping
    ``uts.basis_keep_ratio``, or, when the model has none, ``ecq`` at ``uts.keep_ratio`` (the
    node's fallback). ``params``: a full device parameter set (None: the table defaults);
    ``overrides`` are ``UtsConfig`` fields (a ``keep_ratio`` given applies whatever the
    packing).

    Returns:
        An :class:`~cdcca_ros.core.uplink.pipeline.UplinkPipeline`; its ``packing`` says
        which packing is in force.
    """
    from dataclasses import replace

    from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
    from cdcca_ros.core.uplink.pipeline import BASIS, UplinkPipeline
    from cdcca_ros.models import bundled

    p = device_params() if params is None else params
    cfg = device_uts_config(p, **overrides)
    packing, basis = p['uts.pack_dtype'], None
    if packing == BASIS:
        path = Path(bundled.resolve(spec)) / BASIS_FILE
        if path.is_file():
            basis = TokenBasis.load(path, space_id(space))
            if 'keep_ratio' not in overrides:
                cfg = replace(cfg, keep_ratio=p['uts.basis_keep_ratio'])
        else:
            packing = 'ecq'
    return UplinkPipeline(cfg, features, has_cls=space.has_cls, packing=packing, basis=basis,
                          budget_bytes=p['uts.budget_bytes'],
                          max_error=p['uts.basis_max_error'],
                          audit_packing=p['uts.audit_packing'])


def cloud_token_basis(spec: str, space: Any) -> Any:
    """The token basis a cloud node decodes ``basis`` samples of the student ``spec`` with
    (``uplink_basis`` empty: the file beside the student; mirrors ``cloud_node.cloud_basis``),
    loaded on its own as the cloud does; None when there is none."""
    from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
    from cdcca_ros.models import bundled

    path = Path(bundled.resolve(spec)) / BASIS_FILE
    return TokenBasis.load(path, space_id(space)) if path.is_file() else None


def model_image_size(model: Any, default: int = 64) -> int:
    """Side of the square images ``model``'s vision encoder takes (what it resizes to)."""
    config = getattr(getattr(model, 'torch_model', None), 'config', None)
    vision = getattr(config, 'vision_config', None)
    size = getattr(vision, 'image_size', None)
    return int(size) if isinstance(size, int) and size > 0 else default


def camera_size() -> tuple[int, int]:
    """``(width, height)`` of the camera node's default frames (640x480)."""
    from cdcca_ros.nodes.tables import defaults

    cam = defaults('camera_node')
    return int(cam['width']), int(cam['height'])


def world_samples(seed: int, domains: Sequence[str], n_per_domain: int,
                  image_size: int | tuple[int, int], start: int = BENCH_START) -> list[Any]:
    """``n_per_domain`` samples of each domain, interleaved domain by domain."""
    from cdcca_ros.sim.world import World

    world = World(seed)
    per = {d: world.samples(d, n_per_domain, image_size, start=start) for d in domains}
    return [per[d][i] for i in range(n_per_domain) for d in domains]


def param_overrides(items: Sequence[str], node: str) -> dict[str, Any]:
    """``PARAM=VALUE`` strings (a bench's repeatable ``--cloud`` / ``--device``) as validated,
    typed parameters of ``node``'s table: only the parameters named (merge them over the
    table's defaults with :func:`~cdcca_ros.nodes.tables.validate`; returning every default
    here made the fleet bench's overrides of its own profile silently fall back to them).

    Raises:
        ConfigError: An item is not ``PARAM=VALUE`` with a known parameter, or a value is out
            of its parameter's range.
    """
    from cdcca_ros.nodes.tables import TABLES

    table = {p.name: p for p in TABLES[node]}
    flag = '--cloud' if node == 'cloud_node' else '--device'
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition('=')
        if not sep or name not in table:
            raise ConfigError(f'{flag} {item!r}: not PARAM=VALUE with a known {node} parameter')
        kind = table[name].type
        try:
            value = text.lower() in ('1', 'true', 'yes') if kind is bool else kind(text)
        except ValueError as err:
            raise ConfigError(f'{flag} {item!r}: {err}') from err
        out[name] = table[name].check(value)
    return out
