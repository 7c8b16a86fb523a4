"""The cloud for a fleet, on Ray: throughput per worker count, latency, fairness, teacher
batching, and a worker killed mid-round.

``python -m cdcca_ros.bench fleet --devices 128 --workers 1,2 --out FILE.json [--kill-worker]``

Lightweight simulated devices (:mod:`cdcca_ros.bench.fleet_sim`: uplink from the synthetic
world at 0.3-0.5 samples a second each, every device its own drift schedule and UTS setting,
deltas verified by each device's gate, no ROS graph per device) against
:class:`~cdcca_ros.core.fleet.engine.FleetEngine` on a Ray cluster started on this machine.
The devices uplink in an open loop (``--uplink open``): they go on uplinking while their
rounds run, and hold back only while a full round of theirs waits untaken, so every round
carries about ``round.min_samples`` new samples and a fleet that produces faster than the
workers serve keeps them fed (``closed``: the devices of the bench before, which send their
next burst only when their round came back).
Phases, each on fresh actors and a fresh store:

- ``w<N>`` for every ``--workers`` count: every device gets ``--rounds`` rounds; rounds per
  minute over the saturated window (from the first to the last moment the fleet owed at least
  N rounds counting those running; ``rounds_per_min_to_last`` runs on to the moment the last
  device got its ``--rounds``-th), trigger-to-delta times, fairness
  (max/min rounds per device at that moment), teacher batching;
- ``kill`` (``--kill-worker``): the largest worker count again, one worker SIGKILLed in the
  middle of a round once half the devices got one: rounds lost, deltas duplicated, samples
  lost, time to recover;
- ``group_off`` / ``group_on`` (``--grouping-ab``): one worker, every device owed a round at
  once (a full first burst sent, closed loop whatever ``--uplink``: the same rounds in both),
  one device per task against ``--group-max`` devices of one uplink group per task: teacher
  forwards and teacher time per labelled sample.

Round settings (``--profile``): ``light`` (default) is the guarded round shortened (12 steps,
no refit, a 256-sample anchor) so the figures are about scheduling and the run takes minutes;
``node`` is the cloud node's defaults. Models: ``--teacher`` / ``--student`` (default the
bundled pair).
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    model_image_size,
    param_overrides,
)
from cdcca_ros.bench.fleet_sim import (
    FULL_BURST,
    UPLINKS,
    FleetRun,
    KillPlan,
    PhaseRecord,
    SimDevice,
    TokenPool,
    make_profiles,
    percentile,
)
from cdcca_ros.errors import ConfigError

NAME = 'fleet'
DESCRIPTION = ('a fleet of simulated devices against the cloud on Ray: rounds per minute per '
               'worker count, trigger-to-delta time, fairness, teacher batching, a worker '
               'killed mid-round')
TARGETS = (
    Target('rounds_lost', '==', 0, 'issue 18'),
    Target('deltas_duplicated', '==', 0, 'issue 18'),
    Target('samples_lost', '==', 0, 'issue 18 (nothing lost)'),
    Target('speedup_2_workers', '>=', 1.6, 'issue 18 (each worker one core)'),
    Target('fairness', '<=', 1.5, 'issue 18'),
    Target('kill_delay_rounds', '<=', 1.0,
           'issue 18 (a killed worker delays no device by more than one round)'),
)
LIGHT = {'guard.max_steps': 12, 'guard.min_steps': 6, 'dwc.refit_steps': 0}
LIGHT_ANCHOR_LIMIT = 256
OBJECT_STORE_BYTES = 256 * 1024 * 1024
WORKER_NICENESS_ENV = 'RAY_worker_niceness'  # Ray's raylet setting (default 15)
UPLINK_NOTES = {
    'open': 'open loop (a device uplinks while its rounds run and holds back only while a '
            'full round of its samples waits untaken: rounds of about round.min_samples new '
            'samples)',
    'unbounded': 'open loop without holding back (a round takes everything waiting: rounds '
                 'grow when the workers fall behind)',
    'closed': 'closed loop (a device sends its next burst when its round came back)',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--devices', type=int, default=None,
                        help='simulated devices (default 128, quick 6)')
    parser.add_argument('--workers', default='1,2',
                        help='comma-separated worker counts, one phase each (default 1,2)')
    parser.add_argument('--rounds', type=int, default=None,
                        help='rounds every device gets per phase (default 3, quick 1)')
    parser.add_argument('--min-samples', type=int, default=None,
                        help='round.min_samples: samples a round is owed after (default 16, '
                             'quick 4)')
    parser.add_argument('--rate', default='0.3,0.5',
                        help='uplinked samples a second per device, low,high (default 0.3,0.5)')
    parser.add_argument('--uplink', choices=UPLINKS, default='open',
                        help='open: devices uplink at their rate while their rounds run, '
                             'holding back only while a round of theirs waits untaken '
                             '(default); unbounded: never holding back (rounds grow under '
                             'saturation); closed: the next burst only after the round came '
                             'back')
    parser.add_argument('--group-max', type=int, default=4,
                        help='devices of one uplink group per task (default 4; 1: none)')
    parser.add_argument('--kill-worker', action='store_true',
                        help='add a phase with a worker SIGKILLed mid-round')
    parser.add_argument('--grouping-ab', action=argparse.BooleanOptionalAction, default=True,
                        help='measure what uplink grouping saves (default on)')
    parser.add_argument('--ab-devices', type=int, default=None,
                        help='devices of the grouping phases (default 32, quick 6)')
    parser.add_argument('--profile', choices=('light', 'node'), default='light',
                        help='round settings: light (short guarded rounds, default) or node '
                             '(the cloud node defaults)')
    parser.add_argument('--cloud', action='append', default=[], metavar='PARAM=VALUE',
                        help='override a cloud_node parameter of the round (repeatable, '
                             'applied over --profile), e.g. guard.max_steps=40')
    parser.add_argument('--max-minutes', type=float, default=30.0,
                        help='time cap of one phase (default 30)')
    parser.add_argument('--pool', type=int, default=None,
                        help='world samples per domain the devices draw from (default 48, '
                             'quick 8)')


def _round_config(profile: str, min_samples: int, cloud: Sequence[str] = ()) -> Any:
    """The round settings of ``profile`` with ``round.min_samples``, then ``cloud``'s
    ``PARAM=VALUE`` overrides."""
    from cdcca_ros.core.cloud_runtime import CloudConfig
    from cdcca_ros.nodes.tables import validate

    params = validate('cloud_node', {'round.min_samples': min_samples,
                                     'round.max_wait_s': 3600.0,
                                     **(LIGHT if profile == 'light' else {}),
                                     **param_overrides(cloud, 'cloud_node')})
    cfg = CloudConfig.from_params(params)
    if profile == 'light':
        cfg.guard = cfg.guard.with_(anchor_limit=LIGHT_ANCHOR_LIMIT)
    return cfg


def run(ctx: BenchContext) -> BenchResult:
    import ray
    import torch

    from cdcca_ros.core.fleet.engine import FleetEngine, FleetOptions
    from cdcca_ros.core.wire import generate_keypair, state_dict_hash

    a, quick = ctx.args, ctx.quick
    n_dev = a.devices or (6 if quick else 128)
    rounds = a.rounds or (2 if quick else 3)
    min_samples = a.min_samples or (4 if quick else 16)
    ab_devices = a.ab_devices or (6 if quick else 32)
    pool_n = a.pool or (8 if quick else 48)
    try:
        workers = sorted({int(w) for w in a.workers.split(',')})
        rates = tuple(float(r) for r in a.rate.split(','))
    except ValueError as err:
        raise ConfigError(f'--workers {a.workers!r} / --rate {a.rate!r}: {err}') from err
    if min(workers) < 1 or n_dev < 1 or rounds < 1 or len(rates) != 2 or min(rates) <= 0:
        raise ConfigError('--workers, --devices, --rounds must be >= 1 and --rate two '
                          'positive numbers')
    log = _logger()
    cfg = _round_config(a.profile, min_samples, a.cloud)
    min_samples = cfg.min_samples  # a --cloud round.min_samples=N sizes the devices' bursts too
    student = ctx.models.student()
    pool = TokenPool.build(student, ctx.seed, pool_n, model_image_size(student, 64),
                           start=1_800_000)
    base = student.trainable_state_dict()
    base_hash = state_dict_hash(base)
    private, public = generate_keypair()
    specs = {'teacher': ctx.models.spec('teacher'), 'student': ctx.models.spec('student')}
    max_w = max(workers)
    # Ray starts its workers 15 steps nicer than the raylet by default: on a shared machine
    # the workers (the thing measured) would yield to every other process, the bench's own
    # driver included. Workers run at the driver's priority here, unless the caller set it.
    os.environ.setdefault(WORKER_NICENESS_ENV, '0')
    # A small object store: results and task arguments are a few kB each (tokens go through
    # the store's folder), and the machine is shared.
    ray.init(num_cpus=max_w + 1, include_dashboard=False, namespace='cdcca-bench',
             log_to_driver=False, object_store_memory=OBJECT_STORE_BYTES)
    phases: dict[str, PhaseRecord] = {}
    load: dict[str, Any] = {'start': _loadavg()}

    def phase(name: str, w: int, devices: int, n_rounds: int, kill: KillPlan | None = None,
              group_max: int | None = None, presend: float = 1.0, prefix: str = 'robot',
              uplink: str = a.uplink) -> PhaseRecord:
        opts = FleetOptions(workers=w, store=str(ctx.workdir / name),
                            group_max=group_max or a.group_max, threads=ctx.args.threads)
        t0 = time.monotonic()
        engine = FleetEngine(specs['teacher'], specs['student'], 'cpu', None, private, cfg,
                             '', opts)
        log(f'[{name}] {w} worker(s) up in {time.monotonic() - t0:.1f} s; {devices} devices, '
            f'{n_rounds} round(s) each')
        profiles = make_profiles(devices, ctx.seed + len(phases), pool.space.num_tokens, rates,
                                 pool.domains)
        for p in profiles:
            p.device_id = p.device_id.replace('robot', prefix)
        sims = [SimDevice(p, pool, min_samples, public, base, base_hash,
                          closed=uplink == 'closed') for p in profiles]
        try:
            engine.teacher_report(reset=True)
            record = FleetRun(engine, sims, n_rounds, a.max_minutes * 60.0, kill=kill,
                              presend=presend, log=log, uplink=uplink).run(name)
        finally:
            engine.close()
        log(f'[{name}] {len(record.rounds)} rounds in {record.end:.0f} s')
        return record

    try:
        for w in workers:
            phases[f'w{w}'] = phase(f'w{w}', w, n_dev, rounds)
        if a.kill_worker:
            phases['kill'] = phase('kill', max_w, n_dev, max(1, rounds - 1),
                                   kill=KillPlan(after_rounds=max(1, n_dev // 2)))
        if a.grouping_ab:
            for name, g in (('group_off', 1), ('group_on', max(2, a.group_max))):
                phases[name] = phase(name, 1, ab_devices, 1, group_max=g, presend=FULL_BURST,
                                     prefix=name.split('_')[1], uplink='closed')
    finally:
        ray.shutdown()
    load['end'] = _loadavg()
    del torch
    return _result(phases, workers, load, ctx, cfg, n_dev, rounds, min_samples, rates)


# --- figures ---------------------------------------------------------------------------------
def phase_figures(rec: PhaseRecord) -> dict[str, Any]:
    """Throughput, latency, fairness, batching of one phase."""
    end = rec.cutoff if rec.cutoff is not None else max((r['done'] for r in rec.rounds),
                                                        default=0.0)
    start = next((t for t, due, busy in rec.due if due + busy >= rec.workers), None)
    if start is None:
        start = min((r['dispatch'] for r in rec.rounds), default=0.0)
    # The saturated window ends at the last moment there was work for every worker: after it
    # the last devices' bursts trickle in (the drain), workers idle for want of work and
    # more workers cannot help, whatever their number.
    saturated = [t for t, due, busy in rec.due
                 if due + busy >= rec.workers and start <= t <= end]
    last = saturated[-1] if saturated else end
    window = [r for r in rec.rounds if start <= r['done'] <= last]
    span = max(last - start, 1e-9)
    to_end = [r for r in rec.rounds if start <= r['done'] <= end]
    served = list(rec.served_at_cutoff.values())
    task_s = [r['done'] - r['dispatch'] for r in rec.rounds]
    new_samples = [r['samples'] for r in rec.rounds if r.get('samples') is not None]
    latency = [r['done'] - r['trigger'] for r in rec.rounds
               if r.get('delta') == 'applied' and r['trigger'] is not None]
    answered = [r['done'] - r['trigger'] for r in rec.rounds if r['trigger'] is not None]
    outcomes: dict[str, int] = {}
    refusals: dict[str, int] = {}
    for r in rec.rounds:
        outcomes[r['outcome']] = outcomes.get(r['outcome'], 0) + 1
        if r['outcome'] == 'refused':
            kind = refusal_kind(r.get('reason'))
            refusals[kind] = refusals.get(kind, 0) + 1
    contended = [due >= 1 and busy >= rec.workers for _, due, busy in rec.due]
    busy = [b for t, _, b in rec.due if start <= t <= last]
    teacher = rec.teacher[0] if rec.teacher else {}
    return {
        'workers': rec.workers, 'devices': rec.devices, 'rounds': len(rec.rounds),
        'rounds_in_window': len(window), 'window_s': round(span, 2),
        'rounds_per_min': 60.0 * len(window) / span if window else None,
        'new_samples_per_min': (60.0 * sum(r.get('samples') or 0 for r in window) / span
                                if window else None),
        'rounds_per_min_to_last': (60.0 * len(to_end) / max(end - start, 1e-9)
                                   if to_end else None),
        'worker_busy_share': (sum(busy) / len(busy) / rec.workers) if busy else None,
        'task_s_p50': percentile(task_s, 50), 'task_s_p90': percentile(task_s, 90),
        'first_dispatch_s': min((r['dispatch'] for r in rec.rounds), default=None),
        'round_new_samples_p50': percentile(new_samples, 50),
        'round_new_samples_p90': percentile(new_samples, 90),
        'trigger_to_delta_p50_s': percentile(latency, 50),
        'trigger_to_delta_p99_s': percentile(latency, 99),
        'deltas_applied': len(latency),
        'trigger_to_result_p50_s': percentile(answered, 50),
        'trigger_to_result_p99_s': percentile(answered, 99),
        'fairness': (max(served) / min(served)) if served and min(served) > 0 else None,
        'served_min': min(served) if served else 0, 'served_max': max(served) if served else 0,
        'contended_share': (sum(contended) / len(contended)) if contended else None,
        'outcomes': outcomes, 'refusals': refusals, 'owed_after_drain': rec.owed_after_drain,
        'samples_sent': rec.samples_sent, 'samples_lost': rec.samples_lost,
        'samples_held': rec.samples_held, 'sent_while_running': rec.sent_while_running,
        'uplink': rec.uplink,
        'device_counts': rec.device_counts, 'engine': rec.engine,
        'teacher_samples_per_forward': (teacher.get('label') or {}).get('samples_per_forward'),
        'teacher_occupancy': (teacher.get('label') or {}).get('occupancy'),
        'teacher': teacher, 'driver_cpu_s': round(rec.driver_cpu_s, 1),
        'duration_s': round(rec.end, 1), 'events': dict(rec.events),
        'actor_threads': {role: [a['threads'] for a in infos]
                          for role, infos in rec.actors.items()},
        'cpu': _cpu_figures(rec),
        'store_bytes_per_device': rec.store_bytes / rec.devices if rec.devices else None}


def _cpu_figures(rec: PhaseRecord) -> dict[str, Any]:
    """Where the machine's CPU went from the phase's start to its cutoff: cores used on
    average by the workers, the teacher, this process and everything else on the machine,
    and the worker CPU seconds a round cost (what contention cannot change)."""
    cpu = rec.cpu
    wall = cpu.get('wall_s') or 0.0
    if not wall:
        return {}
    out: dict[str, Any] = {'wall_s': round(wall, 2)}
    ours = 0.0
    for role in ('workers', 'teacher', 'driver'):
        used = cpu.get(role)
        out[f'{role}_cores'] = None if used is None else round(used / wall, 3)
        ours += used or 0.0
    machine = cpu.get('machine')
    out['machine_cores'] = None if machine is None else round(machine / wall, 3)
    # Ray's own processes (raylet, GCS) count here too: a few percent of a core.
    out['others_cores'] = None if machine is None else round((machine - ours) / wall, 3)
    done = cpu.get('rounds') or 0
    out['worker_cpu_s_per_round'] = (round(cpu['workers'] / done, 3)
                                     if done and cpu.get('workers') is not None else None)
    out['core_share_per_worker'] = (round(cpu['workers'] / wall / rec.workers, 3)
                                    if cpu.get('workers') is not None else None)
    return out


def refusal_kind(reason: str | None) -> str:
    """Why the gate refused a round, in a word (from its reason text)."""
    text = (reason or '').lower()
    for word, kind in (('anchor', 'anchor_fell'), ('new data gains', 'no_significant_gain'),
                       ('replay', 'replay_fell'), ('no held-out', 'no_new_slice')):
        if word in text:
            return kind
    return 'other'


def kill_figures(rec: PhaseRecord, figures: dict[str, Any]) -> dict[str, Any]:
    """What the killed worker cost: rounds lost, duplicates, time to recover."""
    kill = rec.kill
    if not kill:
        return {'killed': False}
    after = [r for r in rec.rounds if r['done'] >= kill['t']]
    victims = [r for r in after if r['device'] in kill['devices'] and r['attempts'] >= 2]
    task = figures['task_s_p50'] or float('nan')
    served = {r['device'] for r in after}
    delay = [((r['done'] - r['dispatch']) - task) / task for r in victims]
    return {'killed': True, 'worker': kill['worker'], 'in_round_s': round(kill['in_round_s'], 2),
            'training': kill.get('training'),
            'replayed': sum(bool(r.get('replayed')) for r in victims),
            'victims': kill['devices'],
            'victims_served': sorted(set(kill['devices']) & served),
            'victim_attempts': [r['attempts'] for r in victims],
            'recover_s': (max(r['done'] for r in victims) - kill['t']) if victims else None,
            'detect_s': (kill['detected_t'] - kill['t']) if 'detected_t' in kill else None,
            'restart_s': (kill['alive_t'] - kill['t']) if 'alive_t' in kill else None,
            'kill_delay_rounds': max(delay) if delay else None,
            'lost_tickets': len(set(kill['devices']) - served)}


def grouping_figures(off: PhaseRecord, on: PhaseRecord) -> dict[str, Any]:
    """Teacher work per labelled sample with one device per task and with uplink groups."""
    def per(rec: PhaseRecord) -> dict[str, Any]:
        t = rec.teacher[0] if rec.teacher else {}
        lab, tgt = t.get('label') or {}, t.get('targets') or {}
        samples = lab.get('samples') or 0
        forwards = (lab.get('forwards') or 0) + (tgt.get('forwards') or 0)
        busy = (lab.get('busy_s') or 0.0) + (tgt.get('busy_s') or 0.0)
        figures = phase_figures(rec)
        return {'labelled': samples, 'teacher_forwards': forwards,
                'forwards_per_100_samples': 100.0 * forwards / samples if samples else None,
                'teacher_ms_per_sample': 1000.0 * busy / samples if samples else None,
                'label_samples_per_forward': lab.get('samples_per_forward'),
                'rounds_per_min': figures['rounds_per_min'], 'task_s_p50': figures['task_s_p50']}

    a, b = per(off), per(on)

    def saving(key: str) -> float | None:
        if a[key] and b[key] is not None:
            return 1.0 - b[key] / a[key]
        return None

    return {'off': a, 'on': b, 'forwards_saved': saving('forwards_per_100_samples'),
            'teacher_time_saved': saving('teacher_ms_per_sample')}


def _result(phases: dict[str, PhaseRecord], workers: list[int], load: dict[str, Any],
            ctx: BenchContext, cfg: Any, n_dev: int, rounds: int, min_samples: int,
            rates: tuple[float, ...]) -> BenchResult:
    per_w = {str(w): phase_figures(phases[f'w{w}']) for w in workers}
    top = per_w[str(max(workers))]
    summary: dict[str, Any] = {
        'devices': n_dev, 'rounds_per_device': rounds,
        'rounds_per_min': {w: f['rounds_per_min'] for w, f in per_w.items()},
        'speedup_2_workers': (per_w['2']['rounds_per_min'] / per_w['1']['rounds_per_min']
                              if '1' in per_w and '2' in per_w and per_w['1']['rounds_per_min']
                              and per_w['2']['rounds_per_min'] else None),
        'speedup_2_workers_samples': (
            per_w['2']['new_samples_per_min'] / per_w['1']['new_samples_per_min']
            if '1' in per_w and '2' in per_w and per_w['1']['new_samples_per_min']
            and per_w['2']['new_samples_per_min'] else None),
        'worker_busy_share': {w: f['worker_busy_share'] for w, f in per_w.items()},
        'round_new_samples_p50': {w: f['round_new_samples_p50'] for w, f in per_w.items()},
        'uplink': ctx.args.uplink,
        'core_share_per_worker': {w: f['cpu'].get('core_share_per_worker')
                                  for w, f in per_w.items()},
        'others_cores': {w: f['cpu'].get('others_cores') for w, f in per_w.items()},
        'worker_cpu_s_per_round': {w: f['cpu'].get('worker_cpu_s_per_round')
                                   for w, f in per_w.items()},
        'trigger_to_delta_p50_s': top['trigger_to_delta_p50_s'],
        'trigger_to_delta_p99_s': top['trigger_to_delta_p99_s'],
        'trigger_to_result_p50_s': top['trigger_to_result_p50_s'],
        'trigger_to_result_p99_s': top['trigger_to_result_p99_s'],
        'fairness': max((f['fairness'] for f in per_w.values() if f['fairness'] is not None),
                        default=None),
        'task_s_p50': {w: f['task_s_p50'] for w, f in per_w.items()},
        'teacher_samples_per_forward': top['teacher_samples_per_forward'],
        'teacher_occupancy': top['teacher_occupancy'],
        'per_workers': per_w,
    }
    all_phases = {name: phase_figures(rec) for name, rec in phases.items()}
    lost = sum(f['owed_after_drain'] for f in all_phases.values())
    summary['deltas_duplicated'] = sum(f['device_counts'].get('duplicate', 0)
                                       for f in all_phases.values())
    summary['deltas_rejected'] = sum(f['device_counts'].get('rejected', 0)
                                     for f in all_phases.values())
    summary['samples_lost'] = sum(f['samples_lost'] for f in all_phases.values())
    summary['deltas_applied'] = sum(f['deltas_applied'] for f in all_phases.values())
    summary['outcomes'] = _add(f['outcomes'] for f in all_phases.values())
    summary['refusals'] = _add(f['refusals'] for f in all_phases.values())
    summary['contended_share'] = {w: f['contended_share'] for w, f in per_w.items()}
    if 'kill' in phases:
        k = kill_figures(phases['kill'], all_phases['kill'])
        lost += k.get('lost_tickets', 0)
        summary.update(recover_s=k.get('recover_s'), restart_s=k.get('restart_s'),
                       kill_delay_rounds=k.get('kill_delay_rounds'), kill=k,
                       kill_rounds_per_min=all_phases['kill']['rounds_per_min'])
    summary['rounds_lost'] = lost
    if 'group_off' in phases and 'group_on' in phases:
        summary['grouping'] = grouping_figures(phases['group_off'], phases['group_on'])
    summary['load'] = load
    headers = ['phase', 'workers', 'devices', 'rounds', 'rounds/min', 'task s p50',
               'trigger->delta p50 s', 'p99 s', 'fairness', 'teacher samples/fwd', 'lost']
    rows = [[name, f['workers'], f['devices'], f['rounds'], f['rounds_per_min'],
             f['task_s_p50'], f['trigger_to_delta_p50_s'], f['trigger_to_delta_p99_s'],
             f['fairness'], f['teacher_samples_per_forward'],
             f['owed_after_drain'] + f['samples_lost']] for name, f in all_phases.items()]
    notes = [
        f'models: teacher {ctx.args.teacher}, student {ctx.args.student}; round profile '
        f'{ctx.args.profile} (guard.max_steps {cfg.guard.train.max_steps}, refit '
        f'{cfg.refit.steps} steps, anchor limit {cfg.guard.anchor_limit}); round.min_samples '
        f'{min_samples}, round.max_wait_s {cfg.max_wait_s:g}; overrides '
        f'{ctx.args.cloud or "none"}; device uplink {rates[0]}-{rates[1]} samples/s, '
        + UPLINK_NOTES[ctx.args.uplink],
        f'Ray local cluster on this machine: {os.cpu_count()} cores shared with other work '
        f'(load average {load["start"]} at the start, {load.get("end")} at the end); each '
        'worker and the teacher one torch thread, at the bench process\'s priority '
        f'({WORKER_NICENESS_ENV}={os.environ.get(WORKER_NICENESS_ENV)}, niceness '
        f'{os.nice(0)}); the bench process (devices, store writes, '
        'scheduling) runs beside them',
        'cpu: from a phase\'s start to its cutoff, the share of a core each worker got and '
        'the cores everything else on the machine used (other work, Ray\'s own processes): '
        'a speedup below the workers\' cores is contention, not the fleet',
        'rounds/min: device rounds finished between the first and the last moment as many '
        'rounds were owed (running included) as there are workers, i.e. while more workers '
        'could have helped (refused rounds count: they cost the same work); to_last: up to '
        'the moment every device had its rounds, the drain included',
        'trigger->delta: from the moment the device\'s round was owed (round.min_samples of '
        'its samples waiting) to its delta at the device, shipped rounds only; in a saturated '
        'fleet this is mostly queueing behind the other devices; trigger->result: the same to '
        'the round\'s result whatever its outcome (a refused round answers too)',
    ]
    if 'grouping' in summary:
        g = summary['grouping']
        notes.append(f'grouping: teacher forwards per 100 labelled samples '
                     f'{_f(g["off"]["forwards_per_100_samples"])} -> '
                     f'{_f(g["on"]["forwards_per_100_samples"])}, teacher ms per sample '
                     f'{_f(g["off"]["teacher_ms_per_sample"])} -> '
                     f'{_f(g["on"]["teacher_ms_per_sample"])}')
    return BenchResult(summary=summary, headers=headers, rows=rows,
                       detail={'phases': all_phases,
                               'rounds': {n: r.rounds for n, r in phases.items()},
                               'kill': {n: r.kill for n, r in phases.items() if r.kill}},
                       notes=notes)


def _add(counts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _f(x: Any) -> str:
    return '-' if x is None else f'{x:.3g}'


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None


def _logger():
    import sys

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    return log
