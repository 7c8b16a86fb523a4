"""The demo runs end to end at a reduced size (one short round) on the embedded default."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import Output, alive, children

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

REPO = Path(__file__).resolve().parents[1]
KEYS = {'domain', 'outcome', 'accuracy', 'uplink_bytes', 'downlink_bytes', 'bits_per_param',
        'apply_ms', 'model_version'}


def test_demo_quick_round_writes_json_and_plot(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path))  # the nodes' default state dirs stay in tmp
    out = tmp_path / 'demo'
    proc = subprocess.run([sys.executable, '-m', 'cdcca_ros.demo', '--quick', '--out', str(out),
                           '--round-timeout', '300'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (
        (out / 'nodes.log').read_text()[-4000:] if (out / 'nodes.log').exists() else '')
    result = json.loads((out / 'demo.json').read_text())
    assert len(result['rounds']) == 1
    row = result['rounds'][0]
    assert KEYS <= set(row)
    # Quick mode ships every round (no gate): the whole path ran, the delta was applied.
    assert row['outcome'] == 'shipped' and row['model_version'] == 'robot1:v1'
    # Every domain is measured before and after, the source included, and the teacher too.
    assert set(result['before']) == set(row['accuracy']) == set(result['teacher'])
    assert 'source' in result['before'] and row['domain'] in result['before']
    assert all(0.0 <= a <= 1.0 for a in [*row['accuracy'].values(), *result['teacher'].values()])
    assert row['uplink_bytes'] > 0 and row['downlink_bytes'] > 0
    assert row['bits_per_param'] > 0 and row['apply_ms'] > 0
    assert (out / 'demo.png').stat().st_size > 10_000
    assert 'round' in proc.stdout and 'source-only' in proc.stdout and 'teacher' in proc.stdout
    # Captions of held-out frames before and after a captioning round, for every domain shown.
    caps = result['captions']
    assert {f['domain'] for f in caps['frames']} == {'source', row['domain']}
    assert all(f['before'] and f['after'] and f['reference'] for f in caps['frames'])
    assert set(caps['cider_before']) == set(caps['cider_after']) >= {'in', 'all'}
    assert len(caps['gate']) == 1 and 'before (shipped):' in proc.stdout


def test_sigterm_stops_the_demo_and_every_node_it_started(tmp_path):
    """`kill` (or a service manager) sends SIGTERM: the demo stops its nodes, which run in
    their own sessions, before it exits; none outlives it."""
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, '-m', 'cdcca_ros.demo', '--quick', '--out',
                             str(tmp_path / 'demo')], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    try:
        assert out.wait_for('starting', 120.0), out.text
        deadline = time.monotonic() + 30.0
        while len(children(proc.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        nodes = children(proc.pid)
        assert len(nodes) >= 5, (nodes, out.text)  # the camera, device, cloud and bridges
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60.0) == 128 + signal.SIGTERM, out.text
        deadline = time.monotonic() + 5.0
        while any(alive(pid) for pid in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in nodes if alive(pid)], out.text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
