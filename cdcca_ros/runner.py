"""Start a node set without ROS 2 launch: ``python -m cdcca_ros.runner device|cloud|demo``.

Starts the same nodes with the same parameters as ``launch/<set>.launch.py`` (both come from
:func:`cdcca_ros.nodes.sets.node_launches`), one process per node, and stops them all on
Ctrl-C or when one exits. Used by ``make demo`` and by the tests, and useful wherever
``ros2 launch`` is not installed (the ROS 2 wheels from PyPI have no launch).

Examples::

    python -m cdcca_ros.runner device -p camera.fps=5 -p device.model=/models/student
    python -m cdcca_ros.runner cloud --params-file cloud=/etc/cdcca/cloud.yaml
    python -m cdcca_ros.runner demo --dry-run       # print the commands
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from cdcca_ros.errors import ConfigError
from cdcca_ros.nodes.sets import SETS, NodeLaunch, node_launches


def command(launch: NodeLaunch) -> list[str]:
    """The command line that starts one node."""
    return [sys.executable, '-m', launch.module, *launch.ros_args()]


def _pump(prefix: str, stream: IO[bytes], out: IO[str]) -> None:
    for raw in iter(stream.readline, b''):
        out.write(f'[{prefix}] {raw.decode(errors="replace")}')
        out.flush()


class Runner:
    """A set of node processes, started and stopped together."""

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
            label = f'{launch.namespace}/{launch.name}'.lstrip('/')
            threading.Thread(target=_pump, args=(label, proc.stdout, self.out),
                             daemon=True).start()

    def poll(self) -> int | None:
        """The exit code of the first node that exited, or None while all run."""
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                return code
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cdcca_ros.runner', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('set', choices=sorted(SETS))
    parser.add_argument('-p', '--param', action='append', default=[], metavar='NODE.PARAM=V',
                        help='parameter override, e.g. camera.fps=5 (repeatable)')
    parser.add_argument('--params-file', action='append', default=[], metavar='NODE=FILE',
                        help='YAML file replacing config/<node>.yaml for one node')
    parser.add_argument('--device-ns', default='robot1', help='namespace of the device side')
    parser.add_argument('--cloud-ns', default='cloud', help='namespace of the cloud side')
    parser.add_argument('--dry-run', action='store_true', help='print the commands and exit')
    args = parser.parse_args(argv)
    try:
        files = parse_overrides(args.params_file)
        launches = node_launches(args.set, parse_overrides(args.param),
                                 device_ns=args.device_ns, cloud_ns=args.cloud_ns,
                                 params_files=files)
    except ConfigError as err:
        parser.error(str(err))
    if args.dry_run:
        for launch in launches:
            print(shlex.join(command(launch)))
        return 0
    runner = Runner(launches)
    runner.start()
    try:
        while (code := runner.poll()) is None:
            time.sleep(0.2)
        print(f'a node exited with code {code}; stopping the others', file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        runner.stop()


if __name__ == '__main__':
    sys.exit(main())
