"""The demo graph as real processes, for the fuzz and soak benches and the fault tests.

:class:`Graph` starts what ``make demo`` starts -- camera, device + UTS, device bridge, cloud
bridge and cloud node (one process each, from :func:`cdcca_ros.nodes.sets.node_launches`) and
a Zenoh router with mutual TLS and per-device access control (its own process too, so it can
be killed and restarted) -- and can kill, restart and measure any of them. :class:`Client` is
a separate rclpy participant in the calling process: it asks questions, publishes to any
input, and collects diagnostics, statuses and model versions.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from cdcca_ros.errors import CdccaError

DEVICE_NS = 'robot1'
CLOUD_NS = 'cloud'
KEYS = ('camera', 'device', 'device_bridge', 'cloud', 'cloud_bridge')


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident memory of a process in KiB (0 when it is gone)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _pump(prefix: str, stream: IO[bytes], out: IO[str], lines: queue.Queue[str] | None) -> None:
    for raw in iter(stream.readline, b''):
        text = raw.decode(errors='replace')
        if lines is not None:
            lines.put(text)
        out.write(f'[{prefix}] {text}')
        out.flush()


class Graph:
    """The demo node set and a router, as processes (see the module docstring).

    Args:
        workdir: Where certificates, keys, state, spools and ``nodes.log`` go.
        overrides: ``{'<key>.<param>': value}`` on top of the graph's own settings.
        env: Extra environment of every process.
    """

    def __init__(self, workdir: Path, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f'tls/localhost:{self.port}'
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
        self.env.setdefault('HF_HUB_OFFLINE', '1')
        self.env.setdefault('TRANSFORMERS_OFFLINE', '1')
        self.env.setdefault('TOKENIZERS_PARALLELISM', 'false')
        self.log = open(self.workdir / 'nodes.log', 'a')
        self.procs: dict[str, subprocess.Popen] = {}
        self.router: subprocess.Popen | None = None
        self._lines: dict[str, queue.Queue[str]] = {}
        w = self.workdir
        self.overrides: dict[str, Any] = {
            'camera.fps': '2', 'camera.synthetic.schedule': 'source:100000',
            'device.state_dir': str(w / 'device'),
            'device.cloud_public_key': str(w / 'cloud_public.pem'),
            'cloud.state_dir': str(w / 'cloud'),
            'cloud.signing_key': str(w / 'cloud_signing_key.pem'),
            'device_bridge.connect': self.endpoint, 'device_bridge.certs_dir': str(w / 'certs'),
            'device_bridge.spool_dir': str(w / 'spool'),
            'cloud_bridge.connect': self.endpoint, 'cloud_bridge.certs_dir': str(w / 'certs'),
            'cloud_bridge.devices': DEVICE_NS, 'cloud_bridge.store_dir': str(w / 'store'),
        }
        self.overrides.update(overrides or {})
        from cdcca_ros.nodes.sets import SETS, node_launches

        launches = node_launches('demo', self.overrides, device_ns=DEVICE_NS, cloud_ns=CLOUD_NS)
        self.launches = {spec.key: launch for spec, launch in zip(SETS['demo'], launches,
                                                                 strict=True)}

    # ---------------------------------------------------------------- lifecycle
    def start(self, keys: tuple[str, ...] = KEYS) -> Graph:
        """Certificates and keys (first time), the router, then the nodes ``keys``."""
        self.prepare()
        self.start_router()
        for key in keys:
            self.start_node(key)
        return self

    def prepare(self) -> None:
        """Certificates and the cloud's key pair (once)."""
        from cdcca_ros.core import wire
        from cdcca_ros.transport.certs import create_certificates

        w = self.workdir
        if not (w / 'certs').is_dir():
            create_certificates(w / 'certs', devices=[DEVICE_NS], cloud=CLOUD_NS,
                                router_hosts=['localhost', '127.0.0.1'])
        if not (w / 'cloud_signing_key.pem').is_file():
            private, public = wire.generate_keypair()
            wire.save_private_key(private, w / 'cloud_signing_key.pem')
            wire.save_public_key(public, w / 'cloud_public.pem')

    def start_router(self, timeout_s: float = 30.0) -> None:
        """Start the router process and wait for its READY line."""
        cmd = [sys.executable, '-m', 'cdcca_ros.transport.router', '--certs',
               str(self.workdir / 'certs'), '--listen', f'tls/127.0.0.1:{self.port}',
               '--devices', DEVICE_NS]
        self.router = self._spawn('router', cmd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self._lines['router'].get(timeout=0.2).startswith('READY'):
                    return
            except queue.Empty:
                if self.router.poll() is not None:
                    break
        raise CdccaError(f'the router did not start; see {self.workdir / "nodes.log"}')

    def kill_router(self, sig: int = signal.SIGKILL) -> None:
        """Kill the router (the link goes down for every bridge)."""
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(sig)
            self.router.wait(10)

    def start_node(self, key: str,
                   preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
        """Start (or restart) the node ``key``; ``preexec_fn`` runs in the child before it
        executes (e.g. to set a resource limit)."""
        from cdcca_ros.runner import command

        proc = self._spawn(key, command(self.launches[key]), preexec_fn)
        self.procs[key] = proc
        return proc

    def kill_node(self, key: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to node ``key`` and wait for it to exit."""
        proc = self.procs[key]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def alive(self) -> dict[str, bool]:
        """Which nodes run."""
        return {key: proc.poll() is None for key, proc in self.procs.items()}

    def rss_kb(self) -> dict[str, int]:
        """Resident memory of every node process (and the router) in KiB."""
        out = {key: rss_kb(proc.pid) for key, proc in self.procs.items()}
        if self.router is not None:
            out['router'] = rss_kb(self.router.pid)
        return out

    def lines(self, key: str) -> list[str]:
        """Log lines of ``key`` received so far (drained)."""
        q, out = self._lines.get(key), []
        while q is not None:
            try:
                out.append(q.get_nowait())
            except queue.Empty:
                break
        return out

    def _spawn(self, key: str, cmd: list[str],
               preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)  # noqa: PLW1509 - limits only
        self._lines[key] = queue.Queue()
        threading.Thread(target=_pump, args=(key, proc.stdout, self.log, self._lines[key]),
                         daemon=True).start()
        return proc

    def close(self) -> None:
        """Stop every node (SIGINT, then SIGKILL) and the router."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10.0
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.kill_router(signal.SIGTERM)
        self.log.close()

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A separate rclpy participant talking to the graph (see the module docstring)."""

    def __init__(self, name: str = 'graph_client') -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile
        from std_msgs.msg import String

        from cdcca_ros.msg import AdaptationStatus, Answer
        from cdcca_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, use_dds_profile
        from cdcca_ros.srv import Ask, Rollback

        use_dds_profile()
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node(name, namespace=DEVICE_NS, context=self.context)
        # Spun in its own threads: answers and statuses are taken as they come, also while
        # the caller waits (a client spinning only inside its calls loses messages to its
        # bounded reader history under a burst).
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self.diagnostics: dict[str, dict[str, str]] = {}
        self.device_status: list[Any] = []
        self.cloud_status: list[Any] = []
        self.answers: list[Any] = []
        self.versions: list[str] = []
        n = self.node
        n.create_subscription(DiagnosticArray, '/diagnostics', self._on_diag, 50)
        n.create_subscription(AdaptationStatus, 'adaptation_status', self.device_status.append,
                              RELIABLE_QOS)
        n.create_subscription(AdaptationStatus, f'/{CLOUD_NS}/adaptation_status',
                              self.cloud_status.append, RELIABLE_QOS)
        # A deep reader history: a burst of answers waits here until the executor takes it.
        n.create_subscription(Answer, 'answer', self.answers.append,
                              QoSProfile(depth=5000, reliability=RELIABLE_QOS.reliability,
                                         history=RELIABLE_QOS.history))
        n.create_subscription(String, 'model_version', lambda m: self.versions.append(m.data),
                              LATCHED_QOS)
        self.ask_client = n.create_client(Ask, 'ask')
        self.rollback_client = n.create_client(Rollback, 'rollback')
        self.Ask, self.Rollback = Ask, Rollback
        self._pubs: dict[tuple[str, Any], Any] = {}
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def _on_diag(self, array: Any) -> None:
        for status in array.status:
            values = {kv.key: kv.value for kv in status.values}
            values['_level'] = str(int.from_bytes(status.level, 'little')
                                   if isinstance(status.level, bytes) else status.level)
            values['_message'] = status.message
            self.diagnostics[status.name] = values

    def diag(self, contains: str) -> dict[str, str]:
        """The latest diagnostics of the first status whose name contains ``contains``."""
        for name, values in self.diagnostics.items():
            if contains in name:
                return values
        return {}

    def spin_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``condition()`` or the timeout (the executor spins in its threads);
        whether it held."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.01)
        return condition()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def call(self, client: Any, request: Any, timeout_s: float = 60.0) -> Any:
        """Call a service; None on timeout."""
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            client.remove_pending_request(future)
            return None
        return future.result()

    def publisher(self, msg_type: Any, topic: str, qos: Any) -> Any:
        """A publisher (one per topic and type)."""
        key = (topic, msg_type)
        if key not in self._pubs:
            self._pubs[key] = self.node.create_publisher(msg_type, topic, qos)
        return self._pubs[key]

    def ask(self, question: str, image: Any, *, uplink: bool = False,
            timeout_s: float = 60.0) -> Any:
        """``ask`` about ``image`` (a sensor_msgs/Image); the response or None."""
        return self.call(self.ask_client, self.Ask.Request(
            question=question, use_image=True, image=image, no_uplink=not uplink), timeout_s)

    def wait_ready(self, probe: Any, timeout_s: float = 180.0) -> bool:
        """Wait until the device answers (model loaded)."""
        if not self.spin_until(self.ask_client.service_is_ready, timeout_s):
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.ask('what color is the object?', probe, timeout_s=30.0)
            if r is not None and r.success:
                return True
            self.spin_for(0.5)
        return False

    def close(self) -> None:
        self.executor.shutdown()
        self._spin.join(timeout=5.0)
        self.node.destroy_node()
        if self.context.ok():
            import rclpy

            rclpy.shutdown(context=self.context)
