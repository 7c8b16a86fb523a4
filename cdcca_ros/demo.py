"""The whole device-cloud loop on one machine, on the embedded default (``make demo``).

Starts the ``demo`` node set with the project's runner (the same nodes and parameters as
``launch/demo.launch.py``): the synthetic camera, the device node with UTS, the device's cloud
bridge, a Zenoh router with mutual TLS, the cloud bridge and the cloud node (bundled teacher and
student). A driver then plays the robot's user: round after round it drifts the camera to the
next domain, measures the device's accuracy on held-out samples of that domain, asks questions
about the live camera frames (their uncertain samples go up the link, the cloud distils and sends
a signed, compressed delta, the device hot-applies it) and measures again once the new adapter is
in use.

Writes ``OUT/demo.json`` (a list ``rounds``), ``OUT/demo.png`` and ``OUT/nodes.log``.

    python -m cdcca_ros.demo [--rounds 3] [--seed 0] [--out demo_out] [--quick]
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

DEFAULT_PLAN = ('fog', 'night', 'clutter', 'novel')


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

    def call(self, client, request, timeout_s: float = 120.0):
        future = client.call_async(request)
        if not self.spin_until(future.done, timeout_s):
            raise TimeoutError(f'{client.srv_name} did not answer in {timeout_s} s')
        return future.result()

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


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy over time with the update moments, and bytes per round."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rounds = result['rounds']
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), gridspec_kw={'height_ratios': [3, 2]})
    stream = result['stream']
    if stream:
        t = [s['t'] for s in stream]
        window = 10
        acc = [sum(s['score'] for s in stream[max(0, i - window + 1):i + 1]) /
               len(stream[max(0, i - window + 1):i + 1]) for i in range(len(stream))]
        ax1.plot(t, acc, color='0.6', lw=1, label=f'live questions (rolling {window})')
    for r in rounds:
        ax1.plot([r['t_before']], [r['acc_before']], 'o', color='tab:red')
        ax1.plot([r['t_after']], [r['acc_after']], 'o', color='tab:green')
        if r.get('t_apply') is not None:
            ax1.axvline(r['t_apply'], color='tab:blue', ls='--', lw=1)
            ax1.text(r['t_apply'], 1.02, f"r{r['round']} {r['domain']}", fontsize=8,
                     ha='center')
    ax1.plot([], [], 'o', color='tab:red', label='held-out, before the round')
    ax1.plot([], [], 'o', color='tab:green', label='held-out, after the update')
    ax1.plot([], [], '--', color='tab:blue', label='update applied on the device')
    ax1.set_ylim(0, 1.08)
    ax1.set_xlabel('time (s)')
    ax1.set_ylabel('device accuracy')
    ax1.legend(loc='lower right', fontsize=8)
    idx = range(len(rounds))
    ax2.bar([i - 0.2 for i in idx], [r['uplink_bytes'] for r in rounds], 0.4, label='uplink')
    ax2.bar([i + 0.2 for i in idx], [r['downlink_bytes'] for r in rounds], 0.4, label='downlink')
    ax2.set_xticks(list(idx), [f"r{r['round']} {r['domain']}" for r in rounds])
    ax2.set_yscale('log')
    ax2.set_ylabel('bytes per round')
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rounds: list[dict[str, Any]]) -> None:
    head = ('round', 'domain', 'acc before', 'acc after', 'samples up', 'bytes up',
            'delta bytes', 'bit/param', 'apply ms')
    rows = [(str(r['round']), r['domain'], f"{r['acc_before']:.3f}", f"{r['acc_after']:.3f}",
             str(r['uplink_samples']), str(r['uplink_bytes']), str(r['downlink_bytes']),
             f"{r['bits_per_param']:.2f}", f"{r['apply_ms']:.1f}") for r in rounds]
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
    eval_sets = {d: world.samples(d, args.eval_n, image_size=(640, 480)) for d in set(plan)}
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
        version = 0
        for i, domain in enumerate(plan, start=1):
            driver.set_schedule(f'{domain}:100000')
            driver.images.clear()
            if not driver.spin_until(lambda d=domain: driver.latest_frame(d) is not None, 60.0):
                raise RuntimeError(f'no {domain} frame from the camera')
            acc_before = evaluate(driver, eval_sets[domain], eval_msgs[domain])
            t_before = time.monotonic() - t0
            n_status = len(driver.device_status)
            asked = 0
            bar = tqdm(desc=f'round {i}/{len(plan)} {domain}: live questions', unit='q',
                       leave=False)
            deadline = time.monotonic() + args.round_timeout

            def applied(n=n_status):
                return any(s.state == 'applied' for s in driver.device_status[n:])
            while not applied():
                if time.monotonic() > deadline:
                    raise RuntimeError(f'round {i}: no update within {args.round_timeout} s '
                                       f'after {asked} questions; see {out / "nodes.log"}')
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
            t_apply = time.monotonic() - t0
            status = next(s for s in driver.device_status[n_status:] if s.state == 'applied')
            driver.spin_until(
                lambda r=status.round: any(s.round == r for s in driver.cloud_status), 10.0)
            cloud = next((s for s in driver.cloud_status if s.round == status.round), None)
            version += 1
            acc_after = evaluate(driver, eval_sets[domain], eval_msgs[domain])
            row = {'round': i, 'domain': domain, 'acc_before': acc_before,
                   'acc_after': acc_after, 'questions_asked': asked,
                   'uplink_samples': int(cloud.uplink_samples) if cloud else 0,
                   'uplink_bytes': int(cloud.uplink_bytes) if cloud else 0,
                   'downlink_bytes': int(status.downlink_bytes),
                   'bits_per_param': float(status.bits_per_param),
                   'apply_ms': float(status.apply_ms), 'model_version': status.model_version,
                   'teacher_agreement_before': float(cloud.accuracy_before) if cloud else None,
                   'teacher_agreement_after': float(cloud.accuracy_after) if cloud else None,
                   't_before': t_before, 't_apply': t_apply,
                   't_after': time.monotonic() - t0}
            result['rounds'].append(row)
            print(f'round {i} ({domain}): accuracy {acc_before:.3f} -> {acc_after:.3f}, '
                  f'{row["uplink_samples"]} samples / {row["uplink_bytes"]} B up, '
                  f'{row["downlink_bytes"]} B down ({row["bits_per_param"]:.2f} bit/param), '
                  f'applied in {row["apply_ms"]:.0f} ms')
    finally:
        if driver is not None:
            driver.close()
        runner.stop()
        router.close()
        log.close()
    result['wall_s'] = time.monotonic() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='demo_out')
    parser.add_argument('--domains', default=','.join(DEFAULT_PLAN),
                        help='drifted domains the camera visits, one per round (cycled)')
    parser.add_argument('--teacher', default='bundled:teacher')
    parser.add_argument('--student', default='bundled:student')
    parser.add_argument('--eval-n', type=int, default=100, help='held-out samples per domain')
    parser.add_argument('--min-samples', type=int, default=32,
                        help='uplinked samples that start a cloud round (the cloud node default)')
    parser.add_argument('--akd-steps', type=int, default=40)
    parser.add_argument('--fps', type=float, default=4.0)
    parser.add_argument('--round-timeout', type=float, default=600.0)
    parser.add_argument('--quick', action='store_true',
                        help='one short round with few samples (tests)')
    args = parser.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(',') if d.strip()]
    if args.quick:
        args.rounds, args.eval_n, args.min_samples, args.akd_steps = 1, 12, 8, 10
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    from cdcca_ros.errors import CdccaError
    from cdcca_ros.models.bundled import resolve
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
        result = run(args)
    except (RuntimeError, TimeoutError, CdccaError) as err:
        print(f'demo failed: {err}', file=sys.stderr)
        return 1
    (out / 'demo.json').write_text(json.dumps(result, indent=2))
    plot(result, out / 'demo.png')
    print()
    print_table(result['rounds'])
    print(f'\n{out / "demo.json"}, {out / "demo.png"} ({result["wall_s"]:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
