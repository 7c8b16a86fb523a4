"""The realscale bench's machinery on tiny models (the real sizes run only as a bench): a
family measured in its own process, the bundled-model parts, and the summary keys."""
from __future__ import annotations

import json

from cdcca_ros.bench.common import run_bench
from cdcca_ros.bench.realscale import SUMMARY_KEYS, _plan_layers


def test_realscale_writes_every_figure_per_family(tiny_specs, tmp_path):
    teacher, student = tiny_specs
    path = tmp_path / 'realscale.json'
    run_bench('realscale', ['--out', str(path), '--quick', '--teacher', teacher, '--student',
                            student, '--families', 'blip2', '--models', f'blip2={student}',
                            '--budget', '96', '--budget-sweep', '48', '--keep-sweep', '1.0',
                            '--applies', '1', '--dtypes', 'float32'])
    rec = json.loads(path.read_text())
    figures = rec['summary']['families']['blip2']
    assert 'error' not in figures, figures
    for key in SUMMARY_KEYS:
        assert figures[key] is not None, key
    # The basis budget holds at real-size settings too: payload <= budget (+ 16 B of fields).
    assert figures['uplink_bytes_per_sample'] <= 96 + 16
    assert figures['answers_lost'] == 0
    assert 0 < figures['uts_over_answer'] and 0 < figures['apply_over_answer']
    assert figures['dwc_bytes_min'] < figures['dwc_bytes_4bit']
    assert figures['peak_rss_mb'] > 0 and figures['params'] > 0
    assert 0 <= rec['summary']['bundled_teacher_agreement'] <= 1
    assert rec['detail']['bundled_dwc']['refit']

    # A re-summary from that run measures no family again and reports the same figures.
    again_path = tmp_path / 'again.json'
    run_bench('realscale', ['--out', str(again_path), '--quick', '--teacher', teacher,
                            '--student', student, '--families', '', '--records-from', str(path),
                            '--bundled-from', str(path)])
    again = json.loads(again_path.read_text())
    assert again['summary']['families'] == rec['summary']['families']
    assert again['summary']['bundled_teacher_agreement'] == \
        rec['summary']['bundled_teacher_agreement']
    assert any('records of' in n for n in again['notes'])


def test_a_model_larger_than_memory_is_cut_to_the_layers_that_fit():
    assert _plan_layers('real:qwen2-vl-2b', 'bfloat16', 64 * 2**30) is None
    layers = _plan_layers('real:llava-1.5-7b', 'float32', 16 * 2**30)
    assert layers is not None and 1 <= layers < 32


def test_family_dwc_measures_the_real_trainable_set_on_the_meta_device(tmp_path):
    import numpy as np

    from cdcca_ros.bench.realscale import family_dwc

    rng = np.random.default_rng(0)
    pools = tmp_path / 'pools.npz'
    np.savez(pools, **{k: rng.standard_normal(512).astype(np.float32)
                       for k in ('lora_A', 'lora_B', 'norm', 'bias', 'other')})
    got = family_dwc('real:blip2-opt-2.7b', pools, 1.5, 0)
    # The configuration's declared set (the paper's size), not the family default (13.0 M).
    assert got['trainable_params'] == 1_573_888
    assert got['trainable_set']['lora_r'] == 1
    # The budget holds (a few bytes of framing over bits x params / 8), below the codec's 4 bit.
    assert got['dwc_bytes_min'] <= 1.5 * got['trainable_params'] / 8
    assert got['dwc_bytes_min'] < got['dwc_bytes_4bit']


def test_parts_need_the_earlier_runs_that_supply_the_rest():
    import argparse

    import pytest

    from cdcca_ros.bench.realscale import PARTS, _parts
    from cdcca_ros.errors import ConfigError

    def ns(**kw):
        return argparse.Namespace(**{'parts': None, 'bundled_from': None,
                                     'records_from': None, **kw})

    assert _parts(ns()) == PARTS
    assert _parts(ns(bundled_from='x.json')) == ('families',)
    assert _parts(ns(parts='dwc', bundled_from='x.json', records_from='x.json')) == ('dwc',)
    with pytest.raises(ConfigError, match='bundled-from'):
        _parts(ns(parts='dwc,families'))
    with pytest.raises(ConfigError, match='records-from'):
        _parts(ns(parts='uplink,dwc'))
    with pytest.raises(ConfigError, match='unknown'):
        _parts(ns(parts='latency'))
