"""Start a node set without ROS 2 launch: ``python -m cdcca_ros.runner device|cloud|demo``.

Starts the same nodes with the same parameters as ``launch/<set>.launch.py`` (both come from
:func:`cdcca_ros.nodes.sets.node_launches`), one process per node. Ctrl-C, SIGTERM (systemd,
``docker stop``) or SIGHUP stop every node, as ``ros2 launch`` does: SIGTERM to each (a node
shuts down cleanly on it, and one still importing its libraries just ends), SIGKILL to those
still running after a grace period; the runner returns only when all are gone. When
one node exits on its own (a model that cannot load, a bad parameter), the runner stops the
others and exits with that node's code. Used by ``make demo`` and by the tests, and useful
wherever ``ros2 launch`` is not installed (the ROS 2 wheels from PyPI have no launch).

Arguments as ``ros2 launch`` takes them (``NAME:=VALUE``) or as options; both forms mean the
same:

    python -m cdcca_ros.runner device camera.fps:=5 device.model:=/models/student
    python -m cdcca_ros.runner device -p camera.fps=5 -p device.model=/models/student
    python -m cdcca_ros.runner device use_camera:=false image_topic:=/camera/color/image_raw
    python -m cdcca_ros.runner device use_bridge:=false      # no cloud yet
    python -m cdcca_ros.runner device autostart:=false       # a lifecycle manager drives them
    python -m cdcca_ros.runner cloud --params-file cloud=/etc/cdcca/cloud.yaml
    python -m cdcca_ros.runner demo --dry-run                # print the commands
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.sets import DEFAULT_IMAGE_TOPIC, SETS, NodeLaunch, node_launches

STOP_GRACE_S = 10.0
"""How long the nodes get to stop after SIGTERM before SIGKILL."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that make the runner stop the set."""


@contextlib.contextmanager
def exit_on_stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main
    thread, as Ctrl-C raises ``KeyboardInterrupt``: a program that runs a :class:`Runner` as
    a library (the demo) then reaches the ``finally`` that stops its nodes, which run in their
    own sessions and would outlive it. The previous handlers come back on exit."""
    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    stops = [sig for sig in STOP_SIGNALS if sig != signal.SIGINT]
    previous = {sig: signal.signal(sig, on_signal) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def command(launch: NodeLaunch) -> list[str]:
    """The command line that starts one node."""
    return [sys.executable, '-m', launch.module, *launch.ros_args()]


def _label(launch: NodeLaunch) -> str:
    return f'{launch.namespace}/{launch.name}'.lstrip('/')


def _pump(prefix: str, stream: IO[bytes], out: IO[str]) -> None:
    for raw in iter(stream.readline, b''):
        out.write(f'[{prefix}] {raw.decode(errors="replace")}')
        out.flush()


class Runner:
    """A set of node processes, started and stopped together.

    Each node runs in its own session, so a Ctrl-C in the terminal reaches the runner only and
    the runner stops the nodes in order; :meth:`stop` signals each node's process group.
    """

    def __init__(self, launches: Sequence[NodeLaunch], env: Mapping[str, str] | None = None,
                 out: IO[str] | None = None) -> None:
        self.launches = list(launches)
        self.env = dict(os.environ if env is None else env)
        self.out = out or sys.stdout
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for launch in self.launches:
            proc = subprocess.Popen(command(launch), env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            threading.Thread(target=_pump, args=(_label(launch), proc.stdout, self.out),
                             daemon=True).start()

    def exited(self) -> tuple[str, int] | None:
        """(label, exit code) of the first node that exited, or None while all run."""
        for launch, proc in zip(self.launches, self.procs):
            code = proc.poll()
            if code is not None:
                return _label(launch), code
        return None

    def poll(self) -> int | None:
        """The exit code of the first node that exited, or None while all run."""
        done = self.exited()
        return None if done is None else done[1]

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the node and anything it started
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every node: SIGTERM (rclpy shuts a node down cleanly on it, as on Ctrl-C; a
        SIGINT would print a traceback from a node still importing torch), then SIGKILL to
        those still running after ``grace_s``. Returns when all have exited."""
        for proc in self.procs:
            self._signal(proc, signal.SIGTERM)
        if self._wait_all(grace_s):
            return
        for proc in self.procs:
            self._signal(proc, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def __enter__(self) -> Runner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition('=')
        if not sep:
            raise ConfigError(f'-p {item!r}: expected <node>.<param>=<value>')
        out[name.strip()] = value
    return out


SWITCHES = ('use_camera', 'use_bridge', 'image_topic', 'device_ns', 'cloud_ns', 'autostart')
"""Set-level arguments (the launch files' arguments of the same names)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.runner', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('set', choices=sorted(SETS))
    parser.add_argument('arguments', nargs='*', metavar='NAME:=VALUE',
                        help='as for ros2 launch: <node>.<param>:=V, use_camera:=false, '
                             'use_bridge:=false, image_topic:=TOPIC, device_ns:=NS, '
                             'cloud_ns:=NS, autostart:=false, <node>.params_file:=FILE')
    parser.add_argument('-p', '--param', action='append', default=[], metavar='NODE.PARAM=V',
                        help='parameter override, e.g. camera.fps=5 (repeatable)')
    parser.add_argument('--params-file', action='append', default=[], metavar='NODE=FILE',
                        help='YAML file replacing config/<node>.yaml for one node')
    parser.add_argument('--device-ns', default='robot1',
                        help='namespace of the device side (default: %(default)s)')
    parser.add_argument('--cloud-ns', default='cloud',
                        help='namespace of the cloud side (default: %(default)s)')
    parser.add_argument('--no-camera', action='store_true',
                        help='do not start camera_node (your own driver publishes the frames; '
                             'same as use_camera:=false)')
    parser.add_argument('--no-bridge', action='store_true',
                        help='do not start the cloud bridge(s) (same as use_bridge:=false)')
    parser.add_argument('--no-autostart', action='store_true',
                        help='start device_node / cloud_node unconfigured: they wait for '
                             'lifecycle transitions (same as autostart:=false)')
    parser.add_argument('--image-topic', default=DEFAULT_IMAGE_TOPIC,
                        help='the device node\'s image input (default: %(default)s, in the '
                             'device namespace)')
    parser.add_argument('--dry-run', action='store_true', help='print the commands and exit')
    return parser


def launches_from_args(args: argparse.Namespace) -> list[NodeLaunch]:
    """The node launches a parsed command line asks for.

    Raises:
        ConfigError: a malformed argument, an unknown name or a bad value.
    """
    settings: dict[str, object] = {
        'use_camera': not args.no_camera, 'use_bridge': not args.no_bridge,
        'image_topic': args.image_topic, 'device_ns': args.device_ns,
        'cloud_ns': args.cloud_ns, 'autostart': not args.no_autostart}
    overrides = parse_overrides(args.param)
    files = parse_overrides(args.params_file)
    for item in args.arguments:
        name, sep, value = item.partition(':=')
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f'argument {item!r}: expected NAME:=VALUE')
        if name in SWITCHES:
            settings[name] = value
        elif name.endswith('.params_file'):
            files[name.removesuffix('.params_file')] = value
        else:
            overrides[name] = value
    return node_launches(args.set, overrides, params_files=files, **settings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # NAME:=VALUE before or after the options
    try:
        launches = launches_from_args(args)
    except ConfigError as err:
        print(f'{parser.prog}: error: {err}', file=sys.stderr)
        return 2
    if args.dry_run:
        for launch in launches:
            print(shlex.join(command(launch)))
        return 0
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    runner = Runner(launches)
    try:
        runner.start()
        while not stop.wait(0.2):
            done = runner.exited()
            if done is not None:
                label, code = done
                print(f'{label} exited with code {code}; stopping the others', file=sys.stderr)
                return code or 1
        return 0
    finally:
        runner.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == '__main__':
    sys.exit(main())
