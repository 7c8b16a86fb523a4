"""Table 3 of the paper on the drifting world: what each part of CD-CCA adds.

Rows, each adding one part (everything else as in :mod:`cdcca_ros.bench.table1`'s CD-CCA: the
cloud's AKD optimiser, codec and budget, the device's UTS defaults and packing):

* PL: teacher pseudo-labels and L_CE only, every sample, all tokens;
* + AKD: L_query + L_repr + L_CE (Eq. 6);
* + UTS-1: only the samples stage 1 (answer entropy, Eq. 2) selects are uplinked;
* + UTS-2: of those, only the tokens stage 2 (MC-dropout variance, Eq. 3-4) keeps (= CD-CCA).

Final-round accuracy on the drifted domains (MC/DA, gains over source-only in points) and the
bytes each configuration sent up and down over all rounds.
"""
from __future__ import annotations

import argparse
from typing import Any

from cdcca_ros.bench.adaptation import (
    CDCCA,
    CE_FT,
    METRICS,
    SOURCE_ONLY,
    Experiment,
    Method,
    MethodRun,
    add_plan_arguments,
    kib,
    markdown_table,
    paired_gain_interval,
    pct,
    plan_from_args,
    plot_path,
    pyplot,
    save_figure,
    signed,
)
from cdcca_ros.bench.common import BenchContext, BenchResult, Target

NAME = 'table3'
DESCRIPTION = ('paper Table 3: ablation PL / +AKD / +UTS-1 / +UTS-2, final drifted accuracy '
               'and uplink bytes')
TARGETS = (Target('full_minus_pl', '>=', 0.0, 'paper Table 3: full 49.05 vs PL 48.89 DA'),
           Target('akd_minus_pl', '>=', 0.0, 'paper Table 3: +AKD 49.05 vs PL 48.89 DA'))
ROUNDS, STREAM, EVALS = 3, 64, 100
# (label, PL, AKD, UTS-1, UTS-2) -> method
ROWS: tuple[tuple[str, bool, bool, bool, bool, Method], ...] = (
    ('source-only', False, False, False, False, SOURCE_ONLY),
    ('PL', True, False, False, False, CE_FT),
    ('PL + AKD', True, True, False, False, Method('PL + AKD', 'cloud', losses='akd')),
    ('PL + AKD + UTS-1', True, True, True, False,
     Method('PL + AKD + UTS-1', 'cloud', losses='akd', stage1=True)),
    ('PL + AKD + UTS-1 + UTS-2', True, True, True, True, CDCCA),
)
# The paper's Table 3 (MC, DA, gain MC, gain DA; None where the paper's cell is empty).
PAPER = {
    'source-only': (47.95, 45.55, None, None),
    'PL': (None, 48.89, None, 3.34),
    'PL + AKD': (50.39, 49.05, 2.44, 3.50),
    'PL + AKD + UTS-1': (50.82, 48.93, 2.87, 3.38),
    'PL + AKD + UTS-1 + UTS-2': (53.19, 49.05, 5.24, 3.50),
}
HEADERS = ['row', 'PL', 'AKD', 'UTS-1', 'UTS-2', 'MC', 'DA', 'Gain MC', 'Gain DA',
           'uplinked', 'labels right', 'uplink', 'downlink']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    add_plan_arguments(parser, ROUNDS, STREAM, EVALS)


def _mark(on: bool) -> str:
    return 'x' if on else ''


def plot(runs: dict[str, MethodRun], path: Any) -> None:
    """Final drifted DA/MC per row, and the uplink bytes per row (log scale)."""
    plt = pyplot()
    labels = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    xs = range(len(labels))
    width = 0.38
    for i, metric in enumerate(('mc', 'da')):
        axes[0].bar([x + (i - 0.5) * width for x in xs],
                    [runs[k].final(metric) for k in labels], width, label=metric.upper())
    axes[0].set_ylabel('final accuracy, drifted mean (%)')
    axes[0].legend(fontsize=7)
    short = dict(zip(labels, ['source', 'PL', '+AKD', '+UTS-1', '+UTS-2'], strict=False))
    sent = [k for k in labels if runs[k].uplink_bytes() > 0]  # source-only sends nothing
    axes[1].bar(range(len(sent)), [runs[k].uplink_bytes() for k in sent], color='tab:green')
    axes[1].set_yscale('log')
    axes[1].set_ylabel('uplink bytes, all rounds')
    axes[1].set_xticks(range(len(sent)))
    axes[1].set_xticklabels([short.get(k, k) for k in sent], fontsize=8)
    axes[0].set_xticks(list(xs))
    axes[0].set_xticklabels([short.get(k, k) for k in labels], fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis='y')
    save_figure(fig, path)


def run(ctx: BenchContext) -> BenchResult:
    """Run the ablation rows and lay them out as the paper's Table 3."""
    plan = plan_from_args(ctx, ROUNDS, STREAM, EVALS)
    exp = Experiment(ctx, plan)
    runs = {label: exp.run(method) for label, *_, method in ROWS}
    base = runs['source-only']
    rows = []
    for label, pl, akd, uts1, uts2, _ in ROWS:
        r = runs[label]
        gains = (['/', '/'] if r is base
                 else [signed(r.final(m) - base.final(m)) for m in ('mc', 'da')])
        rows.append([label, _mark(pl), _mark(akd), _mark(uts1), _mark(uts2),
                     pct(r.final('mc')), pct(r.final('da')), *gains,
                     f'{r.uplinked()}/{plan.rounds * plan.stream_size}',
                     pct(r.label_accuracy()),
                     kib(r.uplink_bytes()), kib(r.downlink_bytes())])
    pl, full = runs['PL'], runs['PL + AKD + UTS-1 + UTS-2']
    summary: dict[str, Any] = {
        'final': {k: {m: v.final(m) for m in METRICS} for k, v in runs.items()},
        'gain_over_source_only': {k: v.final('da') - base.final('da') for k, v in runs.items()},
        'gain_over_source_only_mc': {k: v.final('mc') - base.final('mc')
                                     for k, v in runs.items()},
        'uplink_bytes': {k: v.uplink_bytes() for k, v in runs.items()},
        'downlink_bytes': {k: v.downlink_bytes() for k, v in runs.items()},
        'uplinked_samples': {k: v.uplinked() for k, v in runs.items()},
        'label_accuracy': {k: v.label_accuracy() for k, v in runs.items()},
        'full_minus_pl': full.final('da') - pl.final('da'),
        'full_minus_pl_ci95': list(paired_gain_interval(full.final_scores, pl.final_scores,
                                                        plan.domains, 'da', plan.seed)),
        'full_minus_pl_mc': full.final('mc') - pl.final('mc'),
        'akd_minus_pl': runs['PL + AKD'].final('da') - pl.final('da'),
        'uplink_full_over_pl': (full.uplink_bytes() / pl.uplink_bytes()
                                if pl.uplink_bytes() else None),
    }
    path = plot_path(ctx, NAME)
    plot(runs, path)
    notes = [
        plan.describe(),
        'MC/DA in %: drifted-domain mean after the final round; Gain = minus source-only '
        '(points); uplinked = samples sent / samples answered; labels right = VQA accuracy '
        '(%) of the teacher\'s pseudo-labels from what was uplinked; bytes over all rounds',
        f'full minus PL, final DA: {summary["full_minus_pl"]:+.2f} points, 95% paired '
        f'bootstrap interval [{summary["full_minus_pl_ci95"][0]:+.1f}, '
        f'{summary["full_minus_pl_ci95"][1]:+.1f}]',
        f'the full row is table1\'s CD-CCA and its stage 2 keeps '
        f'{full.rounds[-1].kept_tokens or 0:.0f} tokens per sample (device default keep ratio)',
        'paper (LLaMA-Adapter, VQAv2->A-OKVQA) DA: none 45.55, PL 48.89, +AKD 49.05, '
        '+UTS-1 48.93, +UTS-2 49.05; MC: none 47.95, +AKD 50.39, +UTS-1 50.82, +UTS-2 53.19',
        f'![Table 3: ablation]({path.name})',
    ]
    detail = {'runs': {k: v.to_dict() for k, v in runs.items()},
              'provenance': exp.provenance(),
              'markdown': markdown_table(HEADERS, rows), 'paper': PAPER, 'plot': path.name}
    return BenchResult(summary=summary, headers=HEADERS, rows=rows, detail=detail, notes=notes)
