"""Fuzzing at volume: every decoder, then every ROS input of every node from another process.

``python -m cdcca_ros.bench fuzz --per-decoder N --per-input M --out FILE.json``

1. **Decoders** (:mod:`cdcca_ros.bench.fuzz_decoders`): hypothesis generates ``N`` inputs per
   decoder (raw bytes and valid encodings with mutated bytes or fields); an input that takes
   more than ``--hang-s`` of CPU time is a hang, and so is one still running after six times
   that of wall time (blocked); CPU time, not wall time, because on a loaded machine a
   process can wait seconds for a core. A crash is any exception other than the decoder's
   documented error types, or an output breaking its contract. Resident memory is sampled
   every 200 inputs.
2. **ROS inputs** (:mod:`cdcca_ros.bench.fuzz_ros`): the demo graph (camera, device + UTS,
   both bridges over a Zenoh router with mutual TLS, cloud) runs as real processes; this
   process, a separate rclpy participant, sends ``M`` hostile messages to each input of each
   node (``--inputs none`` skips this part), then checks every node is alive, the device's
   adapter hash is unchanged, the refusals are counted on ``/diagnostics``, and answers to
   good questions are unchanged.

``summary``: ``decoders`` (name -> ``{"inputs", "crashes", "hangs"}``), ``ros_inputs`` (input
-> ``{"messages", "node_alive", "adapter_changed"}``), ``min_inputs_per_decoder``,
``min_messages_per_input``, ``crashes``, ``hangs``, ``adapter_changes``, ``nodes_down``.
"""
from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from cdcca_ros.bench.common import BenchContext, BenchResult, Target

NAME = 'fuzz'
DESCRIPTION = ('hostile input at volume: every decoder (hypothesis, raw + structure-aware) and '
               'every ROS input of every node from another rclpy process')
TARGETS = (
    Target('min_inputs_per_decoder', '>=', 1e4, 'issue 16'),
    Target('crashes', '==', 0, 'issue 16'),
    Target('hangs', '==', 0, 'issue 16'),
    Target('min_messages_per_input', '>=', 1000, 'issue 16'),
    Target('adapter_changes', '==', 0, 'issue 16'),
    Target('nodes_down', '==', 0, 'issue 16'),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--per-decoder', type=int, default=10_000,
                        help='inputs per decoder (default 10,000)')
    parser.add_argument('--per-input', type=int, default=1000,
                        help='hostile messages per ROS input (default 1,000)')
    parser.add_argument('--decoders', default='all',
                        help='comma-separated decoder names, "all" or "none"')
    parser.add_argument('--inputs', default='all',
                        help='comma-separated ROS inputs, "all" or "none"')
    parser.add_argument('--hang-s', type=float, default=5.0,
                        help='one input taking more CPU seconds than this is a hang (or six '
                             'times as many wall seconds)')


class _Hang(BaseException):
    """Raised by the alarm when one input runs past the hang limit."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def fuzz_decoder(name: str, n: int, seed: int, hang_s: float) -> dict[str, Any]:
    """Feed ``n`` hypothesis inputs to one decoder; counts, slowest input, memory."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from cdcca_ros.bench.fuzz_decoders import DECODERS, feed, rss_bytes

    decoder = DECODERS[name]
    stats: dict[str, Any] = {'inputs': 0, 'crashes': 0, 'hangs': 0, 'slowest_s': 0.0,
                             'slowest_cpu_s': 0.0, 'examples': []}
    outcomes: dict[str, int] = {}
    rss0 = rss_bytes()
    peak = rss0

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(decoder.strategy())
    def one(value: Any) -> None:
        nonlocal peak
        stats['inputs'] += 1
        t0, c0 = time.perf_counter(), time.process_time()
        signal.setitimer(signal.ITIMER_REAL, 6 * hang_s)
        try:
            crash = feed(decoder, value, outcomes)
        except _Hang:
            crash = f'hang: blocked over {6 * hang_s} s'
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        cpu = time.process_time() - c0
        if crash is None and cpu > hang_s:
            crash = f'hang: {cpu:.1f} s of CPU'
        if crash is not None and crash.startswith('hang'):
            stats['hangs'] += 1
        stats['slowest_s'] = max(stats['slowest_s'], time.perf_counter() - t0)
        stats['slowest_cpu_s'] = max(stats['slowest_cpu_s'], cpu)
        if crash is not None:
            if not crash.startswith('hang'):
                stats['crashes'] += 1
            if len(stats['examples']) < 3:
                stats['examples'].append({'error': crash, 'input': repr(value)[:300]})
        if stats['inputs'] % 200 == 0:
            peak = max(peak, rss_bytes())

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    t0 = time.perf_counter()
    try:
        one()
    finally:
        signal.signal(signal.SIGALRM, previous)
    stats['seconds'] = round(time.perf_counter() - t0, 1)
    stats['decoded'], stats['refused'] = outcomes.get('decoded', 0), outcomes.get('refused', 0)
    stats['rss_growth_mb'] = round((rss_bytes() - rss0) / 2**20, 1)
    stats['rss_peak_growth_mb'] = round((max(peak, rss_bytes()) - rss0) / 2**20, 1)
    stats['slowest_s'] = round(stats['slowest_s'], 3)
    stats['slowest_cpu_s'] = round(stats['slowest_cpu_s'], 3)
    return stats


def _names(arg: str, known: list[str], what: str) -> list[str]:
    from cdcca_ros.errors import ConfigError

    if arg == 'all':
        return known
    if arg == 'none':
        return []
    names = [n.strip() for n in arg.split(',') if n.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigError(f'unknown {what} {unknown}; known: {known}')
    return names


def run(ctx: BenchContext) -> BenchResult:
    from cdcca_ros.bench.fuzz_decoders import DECODERS
    from cdcca_ros.bench.fuzz_ros import INPUTS, fuzz_ros_inputs

    args = ctx.args
    per_decoder = 200 if args.quick else args.per_decoder
    per_input = 20 if args.quick else args.per_input
    decoders = _names(args.decoders, sorted(DECODERS), 'decoders')
    inputs = _names(args.inputs, list(INPUTS), 'ROS inputs')
    rows: list[list[Any]] = []
    detail: dict[str, Any] = {'decoders': {}, 'ros': {}}
    summary_dec: dict[str, Any] = {}
    for i, name in enumerate(decoders):
        stats = fuzz_decoder(name, per_decoder, args.seed + i, args.hang_s)
        detail['decoders'][name] = stats
        summary_dec[name] = {k: stats[k] for k in ('inputs', 'crashes', 'hangs')}
        rows.append([name, stats['inputs'], stats['decoded'], stats['refused'],
                     stats['crashes'], stats['hangs'], stats['slowest_cpu_s'],
                     stats['rss_peak_growth_mb'], stats['seconds']])
        print(f'  {name}: {stats["inputs"]} inputs, {stats["crashes"]} crashes, '
              f'{stats["hangs"]} hangs, slowest {stats["slowest_cpu_s"]} s CPU '
              f'({stats["slowest_s"]} s wall), {stats["seconds"]} s', flush=True)
    ros: dict[str, Any] = {}
    if inputs:
        ros = fuzz_ros_inputs(inputs, per_input, ctx.workdir / 'graph', seed=args.seed,
                              keep_log=args.out.with_suffix('.nodes.log'))
        detail['ros'] = ros
        for name in inputs:
            r = ros['inputs'][name]
            rows.append([f'ros:{name}', r['messages'], r['accepted'], r['refused'], '-', '-',
                         '-', '-', r['seconds']])
    ros_inputs = {name: {'messages': r['messages'], 'node_alive': r['node_alive'],
                         'adapter_changed': r['adapter_changed']}
                  for name, r in ros.get('inputs', {}).items()}
    summary: dict[str, Any] = {
        'decoders': summary_dec,
        'ros_inputs': ros_inputs,
        'min_inputs_per_decoder': min((s['inputs'] for s in summary_dec.values()),
                                      default=None),
        'min_messages_per_input': min((r['messages'] for r in ros_inputs.values()),
                                      default=None),
        'crashes': sum(s['crashes'] for s in summary_dec.values()),
        'hangs': sum(s['hangs'] for s in summary_dec.values()),
        'adapter_changes': sum(bool(r['adapter_changed']) for r in ros_inputs.values())
        if ros_inputs else None,
        'nodes_down': len(ros.get('nodes_down', [])) if ros else None,
        'answers_unchanged': ros.get('answers_unchanged'),
        'refusals_counted': ros.get('refusals_counted'),
    }
    notes = [f'{per_decoder} hypothesis inputs per decoder (seed {args.seed}); a hang is an '
             f'input taking over {args.hang_s} s of CPU (or {6 * args.hang_s} s of wall time); '
             'a crash is an exception outside the decoder\'s documented error types or an '
             'output breaking its contract']
    if ros:
        notes.append(f'{per_input} hostile messages per ROS input from this process (its own '
                     'rclpy participant) into the demo graph run as separate processes; '
                     f'graph up in {ros.get("startup_s")} s')
    return BenchResult(summary=summary,
                       headers=['target', 'inputs', 'decoded', 'refused', 'crashes', 'hangs',
                                'slowest CPU s', 'RSS peak +MB', 'seconds'],
                       rows=rows, detail=detail, notes=notes)
