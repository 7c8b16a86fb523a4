"""The device/cloud benches run with ``--quick`` on tiny models and write the promised JSON.

No timing is asserted (the machine is shared): only that each figure exists, has the right type
and lies in its possible range, and that what must hold regardless of speed does (no lost
answer from an error, budgets respected, byte counts ordered).
"""
from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdcca_ros.bench.__main__ import main, render_report
from cdcca_ros.bench.common import (
    BENCHES,
    Models,
    Target,
    jsonable,
    load_bench,
    param_overrides,
    run_bench,
)
from cdcca_ros.errors import ConfigError

REAL_CONFIGS = ('blip2-opt-2.7b', 'llava-1.5-7b', 'qwen2-vl-2b')
OPS = {'<=': operator.le, '>=': operator.ge, '==': operator.eq}


def _fraction(x: Any) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_uplink(s: dict[str, Any], rec: dict[str, Any]) -> None:
    from cdcca_ros.bench.common import device_uts_config
    from cdcca_ros.core.uts import PACK_DTYPES

    assert s['raw_bytes'] == 640 * 480 * 3
    assert (0 < s['uts_bytes_ecq'] < s['uts_bytes_int4'] < s['uts_bytes_int8']
            < s['uts_bytes_fp16'])
    assert _positive(s['jpeg_bytes']) and s['jpeg_bytes'] < s['raw_bytes']
    assert _positive(s['uts_over_jpeg'])
    # The summary figure is that of the measured configuration: the device's by default.
    default = device_uts_config()
    assert (s['pack_dtype'], s['keep_ratio']) == (default.pack_dtype, default.keep_ratio)
    assert s['uts_bytes'] == s[f'uts_bytes_{s["pack_dtype"]}']
    assert s['uts_over_jpeg'] == pytest.approx(s['uts_bytes'] / s['jpeg_bytes'])
    assert _fraction(s['pass_rate_source']) and _fraction(s['pass_rate_drifted'])
    assert s['pack_dtype_recommended'] in PACK_DTYPES
    for dtype in PACK_DTYPES:
        assert _fraction(s[f'teacher_agreement_{dtype}']), dtype
    assert set(rec['detail']['per_domain']) == {'source', 'fog', 'night', 'clutter', 'novel'}


def test_uplink_bench_measures_the_configuration_given(tiny_specs, tmp_path):
    teacher, student = tiny_specs
    path = tmp_path / 'uplink.json'
    run_bench('uplink', ['--out', str(path), '--quick', '--per-domain', '1', '--keep-ratio',
                         '1.0', '--dtype', 'int4', '--keep-ratios', '1.0',
                         '--teacher', teacher, '--student', student])
    s = json.loads(path.read_text())['summary']
    assert (s['pack_dtype'], s['keep_ratio']) == ('int4', 1.0)
    assert s['uts_bytes'] == s['uts_bytes_int4']
    # Every token kept: int4 codes + one float32 scale per token + uint16 indices + counts.
    n = int(s['kept_tokens_mean'])
    dim = s['all_tokens_fp16_bytes'] // (2 * n)
    assert s['uts_bytes'] == 12 + math.ceil(n * dim / 2) + 4 * n + 2 * n


def test_uplink_recommends_within_the_target_then_agreement():
    from cdcca_ros.bench.uplink import recommend

    over = {'fp16': 0.04, 'int8': 0.02, 'int4': 0.012, 'ecq': 0.0095}
    agree = {'fp16': 1.0, 'int8': 1.0, 'int4': 0.98, 'ecq': 0.97}
    assert recommend(over, agree) == 'ecq'
    assert recommend(over, agree, target=0.05) == 'int8'  # fp16 ties on agreement: fewer bytes
    assert recommend({k: v * 10 for k, v in over.items()}, agree) == 'ecq'  # none within


def _check_uts_cost(s: dict[str, Any], rec: dict[str, Any]) -> None:
    assert _positive(s['uts_over_answer']) and _positive(s['answer_ms'])
    assert s['samples'] == 6
    assert s['uts_over_answer'] == pytest.approx(s['uts_ms'] / s['answer_ms'])
    assert [row['mc_masks'] for row in rec['detail']['mc_sweep']] == [4, 8, 16, 32]


def _check_node_overhead(s: dict[str, Any], rec: dict[str, Any]) -> None:
    assert _positive(s['ros_over_direct']) and _positive(s['ros_image_over_direct'])
    assert s['samples'] == 4 and s['failures'] == 0
    # Same model, same frame: the node answers exactly what the model layer answers.
    assert rec['detail']['answer_mismatches'] == 0
    # The empty service's round trip is its handler plus something, and the larger student
    # was measured in its own processes too.
    assert s['floor_overhead_ms'] > 0 and s['floor_over_direct'] > 1.0
    assert {'30.000', '100.000'} <= set(rec['detail']['floor'])
    assert _positive(s['ros_over_direct_larger']) and s['larger_direct_ms'] > s['direct_ms']


def _check_downlink(s: dict[str, Any], rec: dict[str, Any]) -> None:
    codecs = s['codecs']
    assert {'fp16', 'nf4', 'sparse', 'sparse@1bit'} <= set(codecs)
    for name in ('fp16', 'nf4', 'sparse', 'sparse@1bit'):
        c = codecs[name]
        assert _positive(c['bits_per_param']), name
        assert c['gain_retained'] is None or isinstance(c['gain_retained'], float), name
    assert 16.0 <= codecs['fp16']['bits_per_param'] < 20.0
    assert codecs['sparse@1bit']['bits_per_param'] <= 1.0  # the byte budget holds
    # The cloud's own 1-bit round (Fisher selection + refit) and its control.
    refit = rec['detail']['codecs']['sparse@1bit+refit']
    assert 0 < codecs['sparse@1bit+refit']['bits_per_param'] <= 1.0
    assert refit['bytes'] <= refit['budget_bytes']
    assert 'sparse@1bit+refit:fisher_only' in codecs
    assert _positive(s['refit_control']['answer_loss']) and s['refit_control']['steps'] >= 1
    assert 0 < s['container_overhead_bytes'] < 100 and _positive(s['decode_ms'])
    assert codecs['sparse']['bits_per_param'] < codecs['nf4']['bits_per_param']
    assert set(s['payload_over_full_model']) == set(REAL_CONFIGS)
    for name in REAL_CONFIGS:
        assert 0.0 < s['payload_over_full_model'][name] < 0.01, name
        real = rec['detail']['real_models'][name]
        assert real['codecs']['sparse@1bit']['bits_per_param'] <= 1.0
    assert _fraction(s['accuracy_base']) and _fraction(s['accuracy_uncompressed'])


def _check_apply(s: dict[str, Any], rec: dict[str, Any]) -> None:
    assert _positive(s['apply_over_answer']) and _positive(s['lock_over_answer'])
    assert isinstance(s['answers_lost'], int) and s['answers_total'] > 0
    assert s['apply_failures'] == 0
    # Timeouts depend on the machine's load; errors and non-finite answers never may happen.
    assert not [lost for lost in rec['detail']['concurrent']['lost'] if lost != 'timeout']
    assert s['lock_held_ms'] <= s['apply_ms']
    # apply() returns before the background write, which then catches up with the version.
    assert s['persisted_latest'] is True
    assert {'gate_ms', 'build_ms', 'finite_ms', 'hash_ms', 'swap_ms', 'probe_ms', 'verify_ms',
            'decode_ms', 'persist_ms'} <= set(rec['detail']['steps_ms'])


def _check_capacity(s: dict[str, Any], rec: dict[str, Any]) -> None:
    from cdcca_ros.sim.domains import DRIFTED

    assert (s['samples'], s['steps'], s['eval_per_domain']) == (8, 2, 8)
    assert set(s['per_domain']) == set(DRIFTED) == set(s['domains'])
    for d, p in s['per_domain'].items():
        for key in ('before', 'after', 'teacher', 'source_before', 'source_after'):
            assert 0.0 <= p[key] <= 100.0, (d, key)
        assert p['train_s'] >= 0.0
    gains = [p['after'] - p['before'] for p in s['per_domain'].values()]
    assert s['drifted_mean_gain'] == pytest.approx(sum(gains) / len(gains))
    assert [row[0] for row in rec['table']['rows']] == list(s['domains'])


def _check_label_fidelity(s: dict[str, Any], rec: dict[str, Any]) -> None:
    from cdcca_ros.sim.domains import DRIFTED, SOURCE

    assert s['per_domain_frames'] == 4 and s['basis_fitted_here'] is True  # tiny: no basis
    assert {SOURCE, *DRIFTED} <= set(s['per_domain']) and s['domains'][0] == SOURCE
    budgets = [f'basis@{b}' for b in s['budgets']]
    assert s['device_budget_bytes'] in s['budgets'] and len(budgets) >= 2
    for d, p in s['per_domain'].items():
        assert set(p) == {'exact', 'ecq', *budgets, 'device'}, d
        assert p['exact']['rel_l2'] == 0.0 and p['exact']['bytes'] == 0.0
        for name in ('ecq', *budgets, 'device'):
            assert 0.0 < p[name]['rel_l2'] < 1.0 and p[name]['bytes'] > 0, (d, name)
        # The budget bounds the basis payload, and more bytes code closer.
        for b in s['budgets']:
            assert p[f'basis@{b}']['bytes'] <= b
        assert p[budgets[-1]]['rel_l2'] <= p[budgets[0]]['rel_l2'] + 1e-6
        # The device's packing: within its budget, and within its error target unless the
        # budget's finest step is coarser (then it is the budget's packing).
        device, at_budget = p['device'], p[f'basis@{s["device_budget_bytes"]}']
        assert device['bytes'] <= s['device_budget_bytes']
        assert device['bytes'] <= at_budget['bytes'] + 1e-6
        assert device['rel_l2'] >= at_budget['rel_l2'] - 1e-6
        assert all(0.0 <= v['teacher'] <= 100.0 for v in p.values())
    losses = {d: p['exact']['teacher'] - p['device']['teacher']
              for d, p in s['per_domain'].items()}
    assert s['label_loss'] == pytest.approx(losses)
    assert s['worst_label_loss'] == pytest.approx(max(losses.values()))
    assert [row[0] for row in rec['table']['rows']] == s['domains']


CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    'uplink': _check_uplink,
    'uts_cost': _check_uts_cost,
    'node_overhead': _check_node_overhead,
    'downlink': _check_downlink,
    'apply': _check_apply,
    'capacity': _check_capacity,
    'label_fidelity': _check_label_fidelity,
}


@pytest.fixture(scope='module')
def records(tiny_specs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp('bench')
    teacher, student = tiny_specs
    out = {}
    for name in CHECKS:
        if name == 'node_overhead':
            try:
                import cdcca_ros.msg  # noqa: F401
            except ImportError:
                continue  # package not built: the node test files skip too
        path = out_dir / f'{name}.json'
        run_bench(name, ['--out', str(path), '--quick', '--seed', '3',
                         '--teacher', teacher, '--student', student])
        out[name] = json.loads(path.read_text())
    return out


def test_registry_holds_these_benches():
    assert set(CHECKS) <= set(BENCHES)


@pytest.mark.parametrize('name', list(CHECKS))
def test_bench_writes_summary_machine_and_targets(records, name):
    if name not in records:
        pytest.skip('package not built: run through `make test`')
    rec = records[name]
    assert rec['bench'] == name and rec['seed'] == 3 and rec['quick'] is True
    machine = rec['machine']
    assert machine['cpu_count'] >= 1 and machine['torch'] and machine['platform']
    assert machine['torch_threads'] == 1
    assert rec['targets'], 'every bench states its targets'
    assert [(t['key'], t['op'], t['value']) for t in rec['targets']] == [
        (t.key, t.op, t.value) for t in load_bench(name).TARGETS]
    for target in rec['targets']:
        measured = target['measured']
        assert measured == Target(target['key'], target['op'], target['value']
                                  ).measured(rec['summary'])
        # met: the bound applied to the figure, None where there is no finite number.
        number = (isinstance(measured, (int, float)) and not isinstance(measured, bool)
                  and math.isfinite(measured))
        assert target['met'] is (OPS[target['op']](measured, target['value']) if number
                                 else None), target
    assert rec['table']['headers'] and rec['table']['rows']
    CHECKS[name](rec['summary'], rec)


def test_report_lists_every_target(records):
    text = render_report(records)
    for name, rec in records.items():
        assert f'## {name}' in text
        for target in rec['targets']:
            assert f'`{target["key"]}`' in text


def test_report_prefers_a_bench_markdown_table(records):
    name, rec = next(iter(records.items()))
    table = '| a | b |\n|---|---|\n| 1 | 2 |'
    text = render_report({name: {**rec, 'detail': {**(rec.get('detail') or {}),
                                                   'markdown': table}}})
    assert table in text
    assert '```' not in text.split(f'## {name}')[1]  # no plain-text table beside it
    text = render_report({name: {**rec, 'detail': {}}})
    assert '```' in text.split(f'## {name}')[1]


@pytest.mark.parametrize('summary, met', [
    ({'a': {'b': 0.5}}, True), ({'a': {'b': 2.0}}, False), ({'a': {'b': None}}, None),
    ({'a': {}}, None), ({'a': {'b': math.nan}}, None),
])
def test_target_reads_nested_figures(summary, met):
    assert Target('a/b', '<=', 1.0).met(summary) is met


def test_jsonable_makes_strict_json():
    import numpy as np

    value = jsonable({'x': np.float32(1.5), 'n': math.nan, 'p': Path('/tmp'), 't': (1, 2)})
    assert value == {'x': 1.5, 'n': None, 'p': '/tmp', 't': [1, 2]}
    json.dumps(value, allow_nan=False)


def test_unknown_bench_and_half_tiny_specs_are_refused(tmp_path, capsys):
    assert main(['no_such_bench', '--out', str(tmp_path / 'x.json')]) == 2
    assert 'unknown bench' in capsys.readouterr().err
    with pytest.raises(ConfigError, match='tiny'):
        Models('tiny', 'bundled:student', tmp_path, 0)
    assert main(['list']) == 0
    assert set(capsys.readouterr().out.split()) >= set(CHECKS)


@pytest.mark.parametrize('pos, neg, expected', [
    ([3.0, 4.0], [1.0, 2.0], 1.0), ([1.0, 2.0], [3.0, 4.0], 0.0), ([1.0, 1.0], [1.0, 1.0], 0.5),
    ([1.0], [2.0, 0.0], 0.5), ([], [1.0], None),
])
def test_auroc(pos, neg, expected):
    import numpy as np

    from cdcca_ros.bench.uplink import auroc

    assert auroc(np.asarray(pos), np.asarray(neg)) == expected


def test_gain_interval_brackets_the_gain():
    import numpy as np

    from cdcca_ros.bench.downlink import gain_interval

    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.2).astype(float)
    full = np.maximum(base, rng.random(400) < 0.4)
    half = np.where(rng.random(400) < 0.5, full, base)
    lo, hi = gain_interval(half, full, base, seed=0)
    gain = (half - base).mean() / (full - base).mean()
    assert lo <= gain <= hi and 0.3 < lo < hi < 0.7
    assert gain_interval(full, full, base, seed=0) == (1.0, 1.0)


def test_help_is_plain_text(capsys):
    from cdcca_ros.bench.__main__ import main as bench_main

    assert bench_main(['--help']) == 0
    text = capsys.readouterr().out
    assert text.startswith('usage: python -m cdcca_ros.bench NAME --out FILE.json')
    assert '``' not in text and ':data:' not in text  # no reStructuredText markup


def test_param_overrides_are_typed_validated_and_refuse_what_the_node_lacks():
    got = param_overrides(['guard.max_steps=40', 'guard.gate=false', 'guard.alpha=0.2'],
                          'cloud_node')
    assert got['guard.max_steps'] == 40 and isinstance(got['guard.max_steps'], int)
    assert got['guard.gate'] is False and got['guard.alpha'] == pytest.approx(0.2)
    for bad in (['guard.nonexistent=1'], ['guard.max_steps'], ['guard.max_steps=forty'],
                ['guard.alpha=7']):
        with pytest.raises(ConfigError):
            param_overrides(bad, 'cloud_node')
    # Only what was named: merged over a bench's own settings, a default must not win.
    assert set(got) == {'guard.max_steps', 'guard.gate', 'guard.alpha'}
    assert param_overrides([], 'cloud_node') == {}
