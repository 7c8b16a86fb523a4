"""The whole device-cloud loop on one machine, on the embedded default (``make demo``).

Starts the ``demo`` node set with the project's runner (the same nodes and parameters as
``launch/demo.launch.py``): the synthetic camera, the device node with UTS, the device's cloud
bridge, a Zenoh router with mutual TLS, the cloud bridge and the cloud node (bundled teacher and
student, guarded rounds). A driver then plays the robot's user: round after round it points the
camera at the next domain of the plan (domains come back: revisits), asks questions about the
live frames (their uncertain samples, the audit stream and token pulls go up the link) until the
cloud finishes a round -- shipped (the device verifies and hot-applies the signed, compressed
delta) or refused by the update gate (nothing changes) -- and then measures the device's
accuracy on held-out samples of *every* domain of the plan and of the source, so forgetting
shows as well as gains. Before the first round the same held-out samples give the source-only
reference; the teacher's accuracy on them is the other reference.

Then captions (the paper's second task, in-process once the nodes have stopped): one guarded
CD-CCA captioning round on frames of the plan's domains (the table2 bench's method at a demo
size, :func:`~cdcca_ros.bench.captioning.demo_captions`), and a few held-out frames per domain
captioned before (the shipped student) and after (the adapted device, which answers
source-like frames with the shipped captioner); ``--caption-frames 0`` skips it.

Writes ``OUT/demo.json`` (``rounds``, ``before``, ``teacher``, ``captions``), ``OUT/demo.png``
and ``OUT/nodes.log``.

    python -m cdcca_ros.demo [--rounds 6] [--seed 0] [--out demo_out] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

DEFAULT_PLAN = ('fog', 'night', 'fog', 'clutter', 'night', 'clutter')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Driver:
    """The demo's ROS side: asks questions, drifts the camera, records what happens."""

    def __init__(self, device_ns: str, cloud_ns: str) -> None:
        import rclpy
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from cdcca_ros.msg import AdaptationStatus
        from cdcca_ros.nodes.common import RELIABLE_QOS, SENSOR_QOS, use_dds_profile
        from cdcca_ros.srv import Ask

        use_dds_profile()  # the driver publishes frames too
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node('demo_driver', namespace=device_ns, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.images: deque = deque(maxlen=20)
        self.used: set[int] = set()
        self.scenes: dict[int, dict] = {}
        self.bad_scenes = 0
        self.device_status: list[Any] = []
        self.cloud_status: list[Any] = []
        self.node.create_subscription(Image, 'image', lambda m: self.images.append(m),
                                      SENSOR_QOS)
        self.node.create_subscription(String, 'scene', self._on_scene, 50)
        self.node.create_subscription(AdaptationStatus, 'adaptation_status',
                                      self.device_status.append, RELIABLE_QOS)
        self.node.create_subscription(AdaptationStatus, f'/{cloud_ns}/adaptation_status',
                                      self.cloud_status.append, RELIABLE_QOS)
        self.ask_client = self.node.create_client(Ask, 'ask')
        self.param_client = self.node.create_client(
            SetParameters, f'/{device_ns}/camera_node/set_parameters')
        self.Ask = Ask

    def _on_scene(self, msg) -> None:
        from cdcca_ros.camera.synthetic import scene_from_json
        from cdcca_ros.errors import WireError

        try:
            meta = scene_from_json(msg.data)
        except WireError as err:
            self.bad_scenes += 1
            print(f'ignored a bad scene message: {err}', file=sys.stderr)
            return
        self.scenes[meta['stamp_ns']] = meta
        if len(self.scenes) > 200:
            for key in sorted(self.scenes)[:100]:
                del self.scenes[key]

    def spin_until(self, condition, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.05)
            if condition():
                return True
        return False

    def call(self, client, request, timeout_s: float = 120.0, attempt_s: float = 30.0):
        """``request`` on ``client``, sent again every ``attempt_s`` without a reply.

        Fast DDS can drop a reply when it is sent before the server's reply writer has
        matched this client's reader ("failed to send response (timeout)" in the node's log:
        seen on the first ``ask`` of a loaded machine); the demo's requests are answers and
        parameter sets, which may be asked twice.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            future = client.call_async(request)
            left = deadline - time.monotonic()
            if self.spin_until(future.done, min(attempt_s, max(left, 0.0))):
                return future.result()
            client.remove_pending_request(future)
            if time.monotonic() >= deadline:
                raise TimeoutError(f'{client.srv_name} did not answer in {timeout_s} s')

    def set_schedule(self, schedule: str) -> None:
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=schedule)
        result = self.call(self.param_client, SetParameters.Request(
            parameters=[Parameter(name='synthetic.schedule', value=value)]))
        if not result.results[0].successful:
            raise RuntimeError(f'camera refused schedule {schedule!r}: '
                               f'{result.results[0].reason}')

    def latest_frame(self, domain: str):
        """The newest camera frame of ``domain`` with its ground truth, or None."""
        for image in reversed(self.images):
            stamp = image.header.stamp.sec * 10**9 + image.header.stamp.nanosec
            if stamp in self.used:
                continue
            meta = self.scenes.get(stamp)
            if meta is not None and meta['domain'] == domain:
                return image, meta
        return None

    def ask(self, question: str, image, uplink: bool) -> Any:
        response = self.call(self.ask_client, self.Ask.Request(
            question=question, use_image=True, image=image, no_uplink=not uplink))
        if not response.success:
            raise RuntimeError(f'device did not answer: {response.message}')
        return response.answer

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def evaluate(driver: Driver, samples, image_msgs) -> float:
    """Mean VQA accuracy of the device on held-out samples (no uplink)."""
    from cdcca_ros.sim.scoring import vqa_accuracy

    scores = [vqa_accuracy(driver.ask(s.question, msg, uplink=False).answer, s.answers)
              for s, msg in zip(samples, image_msgs)]
    return sum(scores) / max(len(scores), 1)


def evaluate_all(driver: Driver, eval_sets, eval_msgs) -> dict[str, float]:
    """The device's held-out accuracy on every domain."""
    return {d: evaluate(driver, eval_sets[d], eval_msgs[d]) for d in eval_sets}


def teacher_accuracy(spec: str, eval_sets) -> dict[str, float]:
    """The teacher's accuracy on the same held-out samples (a reference line)."""
    from cdcca_ros.models import bundled
    from cdcca_ros.sim.scoring import vqa_accuracy

    teacher = bundled.load(spec)
    out = {}
    for d, samples in eval_sets.items():
        answers = []
        for i in range(0, len(samples), 25):
            part = samples[i:i + 25]
            answers += teacher.answer([s.image for s in part], [s.question for s in part])
        out[d] = sum(vqa_accuracy(a.text, s.answers)
                     for a, s in zip(answers, samples)) / max(len(samples), 1)
    return out


EVENT_MARKERS = {'shipped': ('^', 'tab:green'), 'refused': ('x', 'tab:red'),
                 'rollback': ('v', 'tab:purple')}


def plot(result: dict[str, Any], path: Path) -> None:
    """Per domain: the device's held-out accuracy after every round (0: before any), the
    source-only and teacher references, each round's outcome; bytes per round below."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rounds = result['rounds']
    domains = list(result['before'])
    n = len(domains)
    fig = plt.figure(figsize=(2.6 * n, 6.2))
    grid = fig.add_gridspec(2, n, height_ratios=[3, 2])
    xs = list(range(len(rounds) + 1))
    for k, d in enumerate(domains):
        ax = fig.add_subplot(grid[0, k])
        ys = [result['before'][d]] + [r['accuracy'][d] for r in rounds]
        ax.plot(xs, ys, '-', color='tab:blue', lw=1.5, label='device')
        ax.axhline(result['before'][d], color='0.5', ls=':', lw=1, label='source-only')
        ax.axhline(result['teacher'][d], color='0.3', ls='--', lw=1, label='teacher')
        for x, r in zip(xs[1:], rounds):
            marker, color = EVENT_MARKERS.get(r['outcome'], ('o', 'k'))
            if r['domain'] == d:
                ax.axvspan(x - 0.5, x + 0.5, color='0.93', zorder=0)
            ax.plot([x], [r['accuracy'][d]], marker, color=color, ms=6)
        ax.set_title(d, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(xs)
        ax.set_xlabel('round', fontsize=8)
        if k == 0:
            ax.set_ylabel('held-out accuracy')
    handles = [plt.Line2D([], [], color='tab:blue', label='device'),
               plt.Line2D([], [], color='0.5', ls=':', label='source-only'),
               plt.Line2D([], [], color='0.3', ls='--', label='teacher')] + [
        plt.Line2D([], [], marker=m, color=c, ls='', label=name)
        for name, (m, c) in EVENT_MARKERS.items()]
    fig.legend(handles=handles, loc='upper center', ncol=6, fontsize=8, frameon=False)
    ax2 = fig.add_subplot(grid[1, :])
    idx = range(1, len(rounds) + 1)
    ax2.bar([i - 0.2 for i in idx], [r['uplink_bytes'] for r in rounds], 0.4, label='uplink')
    ax2.bar([i + 0.2 for i in idx], [r['downlink_bytes'] for r in rounds], 0.4,
            label='downlink (applied delta)')
    ax2.set_xticks(list(idx), [f"{i}: {r['domain']}\n{r['outcome']}"
                               for i, r in zip(idx, rounds)], fontsize=8)
    ax2.set_ylabel('bytes per round')
    ax2.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    domains = list(result['before'])
    head = ('round', 'camera', 'outcome', *domains, 'up B', 'down B', 'apply ms')
    rows = [('0', '-', 'source-only', *(f"{result['before'][d]:.2f}" for d in domains), '-',
             '-', '-')]
    rows += [(str(r['round']), r['domain'], r['outcome'],
              *(f"{r['accuracy'][d]:.2f}" for d in domains), str(r['uplink_bytes']),
              str(r['downlink_bytes']), f"{r['apply_ms']:.1f}" if r['apply_ms'] else '-')
             for r in result['rounds']]
    rows.append(('-', '-', 'teacher', *(f"{result['teacher'][d]:.2f}" for d in domains), '-',
                 '-', '-'))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print('  '.join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print('  '.join(c.rjust(w) for c, w in zip(row, widths)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sensor_msgs.msg import Image
    from tqdm import tqdm

    from cdcca_ros.camera.convert import image_to_msg
    from cdcca_ros.core import wire
    from cdcca_ros.nodes.sets import node_launches
    from cdcca_ros.runner import Runner
    from cdcca_ros.sim.scoring import vqa_accuracy
    from cdcca_ros.sim.world import World
    from cdcca_ros.transport.certs import create_certificates
    from cdcca_ros.transport.config import RouterConfig
    from cdcca_ros.transport.router import Router

    out = Path(args.out).absolute()
    work = out / 'work'
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    create_certificates(work / 'certs', devices=['robot1'], cloud='cloud',
                        router_hosts=['localhost', '127.0.0.1'])
    private, public = wire.generate_keypair()
    wire.save_private_key(private, work / 'cloud_signing_key.pem')
    wire.save_public_key(public, work / 'cloud_public.pem')
    port = _free_port()
    endpoint = f'tls/localhost:{port}'
    overrides = {
        'camera.fps': str(args.fps), 'camera.synthetic.seed': str(args.seed),
        'camera.synthetic.schedule': 'source:100000',
        'device.model': args.student, 'device.state_dir': str(work / 'device'),
        'device.cloud_public_key': str(work / 'cloud_public.pem'),
        'cloud.teacher': args.teacher, 'cloud.student': args.student,
        'cloud.state_dir': str(work / 'cloud'),
        'cloud.signing_key': str(work / 'cloud_signing_key.pem'),
        'cloud.round.min_samples': str(args.min_samples), 'cloud.round.max_wait_s': '600.0',
        'cloud.akd.steps': str(args.akd_steps),
        # --quick checks the plumbing in seconds: every round ships (no gate, a few steps).
        **({'cloud.guard.gate': 'false', 'cloud.guard.max_steps': '10',
            'cloud.guard.min_steps': '5', 'cloud.guard.anchor': 'none'} if args.quick else {}),
        'device_bridge.connect': endpoint, 'device_bridge.certs_dir': str(work / 'certs'),
        'device_bridge.spool_dir': str(work / 'spool'),
        'cloud_bridge.connect': endpoint, 'cloud_bridge.certs_dir': str(work / 'certs'),
        'cloud_bridge.devices': 'robot1', 'cloud_bridge.store_dir': str(work / 'store'),
        'cloud_bridge.record_mcap': str(out / 'uplink.mcap'),
    }
    (out / 'uplink.mcap').unlink(missing_ok=True)
    launches = node_launches('demo', overrides)
    env = dict(os.environ)
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    os.environ.update(env)
    plan = [args.domains[i % len(args.domains)] for i in range(args.rounds)]
    world = World(args.seed + 1000)
    shown = ['source'] + sorted(set(plan) - {'source'})
    eval_sets = {d: world.samples(d, args.eval_n, image_size=(640, 480)) for d in shown}
    eval_msgs = {d: [image_to_msg(s.image, 'rgb8', Image) for s in eval_sets[d]]
                 for d in eval_sets}
    log = open(out / 'nodes.log', 'w')
    router = Router(RouterConfig(certs_dir=work / 'certs', listen=[f'tls/127.0.0.1:{port}'],
                                 devices=['robot1']))
    runner = Runner(launches, env=env, out=log)
    driver = None
    t0 = time.monotonic()
    result: dict[str, Any] = {
        'seed': args.seed, 'plan': plan, 'teacher': args.teacher, 'student': args.student,
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(),
                    'python': sys.version.split()[0]},
        'rounds': [], 'stream': []}
    try:
        runner.start()
        driver = Driver('robot1', 'cloud')
        print(f'starting {len(launches)} nodes and the Zenoh router (logs: {out/"nodes.log"})')
        if not driver.spin_until(lambda: runner.poll() is not None or (
                driver.ask_client.service_is_ready()
                and driver.param_client.service_is_ready()), 120.0) or runner.poll() is not None:
            raise RuntimeError(f'the nodes did not come up; see {out / "nodes.log"}')
        # The device answers once its model is loaded.
        probe = eval_msgs[plan[0]][0]
        deadline = time.monotonic() + 180.0
        while True:
            response = driver.call(driver.ask_client, driver.Ask.Request(
                question='what color is the object?', use_image=True, image=probe,
                no_uplink=True))
            if response.success:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f'device not ready: {response.message}')
            driver.spin_until(lambda: False, 1.0)
        result['before'] = evaluate_all(driver, eval_sets, eval_msgs)
        result['teacher'] = teacher_accuracy(args.teacher, eval_sets)
        print('held-out accuracy before any round: ' + ', '.join(
            f'{d} {a:.2f}' for d, a in result['before'].items()))
        for i, domain in enumerate(plan, start=1):
            driver.set_schedule(f'{domain}:100000')
            driver.images.clear()
            if not driver.spin_until(lambda d=domain: driver.latest_frame(d) is not None, 60.0):
                raise RuntimeError(f'no {domain} frame from the camera')
            n_status, n_cloud = len(driver.device_status), len(driver.cloud_status)
            asked = 0
            bar = tqdm(desc=f'round {i}/{len(plan)} {domain}: live questions', unit='q',
                       leave=False)
            deadline = time.monotonic() + args.round_timeout

            def outcome(n=n_status, c=n_cloud) -> str | None:
                """shipped (the device applied it), refused (the gate), rollback, or None."""
                if any(s.state == 'applied' for s in driver.device_status[n:]):
                    return 'shipped'
                if any(s.state == 'rolled_back' for s in driver.device_status[n:]):
                    return 'rollback'
                if any(s.state == 'refused' for s in driver.cloud_status[c:]):
                    return 'refused'
                return None
            while outcome() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f'round {i}: no round ended within {args.round_timeout} '
                                       f's after {asked} questions; see {out / "nodes.log"}')
                frame = driver.latest_frame(domain)
                if frame is None:
                    driver.spin_until(lambda: False, 0.1)
                    continue
                image, meta = frame
                driver.used.add(meta['stamp_ns'])  # each frame once
                answer = driver.ask(meta['question'], image, uplink=True)
                score = vqa_accuracy(answer.answer, meta['answers'])
                result['stream'].append({'t': time.monotonic() - t0, 'domain': domain,
                                         'score': score, 'version': answer.model_version})
                asked += 1
                bar.update(1)
                driver.executor.spin_once(timeout_sec=0.0)
            bar.close()
            kind = outcome()
            t_end = time.monotonic() - t0
            cloud = next((s for s in driver.cloud_status[n_cloud:]
                          if s.state in ('round_done', 'refused')), None)
            device = next((s for s in driver.device_status[n_status:]
                           if s.state in ('applied', 'rolled_back')), None)
            accuracy = evaluate_all(driver, eval_sets, eval_msgs)
            row = {'round': i, 'domain': domain, 'outcome': kind, 'accuracy': accuracy,
                   'questions_asked': asked,
                   'uplink_samples': int(cloud.uplink_samples) if cloud else 0,
                   'uplink_bytes': int(cloud.uplink_bytes) if cloud else 0,
                   'downlink_bytes': int(device.downlink_bytes) if kind == 'shipped' else 0,
                   'bits_per_param': float(device.bits_per_param) if kind == 'shipped' else 0.0,
                   'apply_ms': float(device.apply_ms) if kind == 'shipped' else 0.0,
                   'model_version': (device.model_version if device else
                                     (cloud.model_version if cloud else '')),
                   'gate': cloud.message if cloud else '', 't_end': t_end}
            result['rounds'].append(row)
            print(f'round {i} ({domain}): {kind} after {asked} questions, '
                  f'{row["uplink_samples"]} samples / {row["uplink_bytes"]} B up, '
                  f'{row["downlink_bytes"]} B down; held-out ' + ', '.join(
                      f'{d} {a:.2f}' for d, a in accuracy.items()))
    finally:
        if driver is not None:
            driver.close()
        runner.stop()
        router.close()
        log.close()
    result['wall_s'] = time.monotonic() - t0
    return result


def run_captions(args: argparse.Namespace, plan: list[str]) -> dict[str, Any]:
    """Captions before and after one guarded captioning round on the domains the camera
    visited (module docstring)."""
    from cdcca_ros.bench.captioning import demo_captions

    domains = [d for d in dict.fromkeys(plan) if d != 'source'] or ['fog']
    t0 = time.monotonic()
    print(f'\ncaptioning: one guarded CD-CCA round on {", ".join(domains)} frames ...')
    result = demo_captions(args.teacher, args.student, domains, seed=args.seed,
                           per_domain=args.caption_frames, quick=args.quick)
    result['wall_s'] = time.monotonic() - t0
    return result


def print_captions(captions: dict[str, Any]) -> None:
    """The caption part: gate verdict, CIDEr before / after, and each frame's captions."""
    for g in captions['gate']:
        print(f'caption round {g["round"]}: {"shipped" if g["ship"] else "refused"} '
              f'({g["reason"]})')
    print('held-out CIDEr before -> after: ' + ', '.join(
        f'{k} {captions["cider_before"][k]:.1f} -> {v:.1f}'
        for k, v in captions['cider_after'].items()))
    for f in captions['frames']:
        print(f'[{f["domain"]}, {f["split"]}] reference: {f["reference"]}')
        print(f'    before (shipped): {f["before"]}')
        print(f'    after ({f["answered_by"]}):  {f["after"]}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='demo_out')
    parser.add_argument('--domains', default=','.join(DEFAULT_PLAN),
                        help='domains the camera visits, one per round (cycled; revisits '
                             'show what the device kept)')
    parser.add_argument('--teacher', default='bundled:teacher')
    parser.add_argument('--student', default='bundled:student')
    parser.add_argument('--eval-n', type=int, default=60,
                        help='held-out samples per domain (every domain after every round)')
    parser.add_argument('--min-samples', type=int, default=64,
                        help='uplinked samples that start a cloud round')
    parser.add_argument('--akd-steps', type=int, default=40)
    parser.add_argument('--fps', type=float, default=4.0)
    parser.add_argument('--round-timeout', type=float, default=600.0)
    parser.add_argument('--caption-frames', type=int, default=2,
                        help='held-out frames per domain captioned before and after a '
                             'captioning round (0: no captioning part)')
    parser.add_argument('--quick', action='store_true',
                        help='one short round with few samples (tests)')
    args = parser.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(',') if d.strip()]
    if args.quick:
        args.rounds, args.eval_n, args.min_samples, args.akd_steps = 1, 12, 8, 10
    if args.rounds < 1 or args.caption_frames < 0:
        parser.error('--rounds must be >= 1 and --caption-frames >= 0')
    from cdcca_ros.errors import CdccaError
    from cdcca_ros.models.bundled import resolve
    from cdcca_ros.runner import exit_on_stop_signals
    from cdcca_ros.sim.domains import domain_names

    unknown = [d for d in args.domains if d not in domain_names()]
    if unknown:
        parser.error(f'unknown domains {unknown}; known: {domain_names()}')
    try:
        resolve(args.teacher)
        resolve(args.student)
    except CdccaError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exit_on_stop_signals():  # `kill` / systemd stop the nodes too, as Ctrl-C does
            result = run(args)
            if args.caption_frames:
                result['captions'] = run_captions(args, result['plan'])
    except (RuntimeError, TimeoutError, CdccaError) as err:
        print(f'demo failed: {err}', file=sys.stderr)
        return 1
    (out / 'demo.json').write_text(json.dumps(result, indent=2))
    plot(result, out / 'demo.png')
    print()
    print_table(result)
    if 'captions' in result:
        print()
        print_captions(result['captions'])
    print(f'\n{out / "demo.json"}, {out / "demo.png"} ({result["wall_s"]:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
