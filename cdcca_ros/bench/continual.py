"""Continual adaptation over a long stream with revisits: better where it works, never worse.

Per seed, one device answers a long schedule of domain visits (default 12, every drifted
domain visited at least twice and the source three times, >= 200 answered samples each;
``--schedule`` takes any registered domains, yours included). Rounds are triggered as the cloud
node triggers them (``round.min_samples`` pending, or ``round.max_wait_s`` after the first on a
simulated clock of ``--rate`` answers a second). After every round, every domain's held-out
accuracy (``--eval-per-domain``, default 300) is measured: DA and MC as in Table 1
(:mod:`cdcca_ros.bench.adaptation`).

Rows (:mod:`cdcca_ros.bench.stream`): source-only; TENT (device entropy minimisation); L_CE-only
(every sample with every token, teacher labels, L_CE alone, on the guarded round); CD-CCA
ungated (UTS + AKD + DWC on the paper's round, every result shipped, as the project shipped
before the guard); CD-CCA guarded (the default: UTS with its audit stream and token pulls,
AKD on new + replay + anchor with early stopping, the update gate, the live audit and the
device's entropy guard); the oracle (every sample, every token, true labels, the guarded
round's training without the gate: the ceiling of the trainable set).

``summary`` (guarded default, means over seeds unless named): see :data:`TARGETS` and the
issue; ``per_seed`` holds every figure per seed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_ros.bench.adaptation import markdown_table, plot_path, pyplot, save_figure
from cdcca_ros.bench.common import BenchContext, BenchResult, Target, param_overrides
from cdcca_ros.bench.stream import (
    CE_ONLY,
    DEFAULT_SCHEDULE,
    GUARDED,
    METHODS,
    ORACLE,
    SOURCE_ONLY,
    TENT,
    UNGATED,
    ContinualStream,
    RunRecord,
    drifted_mean,
    paired_interval,
    parse_schedule,
    worst_regression,
    worst_round_drop,
)
from cdcca_ros.errors import ConfigError

NAME = 'continual'
DESCRIPTION = ('continual adaptation over a long stream of domain visits with revisits: '
               'accuracy of every domain after every round, per method')
TARGETS = (
    Target('final_drifted_gain_over_source_only', '>=', 25.0, 'issue 14'),
    Target('min_seed_gain_over_source_only', '>=', 20.0, 'issue 14'),
    Target('gain_over_ce_only', '>=', -2.0, 'issue 14'),
    Target('uplink_ratio_vs_ce_only', '<=', 0.5, 'issue 14'),
    Target('gain_over_tent', '>=', 0.0, 'issue 14 (above TENT)'),
    Target('oracle_share', '>=', 0.75, 'issue 14 (>= 75% of the oracle\'s gain)'),
    Target('source_min', '>=', 96.0, 'issue 14 (source >= 96 after every round)'),
    Target('worst_regression', '<=', 2.0, 'issue 14'),
    Target('worst_round_drop', '<=', 5.0, 'issue 14'),
)
QUICK_SCHEDULE = 'source:24,fog:48,source:24'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--seeds', default=None,
                        help='comma-separated seeds (default: --seed only); e.g. 0,1,2')
    parser.add_argument('--schedule', default=None,
                        help=f'domain visits "domain:samples,..." (default {DEFAULT_SCHEDULE}; '
                             f'quick {QUICK_SCHEDULE})')
    parser.add_argument('--eval-per-domain', type=int, default=None,
                        help='held-out samples per domain (default 300, quick 20)')
    parser.add_argument('--rate', type=float, default=0.5,
                        help='answers a second of the simulated robot (drives '
                             'round.max_wait_s; default 0.5)')
    parser.add_argument('--methods', default=','.join(METHODS),
                        help=f'rows to run (default all: {",".join(METHODS)})')
    parser.add_argument('--cloud', action='append', default=[], metavar='PARAM=VALUE',
                        help='override a cloud_node parameter (repeatable), e.g. '
                             'guard.max_steps=200')
    parser.add_argument('--device', action='append', default=[], metavar='PARAM=VALUE',
                        help='override a device_node parameter (repeatable)')
    parser.add_argument('--merge', nargs='+', default=None, metavar='FILE.json',
                        help='combine records of this bench written before (e.g. one per '
                             'seed, run in parallel) into one summary; nothing is run')
    parser.add_argument('--plugin', action='append', default=[], metavar='MODULE|FILE.py',
                        help='import a module or a Python file first (it may register shifts '
                             'and domains, e.g. examples/unseen_shifts.py)')


def _seed_figures(runs: dict[str, RunRecord], stream: ContinualStream,
                  teacher: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Every figure of one seed (the summary's keys, per seed)."""
    from cdcca_ros.sim.domains import SOURCE

    drifted = stream.drifted
    base = runs[SOURCE_ONLY.name].final()
    out: dict[str, Any] = {'seed': stream.seed}

    def final(name: str) -> float | None:
        return drifted_mean(runs[name].final(), drifted) if name in runs else None

    ours = runs.get(GUARDED.name)
    src = drifted_mean(base, drifted)
    out['source_only_drifted'] = src
    out['teacher_drifted'] = drifted_mean(teacher, drifted)
    out['final_drifted'] = {name: drifted_mean(r.final(), drifted) for name, r in runs.items()}
    out['final_per_domain'] = {name: {d: r.final()[d]['da'] for d in stream.domains}
                               for name, r in runs.items()}
    out['uplink_bytes'] = {name: r.uplink_bytes + r.pull_bytes for name, r in runs.items()}
    out['downlink_bytes'] = {name: r.downlink_bytes for name, r in runs.items()}
    if ours is None:
        return out
    g = final(GUARDED.name)
    assert g is not None
    out['gain_over_source_only'] = g - src
    if CE_ONLY.name in runs:
        out['gain_over_ce_only'] = g - final(CE_ONLY.name)  # type: ignore[operator]
        ce_bytes = runs[CE_ONLY.name].uplink_bytes
        out['uplink_ratio_vs_ce_only'] = ((ours.uplink_bytes + ours.pull_bytes) / ce_bytes
                                          if ce_bytes else None)
        out['gain_over_ce_only_ci95'] = list(paired_interval(
            ours.final_scores, runs[CE_ONLY.name].final_scores, drifted, stream.seed))
    if TENT.name in runs:
        out['gain_over_tent'] = g - final(TENT.name)  # type: ignore[operator]
    if UNGATED.name in runs:
        out['gain_over_ungated'] = g - final(UNGATED.name)  # type: ignore[operator]
    if ORACLE.name in runs:
        oracle_gain = final(ORACLE.name) - src  # type: ignore[operator]
        out['oracle_gain_over_source_only'] = oracle_gain
        out['oracle_share'] = (g - src) / oracle_gain if oracle_gain > 0 else None
    out['gain_over_source_only_ci95'] = list(paired_interval(
        ours.final_scores, runs[SOURCE_ONLY.name].final_scores, drifted, stream.seed))
    out['worst_regression'] = worst_regression(ours, base)
    out['worst_round_drop'] = worst_round_drop(ours)
    out['source_final'] = ours.final()[SOURCE]['da']
    out['source_min'] = min(cp.accuracy[SOURCE]['da'] for cp in ours.checkpoints)
    out['rounds'] = len(ours.rounds)
    out['rounds_refused'] = ours.refused
    out['rounds_shipped'] = ours.shipped
    out['rollbacks'] = ours.rollbacks + ours.local_rollbacks
    out['label_accuracy'] = ours.label_accuracy
    out['derived_label_accuracy'] = ours.derived_label_accuracy
    for name in (UNGATED.name, CE_ONLY.name):
        if name in runs:
            key = 'ungated' if name == UNGATED.name else 'ce_only'
            out[f'{key}_worst_regression'] = worst_regression(runs[name], base)
            out[f'{key}_worst_round_drop'] = worst_round_drop(runs[name])
            out[f'{key}_source_min'] = min(cp.accuracy[SOURCE]['da']
                                           for cp in runs[name].checkpoints)
    return out


def _mean(values: list[Any]) -> float | None:
    got = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(got)) if got else None


def plot_seed(runs: dict[str, RunRecord], stream: ContinualStream,
              teacher: dict[str, dict[str, float]], path: Any) -> None:
    """One panel per domain: accuracy over the stream per method, updates and refusals
    marked, visits shaded."""
    plt = pyplot()
    n = len(stream.domains)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), sharey=True)
    axes = np.atleast_1d(axes)
    edges = np.cumsum([0] + [v.samples for v in stream.visits])
    for ax, d in zip(axes, stream.domains, strict=True):
        for i, v in enumerate(stream.visits):
            if v.domain == d:
                ax.axvspan(edges[i], edges[i + 1], color='0.9', zorder=0)
        for name, run in runs.items():
            xs = [cp.t for cp in run.checkpoints]
            ys = [cp.accuracy[d]['da'] for cp in run.checkpoints]
            line, = ax.plot(xs, ys, linewidth=1.2, label=name, drawstyle='steps-post')
            if run.method == GUARDED.name:
                for cp in run.checkpoints:
                    if cp.event in ('shipped', 'refused', 'rollback', 'local_rollback'):
                        marker = {'shipped': '^', 'refused': 'x', 'rollback': 'v',
                                  'local_rollback': 'v'}[cp.event]
                        ax.plot(cp.t, cp.accuracy[d]['da'], marker, color=line.get_color(),
                                markersize=4)
        ax.axhline(teacher[d]['da'], color='grey', linestyle='--', linewidth=0.8)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel('answered samples', fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('DA (%)')
    axes[-1].legend(fontsize=6, loc='lower right')
    save_figure(fig, path)


def run(ctx: BenchContext) -> BenchResult:
    """Run every method on every seed's stream (or ``--merge`` records written before)."""
    import json

    from cdcca_ros.bench.common import device_params, load_plugin
    from cdcca_ros.nodes.tables import validate

    args = ctx.args
    if args.merge:
        records = [json.loads(Path(p).read_text()) for p in args.merge]
        per_seed = [s for rec in records for s in rec['summary']['per_seed']]
        all_runs = {k: v for rec in records for k, v in rec['detail']['runs'].items()}
        plots = [p for rec in records for p in rec['detail']['plots']]
        names = list(dict.fromkeys(n for rec in records for n in rec['detail']['methods']))
        first = records[0]['detail']
        return aggregate(per_seed, all_runs, plots, names, first['schedule_text'],
                         first['evals'], first['rate'], first['cloud_params'])
    for plugin in args.plugin:
        load_plugin(plugin)
    seeds = ([int(s) for s in args.seeds.split(',')] if args.seeds else [ctx.seed])
    visits = parse_schedule(args.schedule or (QUICK_SCHEDULE if ctx.quick else DEFAULT_SCHEDULE))
    evals = args.eval_per_domain or (20 if ctx.quick else 300)
    names = [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f'unknown methods {unknown}; known: {list(METHODS)}')
    if 'source_only' not in names:
        names.insert(0, 'source_only')
    cloud = validate('cloud_node', param_overrides(args.cloud, 'cloud_node'))
    device = device_params(**param_overrides(args.device, 'device_node'))
    if ctx.quick:
        cloud.update({'round.min_samples': 8, 'guard.max_steps': 4, 'guard.min_steps': 2,
                      'akd.steps': 4, 'guard.gate_fraction': 0.3})
    per_seed, all_runs, plots = [], {}, []
    for seed in seeds:
        print(f'seed {seed}: {len(visits)} visits, {sum(v.samples for v in visits)} samples',
              flush=True)
        stream = ContinualStream(ctx.models, seed, visits, evals, args.rate, cloud, device)
        teacher = stream.teacher_accuracy()
        runs = {METHODS[n].name: stream.run(METHODS[n]) for n in names}
        per_seed.append(_seed_figures(runs, stream, teacher))
        all_runs[str(seed)] = {name: r.to_dict() for name, r in runs.items()}
        path = plot_path(ctx, f'{NAME}_seed{seed}')
        plot_seed(runs, stream, teacher, path)
        plots.append(path.name)
        per_seed[-1]['teacher'] = {d: teacher[d]['da'] for d in stream.domains}
        per_seed[-1]['domains'] = stream.domains
    schedule = ','.join(f'{v.domain}:{v.samples}' for v in visits)
    return aggregate(per_seed, all_runs, plots, names, schedule, evals, args.rate, cloud)


def aggregate(per_seed: list[dict[str, Any]], all_runs: dict[str, Any], plots: list[str],
              names: list[str], schedule: str, evals: int, rate: float,
              cloud: dict[str, Any]) -> BenchResult:
    """The summary, table and notes over seeds (from each seed's figures)."""
    from cdcca_ros.sim.domains import SOURCE

    seeds = [s['seed'] for s in per_seed]
    keys = ('gain_over_source_only', 'gain_over_ce_only', 'uplink_ratio_vs_ce_only',
            'gain_over_tent', 'gain_over_ungated', 'source_final',
            'oracle_gain_over_source_only', 'oracle_share', 'label_accuracy')
    summary: dict[str, Any] = {k: _mean([s.get(k) for s in per_seed]) for k in keys}
    summary['final_drifted_gain_over_source_only'] = summary.pop('gain_over_source_only')
    gains = [s.get('gain_over_source_only') for s in per_seed]
    summary['min_seed_gain_over_source_only'] = (min(g for g in gains if g is not None)
                                                 if any(g is not None for g in gains) else None)
    for key in ('worst_regression', 'worst_round_drop'):
        got = [s[key] for s in per_seed if key in s]
        summary[key] = max(got) if got else None
    got = [s['source_min'] for s in per_seed if 'source_min' in s]
    summary['source_min'] = min(got) if got else None
    for key in ('rounds_refused', 'rollbacks', 'rounds', 'rounds_shipped'):
        summary[key] = int(sum(s.get(key, 0) for s in per_seed))
    summary['seeds'] = seeds
    summary['per_seed'] = per_seed
    # The table: one row per method, means over seeds.
    domains = per_seed[0]['domains']
    headers = (['method'] + [f'{d} DA' for d in domains]
               + ['drifted DA', 'gain', 'uplink', 'downlink'])
    rows = []
    src_mean = _mean([s['source_only_drifted'] for s in per_seed])
    for n in names:
        name = METHODS[n].name
        row: list[Any] = [name]
        for d in domains:
            row.append(round(float(np.mean([s['final_per_domain'][name][d]
                                            for s in per_seed])), 2))
        drift = _mean([s['final_drifted'][name] for s in per_seed])
        row += [round(drift, 2) if drift is not None else None,
                round(drift - src_mean, 2) if drift is not None and src_mean is not None
                else None,
                int(np.mean([s['uplink_bytes'][name] for s in per_seed])),
                int(np.mean([s['downlink_bytes'][name] for s in per_seed]))]
        rows.append(row)
    teacher_row = ['Teacher (cloud, reference)'] + [
        round(float(np.mean([s['teacher'][d] for s in per_seed])), 2) for d in domains] + [
        round(_mean([s['teacher_drifted'] for s in per_seed]) or 0.0, 2), '-', '-', '-']
    rows.append(teacher_row)
    notes = [
        f'seeds {seeds}; schedule {schedule}; {evals} held-out samples per domain after every '
        f'round; {rate} answers/s',
        'final accuracy after the whole stream (DA %, mean over seeds); gain = drifted-domain '
        f'mean minus source-only; {SOURCE} is not in the drifted mean',
        'uplink = token bytes sent (UTS-kept, audit and pulled tokens; every token for the '
        'all-token rows); downlink = signed delta payloads applied',
        'guarded default: ' + ', '.join(
            f'{k} {summary[k]:.2f}' if isinstance(summary[k], float) else f'{k} {summary[k]}'
            for k in ('final_drifted_gain_over_source_only', 'min_seed_gain_over_source_only',
                      'gain_over_ce_only', 'uplink_ratio_vs_ce_only', 'gain_over_tent',
                      'worst_regression', 'worst_round_drop', 'source_min', 'oracle_share',
                      'rounds_refused', 'rollbacks') if summary.get(k) is not None),
    ] + [f'![continual, seed {s}]({p})' for s, p in zip(seeds, plots, strict=True)]
    detail = {'runs': all_runs, 'markdown': markdown_table(headers, rows), 'plots': plots,
              'cloud_params': cloud, 'schedule_text': schedule, 'evals': evals, 'rate': rate,
              'methods': names}
    return BenchResult(summary=summary, headers=headers, rows=rows, detail=detail, notes=notes)
