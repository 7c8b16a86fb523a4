"""Table 2 (captioning) runs end to end (``--quick``, tiny models without caption heads, which
the bench then trains): every row, the summary keys the issue names, and a domain registered
outside the package."""
from __future__ import annotations

import json

import numpy as np

from cdcca_ros.bench.common import run_bench
from cdcca_ros.sim.domains import Domain, register_domain, unregister_domain
from cdcca_ros.sim.shifts import register_shift, unregister_shift


def test_table2_runs_every_method(tiny_specs, tmp_path) -> None:
    @register_shift('test_caption_negative', 'image')
    def negative(image, strength, rng):
        return ((1 - strength) * image + strength * (255 - image.astype(np.float32))).astype(
            np.uint8)

    register_domain(Domain('test_caption_neg', (('test_caption_negative', 0.6),)))
    try:
        teacher, student = tiny_specs
        path = tmp_path / 'table2.json'
        run_bench('table2', ['--out', str(path), '--quick', '--teacher', teacher,
                             '--student', student, '--domains', 'novel,test_caption_neg'])
    finally:
        unregister_domain('test_caption_neg')
        unregister_shift('test_caption_negative')
    rec = json.loads(path.read_text())
    s = rec['summary']
    for key in ('cider_gain_over_source_only', 'bleu4_gain_over_source_only',
                'cider_gain_over_tent', 'out_domain_cider_gain', 'in_domain_drop_max'):
        assert key in s, key
    assert [r[0] for r in rec['table']['rows']] == [
        'Source-only', 'TENT (device, entropy min.)', 'TENT, lr / 10',
        'Teacher captions, L_CE only',
        'CD-CCA (UTS + AKD + DWC)', 'Teacher (cloud, reference)']
    runs = rec['detail']['runs']
    ours, ce = runs['CD-CCA (UTS + AKD + DWC)'], runs['Teacher captions, L_CE only']
    # one round: scores before and after; UTS sent fewer samples, each with fewer tokens
    assert len(ours['scores']) == 2
    assert 0 < ours['uplinked'] < ce['uplinked'] == 8
    assert 0 < ours['uplink_bytes'] < ce['uplink_bytes']
    assert ce['downlink_bytes'] > 0 and runs['Source-only']['downlink_bytes'] == 0
    # CD-CCA is guarded: one gate verdict per round, with the anchor as the device captions it
    # and unrouted; only a shipped candidate reaches the link.
    (verdict,) = ours['gate']
    assert {'new', 'anchor'} <= set(verdict['slices']) and 'anchor_unrouted' in verdict
    assert (ours['downlink_bytes'] > 0) == verdict['ship']
    assert len(ours['routed_to_update']) == 1
    # the registered domain is scored (near: a shift of seen concepts)
    assert s['final']['Source-only']['near']['n'] >= 3
    assert s['final']['Source-only']['in']['n'] == 3
    assert any('no caption head; trained one here' in n for n in rec['notes'])
    assert rec['detail']['markdown'].startswith('| method')
