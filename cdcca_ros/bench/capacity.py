"""The trainable set's ceiling: how far AKD lifts the student on one domain when nothing holds it.

Per drifted domain, a fresh copy of the shipped student is distilled from the teacher
(:func:`~cdcca_ros.sim.train_bundled.adaptation_check`: AKD, Eq. 6, on the teacher's
pseudo-labels of ``--samples`` samples of that domain with every token, ``--steps`` steps)
with no anchor, replay, L2-SP or gate, then scored on held-out samples of the domain and of the
source. This separates two reasons an adaptation run can stop short of the teacher: the
trainable set cannot express the shift (the ceiling here stays low however much data and
training it gets), or the run gives it too little (the ceiling here is high and the continual
stream's rounds stay below it). The source column shows what such unguarded training costs.

``summary``: ``drifted_mean_gain`` (mean over the domains of after - before, DA points),
``per_domain`` (before, after, teacher, source after) and the settings.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from cdcca_ros.bench.common import BenchContext, BenchResult, Target
from cdcca_ros.errors import ConfigError

NAME = 'capacity'
DESCRIPTION = ('ceiling of the student\'s trainable set: AKD on one domain\'s teacher labels '
               'alone, no anchor, replay or gate')
TARGETS = (
    Target('drifted_mean_gain', '>=', 25.0,
           'issue 14 (the trainable set can carry the +25 the continual stream asks for)'),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--domains', default=None,
                        help='comma-separated drifted domains (default: every built-in one)')
    parser.add_argument('--samples', type=int, default=None,
                        help='teacher-labelled samples a domain (default 1000, quick 8)')
    parser.add_argument('--steps', type=int, default=None,
                        help='AKD steps a domain (default 1000, quick 2)')
    parser.add_argument('--lr', type=float, default=2e-3,
                        help='AdamW learning rate (default 2e-3, the cloud node\'s akd.lr)')
    parser.add_argument('--eval-per-domain', type=int, default=None,
                        help='held-out samples scored a domain (default 300, quick 8)')


def run(ctx: BenchContext) -> BenchResult:
    """Distil each domain alone and score it (see the module docstring)."""
    from cdcca_ros.bench.adaptation import IMAGE_SIZE
    from cdcca_ros.bench.common import model_image_size
    from cdcca_ros.models import bundled
    from cdcca_ros.sim.domains import DRIFTED, SOURCE
    from cdcca_ros.sim.evaluate import EvalSpec, evaluate_model
    from cdcca_ros.sim.train_bundled import EVAL_START, AdaptSpec, adaptation_check

    args = ctx.args
    domains = [d.strip() for d in (args.domains or ','.join(DRIFTED)).split(',') if d.strip()]
    unknown = [d for d in domains if d not in DRIFTED]
    if unknown or not domains:
        raise ConfigError(f'--domains must name drifted domains of {DRIFTED}, got {unknown}')
    q = ctx.quick
    samples = args.samples or (8 if q else 1000)
    steps = args.steps or (2 if q else 1000)
    evals = args.eval_per_domain or (8 if q else 300)
    teacher = ctx.models.teacher()
    student_dir = bundled.resolve(ctx.models.spec('student'))
    size = model_image_size(ctx.models.student(), IMAGE_SIZE)
    taught = evaluate_model(teacher, EvalSpec(seed=ctx.seed, n=evals, start=EVAL_START,
                                              image_size=size, domains=tuple(domains)))
    per_domain: dict[str, dict[str, Any]] = {}
    rows = []
    for d in domains:
        t0 = time.perf_counter()
        spec = AdaptSpec(domain=d, samples=samples, steps=steps, batch_size=16, lr=args.lr,
                         eval_images=evals)
        out = adaptation_check(teacher, student_dir, spec, seed=ctx.seed, image_size=size,
                               progress=False)
        before, after = 100.0 * out['before'][d], 100.0 * out['after'][d]
        per_domain[d] = {'before': before, 'after': after, 'teacher': 100.0 * taught[d],
                         'source_before': 100.0 * out['before'][SOURCE],
                         'source_after': 100.0 * out['after'][SOURCE],
                         'train_s': out['train_s'], 'wall_s': round(time.perf_counter() - t0, 1)}
        p = per_domain[d]
        rows.append([d, f'{before:.1f}', f'{after:.1f}', f'{after - before:+.1f}',
                     f'{p["teacher"]:.1f}', f'{p["source_before"]:.1f} -> '
                                            f'{p["source_after"]:.1f}'])
        print(f'  {d}: {before:.1f} -> {after:.1f} (teacher {p["teacher"]:.1f}; source '
              f'{p["source_before"]:.1f} -> {p["source_after"]:.1f})', flush=True)
    gains = [p['after'] - p['before'] for p in per_domain.values()]
    summary = {'drifted_mean_gain': sum(gains) / len(gains), 'per_domain': per_domain,
               'samples': samples, 'steps': steps, 'lr': args.lr, 'eval_per_domain': evals,
               'domains': domains}
    notes = [f'AKD alone on {samples} teacher-labelled samples a domain (every token), '
             f'{steps} steps, lr {args.lr:g}, batch 16; no anchor, replay, L2-SP or gate, so '
             'the source column is what unguarded training costs.',
             'A high ceiling here and a lower continual result mean the stream gives the '
             'trainable set too little, not that it cannot learn the shift.']
    return BenchResult(summary=summary,
                       headers=['domain', 'before', 'after', 'gain', 'teacher',
                                'source before -> after'],
                       rows=rows, detail={'per_domain': per_domain}, notes=notes)
