"""Accuracy of models on every domain of the synthetic world (VQA-style scoring).

``python -m cdcca_ros.sim.evaluate --out FILE.json [--n N] [--seed S]`` prints a model x domain
table and writes ``{"teacher": {domain: acc}, "student": {domain: acc}, "source_domain": name}``
(plus what it was measured on under ``"eval"``). The samples are held out from training: they
are indices ``start .. start + n - 1`` of each domain's sequence (``start`` = 1,000,000 by
default, far beyond any training or validation index), question types cycling through all five.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdcca_ros.errors import ConfigError
from cdcca_ros.sim.domains import DRIFTED, SOURCE, get_domain
from cdcca_ros.sim.scoring import vqa_accuracy
from cdcca_ros.sim.world import World

if TYPE_CHECKING:  # pragma: no cover
    from cdcca_ros.models.base import MLLM

EVAL_START = 1_000_000
DEFAULT_DOMAINS: tuple[str, ...] = (SOURCE,) + DRIFTED


@dataclass(frozen=True)
class EvalSpec:
    """Which samples an accuracy is measured on.

    Attributes:
        seed: World seed.
        n: Samples per domain.
        start: First sample index of each domain.
        image_size: Side of the rendered images.
        domains: Domain names.
        batch_size: Images per ``answer()`` call.
        max_new_tokens: Generation limit.
    """

    seed: int = 0
    n: int = 200
    start: int = EVAL_START
    image_size: int = 64
    domains: tuple[str, ...] = field(default=DEFAULT_DOMAINS)
    batch_size: int = 100
    max_new_tokens: int = 6

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f'EvalSpec n={self.n}, batch_size={self.batch_size} and '
                              f'max_new_tokens={self.max_new_tokens} must be >= 1')
        if self.seed < 0 or self.start < 0:
            raise ConfigError(f'EvalSpec seed={self.seed} and start={self.start} must be >= 0')
        if not self.domains:
            raise ConfigError('EvalSpec needs at least one domain')
        for name in self.domains:
            get_domain(name)  # raises ConfigError naming the registered domains

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {'seed': self.seed, 'n': self.n, 'start': self.start,
                'image_size': self.image_size, 'domains': list(self.domains),
                'scoring': 'vqa_accuracy (min(#matching references / 3, 1)), greedy answer',
                'questions': 'World(seed).samples(domain, n, image_size, start): '
                             'question types cycle through all five by index'}


def evaluate_model(model: MLLM, spec: EvalSpec, progress: bool = False,
                   desc: str = 'eval') -> dict[str, float]:
    """Mean VQA accuracy of ``model.answer`` per domain of ``spec``."""
    from tqdm import tqdm

    world = World(spec.seed)
    out: dict[str, float] = {}
    for name in tqdm(spec.domains, desc=desc, disable=not progress, leave=False):
        samples = world.samples(name, spec.n, spec.image_size, start=spec.start)
        total = 0.0
        for s in range(0, len(samples), spec.batch_size):
            part = samples[s:s + spec.batch_size]
            results = model.answer([x.image for x in part], [x.question for x in part],
                                   max_new_tokens=spec.max_new_tokens)
            total += sum(vqa_accuracy(r.text, x.answers) for r, x in zip(results, part))
        out[name] = total / len(samples)
    return out


def evaluate_models(models: Mapping[str, MLLM], spec: EvalSpec,
                    progress: bool = False) -> dict[str, dict[str, float]]:
    """:func:`evaluate_model` for each named model: ``{model name: {domain: accuracy}}``."""
    return {name: evaluate_model(model, spec, progress, desc=f'eval {name}')
            for name, model in models.items()}


def format_table(table: Mapping[str, Mapping[str, float]], source: str | None = None) -> str:
    """A plain-text model x domain table in percent (``source`` marked with ``*``)."""
    domains = list(next(iter(table.values())))
    heads = [f'{d}*' if d == source else d for d in domains]
    width = max(8, *(len(h) + 1 for h in heads))
    name_w = max(8, *(len(n) + 1 for n in table))
    lines = ['model'.ljust(name_w) + ''.join(h.rjust(width) for h in heads)]
    for name, row in table.items():
        lines.append(name.ljust(name_w)
                     + ''.join(f'{100 * row[d]:.1f}'.rjust(width) for d in domains))
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    import os

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, required=True, help='JSON file to write')
    parser.add_argument('--n', type=int, default=200, help='samples per domain (default 200)')
    parser.add_argument('--seed', type=int, default=0, help='world seed (default 0)')
    parser.add_argument('--image-size', type=int, default=48,
                        help='side of the rendered images (default 48, the bundled models\' '
                             'own resolution; any size works, the models resize)')
    parser.add_argument('--start', type=int, default=EVAL_START,
                        help=f'first sample index per domain (default {EVAL_START})')
    parser.add_argument('--teacher', default='bundled:teacher', help='teacher model spec')
    parser.add_argument('--student', default='bundled:student', help='student model spec')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    args = parser.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    from cdcca_ros.models.bundled import load

    torch.set_num_threads(args.threads)
    spec = EvalSpec(seed=args.seed, n=args.n, start=args.start, image_size=args.image_size)
    models = {'teacher': load(args.teacher), 'student': load(args.student)}
    table = evaluate_models(models, spec, progress=True)
    print(format_table(table, SOURCE))
    record = {**table, 'source_domain': SOURCE, 'eval': spec.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
