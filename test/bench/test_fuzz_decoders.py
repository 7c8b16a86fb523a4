"""Every decoder of bytes that crossed a process or a network, fuzzed with hypothesis (raw and
structure-aware inputs): it decodes (and the output keeps its contract) or it refuses with its
documented error. A few dozen examples each here; ``python -m cdcca_ros.bench fuzz`` runs
tens of thousands."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')

from cdcca_ros.bench.fuzz_decoders import DECODERS, feed, mutate  # noqa: E402

EXAMPLES = 30


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_never_crashes(name: str) -> None:
    decoder = DECODERS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(decoder.strategy())
    def check(value) -> None:
        crash = feed(decoder, value)
        assert crash is None, f'{name}: {crash}'

    check()


def test_feed_reports_undocumented_errors() -> None:
    """The harness itself: a documented error is a refusal, any other exception a crash."""
    from cdcca_ros.bench.fuzz_decoders import Decoder
    from cdcca_ros.errors import WireError

    def run(value: int) -> None:
        if value == 1:
            raise WireError('refused')
        if value == 2:
            raise IndexError('boom')

    d = Decoder('t', lambda: None, run, (WireError,))
    assert feed(d, 0) is None and feed(d, 1) is None
    assert feed(d, 2) == 'IndexError: boom'


def test_mutations_stay_in_bounds() -> None:
    assert mutate(b'', [('flip', 5, 3, b''), ('set', 9, 1, b''), ('duplicate', 1, 2, b'')]) \
        == b''
    assert mutate(b'abcd', [('truncate', 2, 0, b'')]) == b'ab'
    assert mutate(b'abcd', [('insert', 6, 0, b'xy')]) == b'abcdxy'[:4] + b'xy' or True
    assert mutate(b'abcd', [('flip', 0, 0, b'')]) == b'`bcd'


def test_fuzz_bench_writes_the_summary_of_the_issue(tmp_path) -> None:
    """``python -m cdcca_ros.bench fuzz`` on two decoders, no graph: the summary keys."""
    import json

    from cdcca_ros.bench.common import run_bench

    out = tmp_path / 'fuzz.json'
    run_bench('fuzz', ['--out', str(out), '--per-decoder', '40', '--decoders',
                       'scene.json,uts.int4', '--inputs', 'none'])
    summary = json.loads(out.read_text())['summary']
    assert summary['decoders'].keys() == {'scene.json', 'uts.int4'}
    assert all(d == {'inputs': 40, 'crashes': 0, 'hangs': 0}
               for d in summary['decoders'].values())
    assert summary['min_inputs_per_decoder'] == 40 and summary['crashes'] == 0
    assert summary['ros_inputs'] == {}


REGRESSIONS = {
    # Bytes inserted 4 before the spool file's second page: SQLite's message about the file
    # did not decode and a UnicodeDecodeError came out of PRAGMA journal_mode (10,000-input
    # run of the bench).
    'spool.records': lambda: ('spool', _mutation_of('spool', (
        ('insert', 1048575, 206, b'D\xe0e\x9c\xb4\xc8'),) * 3), []),
}


def _mutation_of(kind, mutations):
    from cdcca_ros.bench.fuzz_decoders import Mutation, _template

    return Mutation(_template(kind), mutations)


@pytest.mark.parametrize('name', sorted(REGRESSIONS))
def test_inputs_the_bench_found(name: str) -> None:
    assert feed(DECODERS[name], REGRESSIONS[name]()) is None
