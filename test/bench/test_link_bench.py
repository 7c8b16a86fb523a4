"""The link bench end to end in --quick mode: router, receiver process, both paths, JSON record.

It measures on a shared machine, so only the record's shape and sanity are checked (keys
present, positive finite figures, nothing lost), never how fast anything was.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

REPO = Path(__file__).resolve().parents[2]
SUMMARY_FIGURES = ('link_over_dds_latency', 'link_over_dds_throughput',
                   'link_over_dds_latency_median_over_sizes',
                   'link_over_dds_throughput_median_over_sizes', 'link_latency_ms',
                   'dds_latency_ms', 'link_msgs_per_s', 'dds_msgs_per_s', 'link_mb_per_s',
                   'dds_mb_per_s', 'reference_bytes')


def _positive_finite(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@pytest.fixture(scope='module')
def record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp('bench') / 'link.json'
    # The test run's own domain id (conftest), so parallel runs never see each other.
    proc = subprocess.run(
        [sys.executable, '-m', 'cdcca_ros.bench', 'link', '--out', str(out), '--quick',
         '--samples', '3', '--domain-id', os.environ['ROS_DOMAIN_ID']],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}'
    return json.loads(out.read_text()), proc.stdout


def test_summary_holds_positive_finite_ratios_and_nothing_was_lost(record) -> None:
    rec, _ = record
    assert rec['bench'] == 'link' and rec['quick'] is True
    summary = rec['summary']
    bad = {k: summary.get(k) for k in SUMMARY_FIGURES if not _positive_finite(summary.get(k))}
    assert not bad, bad
    assert summary['reference_size'] == 'uts'
    assert summary['lost'] == 0
    assert rec['machine']['cpu_count'] >= 1


def test_detail_per_size_and_printed_table(record) -> None:
    rec, stdout = record
    sizes = rec['detail']['sizes']
    assert list(sizes) == ['~2KB', 'uts']
    assert sizes['~2KB']['wire_bytes'] < sizes['uts']['wire_bytes']
    for name, d in sizes.items():
        for path in ('link', 'dds'):
            assert d['latency_ms'][path]['n'] == 3, (name, path)
            assert _positive_finite(d['latency_ms'][path]['median']), (name, path)
            assert _positive_finite(d['throughput_mb_per_s'][path]), (name, path)
        assert d['lost'] == 0
        assert _positive_finite(d['link_spool_to_store_ms']['median'])
    assert rec['summary']['reference_bytes'] == sizes['uts']['wire_bytes']
    # The summary's ratios are the reference size's.
    assert rec['summary']['link_over_dds_latency'] == sizes['uts']['link_over_dds_latency']
    assert len(rec['table']['rows']) == 2 and 'lat x' in rec['table']['headers']
    assert '== link:' in stdout and 'lat x' in stdout and 'uts' in stdout


@pytest.mark.parametrize('dtype', ['fp16', 'int8', 'int4', 'ecq'])
def test_bench_messages_are_what_uts_node_sends(dtype: str) -> None:
    """Every packing the device may use builds a message the cloud decodes (no link needed)."""
    from cdcca_ros.bench.link import BLIP2_DIM, PACK_DTYPES, SizeCase, build_message
    from cdcca_ros.core.uts import PACK_DTYPES as UTS_DTYPES
    from cdcca_ros.nodes.cloud_node import tokens_from_msg

    assert PACK_DTYPES == UTS_DTYPES
    msg = build_message(SizeCase('t', 5, dtype), seed=0)
    tokens, indices = tokens_from_msg(msg)
    assert tokens.shape == (5, BLIP2_DIM) and indices.tolist() == list(msg.kept_indices)
    assert indices.tolist() == sorted(set(indices.tolist()))
