"""Soak: the whole demo graph for minutes, at the device's capacity, with rounds and a link drop.

``python -m cdcca_ros.bench soak --minutes 10 --out FILE.json``

The demo graph runs as processes (:class:`cdcca_ros.bench.graph.Graph`: camera drifting
through the domains, device + UTS, both bridges over a Zenoh router with mutual TLS, the cloud
node with rounds every ``--round-samples`` uplinked samples). From this process one client asks
``ask`` questions back to back about the latest frame (one outstanding: the device's capacity)
and publishes ``question`` messages beside them; every few seconds it samples each process's
resident memory and every bounded queue from ``/diagnostics``; every ``--flood-every-s`` a
burst of ``--flood-size`` question messages fills the device's question queue to its bound
(what does not fit is dropped and counted). In the middle the router is
killed for ``--link-drop-s`` seconds and restarted: both bridges must reconnect on their own.

``summary``: ``rss_growth_max`` (worst process, fraction: median of the last fifth of the
samples against the first sample after ``--warmup-s``), ``queue_over_bound`` (samples of a
queue above its bound), ``queue_max`` (each queue's largest length and bound),
``answers_lost`` (answers that never appeared on ``answer``, plus ``question`` messages never
answered nor counted as dropped; split into ``questions_never_seen``, lost before the node,
and ``answers_not_delivered``; ``asks_failed``: asks without a successful response),
``p50/p99`` of the ``ask`` latency outside and during hot-applies (half a second around each)
and ``p99_during_apply_over_p99``, ``rounds``, ``deltas_applied``, ``reconnect_s`` (router
back -> both bridges connected), ``uplink_lost`` (samples the device's bridge took minus
those the cloud acknowledged at the end).
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import numpy as np

from cdcca_ros.bench.common import BenchContext, BenchResult, Target

NAME = 'soak'
DESCRIPTION = ('the demo graph for minutes at the device\'s capacity, with rounds, hot-applies '
               'and a link drop: memory, queues, lost answers, latency during applies')
TARGETS = (
    Target('rss_growth_max', '<=', 0.05, 'issue 16'),
    Target('queue_over_bound', '==', 0, 'issue 16'),
    Target('answers_lost', '==', 0, 'issue 16'),
    Target('uplink_lost', '==', 0, 'issue 16'),
)
QUESTIONS = ('what color is the object?', 'how many objects are there?',
             'what shape is the object?', 'is there a circle?', 'where is the object?')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--minutes', type=float, default=10.0, help='length of the run')
    parser.add_argument('--link-drop-s', type=float, default=60.0,
                        help='how long the router is down in the middle of the run')
    parser.add_argument('--round-samples', type=int, default=24,
                        help='uplinked samples per cloud round')
    parser.add_argument('--uplink-every', type=int, default=20,
                        help='one ask in this many offers its sample for the uplink (the rest '
                             'no_uplink: the cloud trains far slower than the device answers)')
    parser.add_argument('--topic-rate', type=float, default=1.0,
                        help='question messages per second beside the asks')
    parser.add_argument('--flood-every-s', type=float, default=60.0,
                        help='a burst of question messages this often (queues to their bound)')
    parser.add_argument('--flood-size', type=int, default=150,
                        help='question messages per burst (the device queue holds 100)')
    parser.add_argument('--sample-s', type=float, default=5.0,
                        help='seconds between memory and queue samples')
    parser.add_argument('--warmup-s', type=float, default=180.0,
                        help='memory growth is measured from this long after the start (one '
                             'cycle of the camera\'s domains renders every kind of scene)')


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _queues(client: Any) -> dict[str, tuple[int, int]]:
    """(length, bound) of every bounded queue the diagnostics report (high-water marks where
    the node keeps one)."""
    from cdcca_ros.nodes.delta_msgs import DeltaReassembler
    from cdcca_ros.nodes.tables import defaults

    out: dict[str, tuple[int, int]] = {}
    dev, uts = client.diag('device_node'), client.diag('uts_node')
    bridge = client.diag('device_bridge')
    for name in ('question', 'delta'):
        if f'{name}_queue_max' in dev:
            out[f'device.{name}_queue'] = (int(dev[f'{name}_queue_max']),
                                           int(dev[f'{name}_queue_bound']))
    if 'queue_max' in uts:
        out['uts.queue'] = (int(uts['queue_max']), int(uts['queue_bound']))
    if 'delta_chunks_pending' in dev:
        out['device.delta_reassembly'] = (int(dev['delta_chunks_pending']),
                                          DeltaReassembler().max_pending)
    if 'spooled_bytes' in bridge:
        out['device_bridge.spool_bytes'] = (int(bridge['spooled_bytes']),
                                            defaults('cloud_bridge_node')['spool_max_bytes'])
    return out


def run(ctx: BenchContext) -> BenchResult:
    from rclpy.duration import Duration
    from std_msgs.msg import Header

    from cdcca_ros.bench.graph import Client, Graph
    from cdcca_ros.msg import Question
    from cdcca_ros.nodes.common import RELIABLE_QOS

    args = ctx.args
    minutes = 2.0 if args.quick else args.minutes
    drop_s = min(args.link_drop_s, 10.0) if args.quick else args.link_drop_s
    warmup_s = 30.0 if args.quick else args.warmup_s
    uplink_every = 4 if args.quick else args.uplink_every
    overrides = {'camera.fps': '4', 'camera.synthetic.schedule':
                 'fog:40,night:40,clutter:40,novel:40',
                 'cloud.round.min_samples': str(8 if args.quick else args.round_samples),
                 'cloud.round.max_wait_s': '60.0'}
    if args.quick:  # rounds of seconds, so that a two-minute run sees some
        overrides.update({'cloud.akd.steps': '10', 'cloud.dwc.refit_steps': '0'})
    t_start = time.monotonic()
    result: dict[str, Any] = {}
    asks: list[tuple[float, float, bool, str]] = []  # start, end (wall), ok, question id
    topic_ids: dict[str, float] = {}
    rss: list[tuple[float, dict[str, int]]] = []
    queue_samples: list[dict[str, tuple[int, int]]] = []
    reconnect_s = None
    with Graph(ctx.workdir / 'graph', overrides) as graph:
        graph.start()
        client = Client('soak_client')
        try:
            if not client.spin_until(lambda: client.ask_client.service_is_ready(), 180.0):
                raise RuntimeError('the device never came up')
            deadline = time.monotonic() + 240.0
            while time.monotonic() < deadline:  # the model loaded and a frame arrived
                r = client.call(client.ask_client, client.Ask.Request(
                    question=QUESTIONS[0], no_uplink=True), 30.0)
                if r is not None and r.success:
                    break
                client.spin_for(0.5)
            result['startup_s'] = round(time.monotonic() - t_start, 1)
            client.spin_until(lambda: 'answers' in client.diag('device_node'), 10.0)
            answers0 = int(client.diag('device_node').get('answers', 0))  # the start-up asks
            topic_pub = client.publisher(Question, 'question', RELIABLE_QOS)
            t0 = time.monotonic()
            end = t0 + minutes * 60.0
            drop_at = t0 + (minutes * 60.0 - drop_s) / 2.0
            dropped = restored = False
            next_sample = next_topic = t0
            next_flood = t0 + args.flood_every_s / 2
            i = 0
            while time.monotonic() < end:
                now = time.monotonic()
                if not dropped and now >= drop_at:
                    graph.kill_router()
                    dropped, drop_started = True, now
                if dropped and not restored and now >= drop_started + drop_s:
                    graph.start_router()
                    restored, back = True, time.monotonic()
                if restored and reconnect_s is None:
                    up = [client.diag(k).get('_message') == 'link up'
                          for k in ('device_bridge', 'cloud_bridge')]
                    if all(up):
                        reconnect_s = round(time.monotonic() - back, 2)
                if now >= next_topic:
                    qid = f'topic-{uuid.uuid4().hex[:8]}'
                    topic_pub.publish(Question(header=Header(), question_id=qid,
                                               question=QUESTIONS[i % len(QUESTIONS)]))
                    topic_ids[qid] = time.time()
                    next_topic = now + 1.0 / args.topic_rate
                if now >= next_flood:  # a burst: the question queue fills to its bound
                    for k in range(args.flood_size):
                        qid = f'flood-{uuid.uuid4().hex[:8]}'
                        topic_pub.publish(Question(header=Header(), question_id=qid,
                                                   question=QUESTIONS[k % len(QUESTIONS)]))
                        topic_ids[qid] = time.time()
                        if k % 40 == 39:
                            # Within the writer's history (50): what the device cannot take
                            # is its queue's to drop and count, not DDS's to lose unseen.
                            topic_pub.wait_for_all_acked(Duration(seconds=2))
                    next_flood = now + args.flood_every_s
                if now >= next_sample:
                    rss.append((now - t0, graph.rss_kb()))
                    queue_samples.append(_queues(client))
                    next_sample = now + args.sample_s
                qid = f'ask-{i}'
                t_ask = time.time()
                r = client.call(client.ask_client, client.Ask.Request(
                    question_id=qid, question=QUESTIONS[i % len(QUESTIONS)],
                    no_uplink=i % uplink_every != 0), 30.0)
                asks.append((t_ask, time.time(), r is not None and r.success, qid))
                i += 1
            client.spin_for(5.0)  # the last answers and statuses
            result['alive'] = graph.alive()
            result['run_s'] = round(time.monotonic() - t0, 1)
            diags = {k: dict(client.diag(k)) for k in ('device_node', 'uts_node',
                                                        'device_bridge', 'cloud_node',
                                                        'cloud_bridge', 'camera_node')}
            answered = {a.question_id for a in client.answers}
            applies = [(s.header.stamp.sec + s.header.stamp.nanosec * 1e-9, s.apply_ms)
                       for s in client.device_status if s.state == 'applied']
        finally:
            client.close()
    # --- figures --------------------------------------------------------------------------
    # Growth: the median of the last fifth of the samples against the first after warm-up.
    after = [r for t, r in rss if t >= warmup_s] or [r for _, r in rss]
    tail = after[-max(1, len(after) // 5):]
    growth: dict[str, float] = {}
    for key in after[0] if after else []:
        base = after[0].get(key, 0)
        if base:
            growth[key] = round(statistics.median(r.get(key, 0) for r in tail) / base - 1.0, 4)
    over = sum(1 for sample in queue_samples for length, bound in sample.values()
               if length > bound)
    queue_max: dict[str, list[int]] = {}
    for sample in queue_samples:
        for name, (length, bound) in sample.items():
            queue_max[name] = [max(queue_max.get(name, [0, bound])[0], length), bound]
    ok_ids = {qid for _, _, ok, qid in asks if ok}
    no_response = sum(1 for _, _, ok, _ in asks if not ok)
    not_published = len(ok_ids - answered)
    dropped_topic = int(diags['device_node'].get('questions_dropped', 0))
    topic_missing = len(set(topic_ids) - answered)
    answers_lost = not_published + max(0, topic_missing - dropped_topic)
    # Where: questions the device never saw (lost in DDS before its queue: not counted by
    # the node) against answers it gave that did not arrive.
    device_answers = int(diags['device_node'].get('answers', 0)) - answers0
    unseen = max(0, len(asks) - no_response + len(topic_ids) - dropped_topic - device_answers)
    during, outside = [], []
    for start, stop, ok, _ in asks:
        if not ok:
            continue
        lat = (stop - start) * 1e3
        near = any(start <= t_end + 0.5 and stop >= t_end - ms / 1e3 - 0.5
                   for t_end, ms in applies)
        (during if near else outside).append(lat)
    p99_out, p99_during = _pct(outside, 99), _pct(during, 99)
    # Everything the device's bridge put on the link: samples and the device's reports (the
    # link acknowledges both).
    up = (int(diags['device_bridge'].get('up', 0))
          + int(diags['device_bridge'].get('reports_up', 0)))
    acked = int(diags['device_bridge'].get('acked', 0))
    summary = {
        'rss_growth_max': max(growth.values()) if growth else None,
        'rss_growth': growth,
        'queue_over_bound': over,
        'queue_max': queue_max,
        'answers_lost': answers_lost,
        'questions_never_seen': unseen,
        'answers_not_delivered': max(0, answers_lost - unseen),
        'asks': len(asks), 'asks_failed': no_response,
        'asks_per_s': round(len(asks) / max(result.get('run_s', 1.0), 1e-9), 2),
        'topic_questions': len(topic_ids), 'topic_dropped_counted': dropped_topic,
        'p50_ms': _pct(outside, 50), 'p99_ms': p99_out,
        'p50_during_apply_ms': _pct(during, 50), 'p99_during_apply_ms': p99_during,
        'answers_during_apply': len(during),
        'p99_during_apply_over_p99': (round(p99_during / p99_out, 3)
                                      if p99_during and p99_out else None),
        'rounds': int(diags['cloud_node'].get('rounds', 0)),
        'deltas_applied': int(diags['device_node'].get('deltas_applied', 0)),
        'deltas_rejected': int(diags['device_node'].get('deltas_rejected', 0)),
        'reconnect_s': reconnect_s,
        'uplink_sent': up, 'uplink_acked': acked, 'uplink_lost': up - acked,
        'spool_dropped': int(diags['device_bridge'].get('dropped', 0)),
        'nodes_down': [k for k, v in result.get('alive', {}).items() if not v],
    }
    rows = [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))]
    notes = [f'{minutes} min after a {result.get("startup_s")} s start-up; router down for '
             f'{drop_s} s in the middle; asks back to back (one outstanding; one in '
             f'{uplink_every} offered for the uplink), '
             f'{args.topic_rate}/s question messages beside them and a burst of '
             f'{args.flood_size} every {args.flood_every_s} s; memory and queues sampled '
             f'every {args.sample_s} s; RSS growth from {warmup_s} s on (median of the last fifth '
             'against the first sample after the warm-up)']
    missing = {'asks': sorted(ok_ids - answered)[:20],
               'questions': sorted(set(topic_ids) - answered)[:40]}
    return BenchResult(summary=summary, headers=['figure', 'value'], rows=rows,
                       detail={'rss': rss, 'queues': queue_samples, 'applies': applies,
                               'missing_answers': missing,
                               'diagnostics': diags, **result}, notes=notes)
