"""The paper-shaped tables (1, 3, 4, 5) run through ``report --quick`` on tiny models.

The tiny models answer at random, so no figure's value is asserted: only that every promised
key is there with the right type, that the report and the figures are written, and what holds
regardless of accuracy (equal bytes for random and UTS sampling, byte counts ordered).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cdcca_ros.bench.__main__ import main
from cdcca_ros.bench.adaptation import (
    CDCCA,
    Method,
    answer_logits,
    paired_gain_interval,
    random_features,
)
from cdcca_ros.bench.common import BENCHES
from cdcca_ros.errors import ConfigError

TABLES = ('table1', 'table3', 'table4', 'table5')


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _percent(x: Any) -> bool:
    return _number(x) and 0.0 <= x <= 100.0


@pytest.fixture(scope='module')
def report_dir(tiny_specs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('results')
    teacher, student = tiny_specs
    code = main(['report', '--out-dir', str(out), '--only', ','.join(TABLES), '--quick',
                 '--seed', '3', '--teacher', teacher, '--student', student])
    assert code == 0
    return out


def _record(report_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((report_dir / f'{name}.json').read_text())


def test_tables_are_registered():
    assert set(TABLES) <= set(BENCHES)


def test_report_and_figures_are_written(report_dir):
    text = (report_dir / 'REPORT.md').read_text()
    for name in TABLES:
        assert f'## {name}' in text
        png = report_dir / f'{name}.png'
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert png.stat().st_size < 200_000  # the results are committed: keep them small
        assert f'({name}.png)' in text
        rec = _record(report_dir, name)
        assert rec['seed'] == 3 and rec['quick'] is True
        assert rec['machine']['cpu_count'] >= 1 and rec['machine']['platform']
        assert rec['table']['rows'] and rec['detail']['markdown'].startswith('|')


def test_report_no_run_rewrites_from_the_json(report_dir, tmp_path):
    import shutil

    for name in TABLES[:1]:
        shutil.copy(report_dir / f'{name}.json', tmp_path / f'{name}.json')
    assert main(['report', '--out-dir', str(tmp_path), '--only', ','.join(TABLES),
                 '--no-run']) == 0
    text = (tmp_path / 'REPORT.md').read_text()
    assert f'## {TABLES[0]}' in text and f'## {TABLES[1]}' not in text


def test_table1_summary(report_dir):
    s = _record(report_dir, 'table1')['summary']
    for key in ('gain_over_source_only', 'gain_over_tent', 'gain_over_ce_only',
                'gain_over_source_only_mc', 'gain_over_tent_mc'):
        assert _number(s[key]), key
    ours = 'CD-CCA (UTS + AKD + DWC), guarded'
    assert set(s['final']) == {'Source-only', 'TENT (device, entropy min.)', 'TENT, lr / 10',
                               'Teacher pseudo-labels, L_CE only', ours,
                               'CD-CCA, paper round (ungated)',
                               'Oracle (true labels, every sample)'}
    assert s['tent_baseline'] in ('TENT (device, entropy min.)', 'TENT, lr / 10')
    assert s['gain_over_tent'] == pytest.approx(
        s['final'][ours]['da'] - s['final'][s['tent_baseline']]['da'])
    for acc in [*s['final'].values(), s['teacher']]:
        assert _percent(acc['da']) and _percent(acc['mc'])
    assert s['gain_over_source_only'] == pytest.approx(
        s['final'][ours]['da'] - s['final']['Source-only']['da'])
    assert s['rounds'] == 2 and s['stream_per_round'] == 4  # quick: 2 domains x 2 samples
    for key in ('gain_over_source_only', 'gain_over_tent', 'gain_over_ce_only'):
        lo, hi = s[f'{key}_ci95']
        assert lo <= s[key] + 1e-9 and s[key] <= hi + 1e-9, key


def test_table1_link_bytes(report_dir):
    runs = _record(report_dir, 'table1')['detail']['runs']
    assert runs['Source-only']['uplink_bytes'] == 0
    assert runs['TENT (device, entropy min.)']['downlink_bytes'] == 0
    ours = runs['CD-CCA (UTS + AKD + DWC), guarded']
    ce = runs['Teacher pseudo-labels, L_CE only']
    # Kept tokens only: fewer bytes per uplinked sample than all tokens.
    assert ours['uplink_bytes'] / ours['uplinked'] < ce['uplink_bytes'] / ce['uplinked']
    assert ce['uplinked'] == 8  # every sample of both rounds of both tasks
    # The paper's round ships every round; the guarded one only what its gate passes.
    assert runs['CD-CCA, paper round (ungated)']['downlink_bytes'] > 0
    shipped = [r for r in ours['rounds'] if r.get('outcome') == 'shipped']
    assert (ours['downlink_bytes'] > 0) == bool(shipped)


def test_table3_summary(report_dir):
    s = _record(report_dir, 'table3')['summary']
    rows = ['source-only', 'PL', 'PL + AKD', 'PL + AKD + UTS-1', 'PL + AKD + UTS-1 + UTS-2']
    assert list(s['final']) == rows
    assert all(_percent(v['da']) and _percent(v['mc']) for v in s['final'].values())
    assert _number(s['full_minus_pl']) and _number(s['akd_minus_pl'])
    up = s['uplink_bytes']
    assert up['source-only'] == 0
    assert up['PL'] == up['PL + AKD'] >= up['PL + AKD + UTS-1'] > up['PL + AKD + UTS-1 + UTS-2']


def test_table4_summary(report_dir):
    s = _record(report_dir, 'table4')['summary']
    assert _number(s['uts_minus_random']) and _number(s['uts_minus_random_mc'])
    assert set(s['by_ratio']) == {'0.25', '0.5', '0.75'}
    for cell in s['by_ratio'].values():
        # Equal bytes: random keeps exactly as many tokens as UTS (the entropy-coded packing
        # makes the bytes per sample differ a little).
        assert cell['random']['tokens_per_sample'] == cell['uts']['tokens_per_sample'] > 0
        per = [cell[k]['uplink_bytes'] / cell[k]['uplinked'] for k in ('random', 'uts')]
        assert per[0] == pytest.approx(per[1], rel=0.1)
        assert _percent(cell['uts']['da']) and _percent(cell['random']['mc'])
    assert s['uts_minus_random'] == pytest.approx(
        s['by_ratio']['0.5']['uts']['da'] - s['by_ratio']['0.5']['random']['da'])


def test_table5_summary(report_dir):
    s = _record(report_dir, 'table5')['summary']
    up, down = s['uplink'], s['downlink']
    assert up['raw_bytes_per_frame'] == 640 * 480 * 3
    assert 0 < up['uts_bytes_per_frame'] < up['all_tokens_fp16_bytes_per_frame']
    assert 0 < up['jpeg_bytes_per_frame'] < up['raw_bytes_per_frame']
    assert down['ours_bytes'] < down['delta_nf4_bytes'] < down['delta_fp16_bytes'] \
        < down['full_model_fp16_bytes']
    assert 0 < s['uts_over_raw'] < 1 and 0 < s['ours_over_full_model'] < 1
    assert 0 < s['blip2']['ours_over_full_model'] < 1
    assert set(s['link_bps']) == {'1 Gbit/s', '10 Mbit/s'}
    raw5 = s['seconds']['raw RGB 640x480 x5']
    assert raw5['1 Gbit/s'] == pytest.approx(5 * 640 * 480 * 3 * 8 / 1e9)


# --- pieces ------------------------------------------------------------------------------------
def test_answer_logits_predict_the_teacher_forced_answer(tiny_specs):
    """The positions TENT reads are those that predict each answer token (left padding)."""
    from cdcca_ros.models import bundled

    model = bundled.load(tiny_specs[1])
    tokens = torch.randn(3, model.vision_space().num_tokens, model.vision_space().dim)
    questions = ['what color is the circle?', 'how many shapes are there?', 'is there a cube?']
    results = model.answer_from_tokens(tokens, None, questions, max_new_tokens=4)
    out = model.forward_train(tokens, None, questions, [r.text for r in results])
    for rows, r in zip(answer_logits(out.logits, out.answer_mask), results, strict=True):
        predicted = rows.argmax(dim=-1).tolist()
        # Greedy ids are the argmax of the same distributions (eos after them when it stopped).
        assert predicted[:len(r.token_ids)] == r.token_ids
        assert rows.shape[0] == len(model.tokenizer(' ' + r.text,
                                                    add_special_tokens=False)['input_ids']) + 1


def test_random_features_keep_as_many_tokens_as_uts():
    from cdcca_ros.core.uts import select_tokens, token_variance

    feats = random_features(0)(torch.zeros(1, 65, 8), 0.1, 8)
    assert feats.shape == (8, 1, 65, 1)
    kept = select_tokens(token_variance(feats)[0], keep_ratio=0.5, always_keep_cls=True)
    assert kept.numel() == 1 + 32 and int(kept[0]) == 0
    again = select_tokens(token_variance(random_features(1)(torch.zeros(1, 65, 8), 0.1, 8))[0],
                          keep_ratio=0.5, always_keep_cls=True)
    assert again.numel() == kept.numel() and not torch.equal(again, kept)


def test_paired_interval_brackets_a_known_gain():
    import numpy as np

    rng = np.random.default_rng(0)
    base = {d: {'da': 100.0 * (rng.random(300) < 0.4)} for d in ('a', 'b')}
    # 'better' fixes 20% of the samples base gets wrong: a gain of 12 points in expectation.
    better = {d: {'da': np.maximum(v['da'], 100.0 * (rng.random(300) < 0.2))}
              for d, v in base.items()}
    gain = np.mean([better[d]['da'].mean() - base[d]['da'].mean() for d in base])
    lo, hi = paired_gain_interval(better, base, ('a', 'b'), 'da', seed=0)
    assert 0.0 < lo < gain < hi
    assert paired_gain_interval(base, base, ('a', 'b'), 'da', seed=0) == (0.0, 0.0)


@pytest.mark.parametrize('kwargs, match', [
    ({'update': 'cloudy'}, 'update'),
    ({'update': 'cloud', 'losses': 'mse'}, 'losses'),
    ({'update': 'cloud', 'stage2': 'topk'}, 'stage2'),
    ({'update': 'cloud', 'keep_ratio': 0.0}, 'keep_ratio'),
    ({'update': 'tent', 'lr_scale': 0.0}, 'lr_scale'),
])
def test_method_refuses_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Method('x', **kwargs)
    assert CDCCA.stage1 and CDCCA.stage2 == 'uts'
