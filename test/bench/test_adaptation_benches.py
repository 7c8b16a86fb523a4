"""Table 1 and the continual bench run end to end (``--quick``, tiny models): every row, the
summary keys the issue names, and a domain registered from outside the package."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cdcca_ros.bench.common import run_bench
from cdcca_ros.sim import domains
from cdcca_ros.sim.domains import Domain, register_domain, unregister_domain
from cdcca_ros.sim.shifts import register_shift, unregister_shift


@pytest.fixture
def tested_domain(monkeypatch):
    """A shift and a domain registered here, in a test module, and added to DRIFTED."""

    @register_shift('test_invert', 'image')
    def invert(image, strength, rng):
        """Photographic negative blended in."""
        return ((1 - strength) * image + strength * (255 - image.astype(np.float32))).astype(
            np.uint8)

    register_domain(Domain('test_negative', (('test_invert', 0.6),), 'negative film'))
    monkeypatch.setattr(domains, 'DRIFTED', domains.DRIFTED + ('test_negative',))
    yield 'test_negative'
    unregister_domain('test_negative')
    unregister_shift('test_invert')


def test_table1_runs_a_domain_registered_outside_the_package(tiny_specs, tested_domain,
                                                             tmp_path):
    teacher, student = tiny_specs
    path = tmp_path / 'table1.json'
    run_bench('table1', ['--out', str(path), '--quick', '--teacher', teacher, '--student',
                         student, '--domains', f'fog,{tested_domain}'])
    rec = json.loads(path.read_text())
    s = rec['summary']
    for key in ('gain_over_source_only', 'gain_over_tent', 'gain_over_ce_only', 'source_final',
                'oracle_gain_over_source_only', 'rounds_refused'):
        assert key in s, key
    assert set(s['final']) >= {'Source-only', 'CD-CCA (UTS + AKD + DWC), guarded',
                               'CD-CCA, paper round (ungated)',
                               'Oracle (true labels, every sample)'}
    runs = rec['detail']['runs']
    assert tested_domain in runs['Source-only']['rounds'][0]['accuracy']
    guarded = runs['CD-CCA (UTS + AKD + DWC), guarded']['rounds']
    assert {r['outcome'] for r in guarded[1:]} <= {'shipped', 'refused', ''}
    assert rec['detail']['provenance']['plan']['domains'] == ['fog', tested_domain]


def test_continual_runs_every_row_and_writes_the_summary(tiny_specs, tmp_path):
    teacher, student = tiny_specs
    path = tmp_path / 'continual.json'
    run_bench('continual', ['--out', str(path), '--quick', '--teacher', teacher, '--student',
                            student, '--methods', 'tent,ce_only,ungated,guarded,oracle'])
    rec = json.loads(path.read_text())
    s = rec['summary']
    for key in ('final_drifted_gain_over_source_only', 'min_seed_gain_over_source_only',
                'gain_over_ce_only', 'uplink_ratio_vs_ce_only', 'gain_over_tent',
                'worst_regression', 'worst_round_drop', 'source_final', 'source_min',
                'oracle_gain_over_source_only', 'rounds_refused', 'rollbacks'):
        assert key in s, key
    seed = s['per_seed'][0]
    # Every-sample rows send every token: the UTS row sends less.
    assert 0 < s['uplink_ratio_vs_ce_only'] < 1.0
    assert seed['uplink_bytes']['Oracle (true labels, every sample)'] == seed['uplink_bytes'][
        'L_CE-only (every sample, all tokens)']
    runs = rec['detail']['runs']['0']
    guarded = runs['CD-CCA guarded (default)']
    # A checkpoint at the start, after every round and at the end, every domain each time.
    assert guarded['checkpoints'][0]['event'] == 'start'
    events = [cp['event'] for cp in guarded['checkpoints'][1:]]
    assert len(events) >= len(guarded['rounds'])
    assert all(set(cp['accuracy']) == {'source', 'fog'} for cp in guarded['checkpoints'])
    assert s['worst_regression'] >= 0 and s['worst_round_drop'] >= 0
    assert (tmp_path / 'continual_seed0.png').is_file()
    # Seeds run apart (in parallel) merge into the same summary.
    merged = tmp_path / 'merged.json'
    run_bench('continual', ['--out', str(merged), '--merge', str(path)])
    again = json.loads(merged.read_text())['summary']
    assert {k: v for k, v in again.items()} == s
