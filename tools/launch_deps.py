"""ROS 2 launch and the ``ros2`` CLI for the tests, from the vendored upstream sources.

The ROS 2 wheels on PyPI have no ``launch``, ``launch_ros``, ``ros2launch`` or ``ros2cli``; the
project's shared folder holds their sources (``../shared/vendor/ros2-launch``, with its own
``install.sh`` and README). The tests that run ``ros2 launch`` install them with this module,
once per checkout, into ``.colcon/launch_deps`` -- a prefix beside the package's build, never
into the virtual environment: a robot has launch from its ROS 2 distribution, so launch must
stay out of the package's requirements, and only the processes the tests give
:func:`launch_env` see it.

It does what the vendor's ``install.sh`` does (same packages, same pins, the same colcon build of
``composition_interfaces``), with ``pip install --prefix`` in place of installing into the
environment. A stamp holds a hash of the vendored sources' versions and of this file; a second
call with the same inputs returns at once. A lock file keeps two test runs of one checkout from
installing at the same time.

Usage (inside the environment, e.g. ``tools/run.sh 'python tools/launch_deps.py'``)::

    python tools/launch_deps.py [--prefix DIR] [--vendor DIR]   # install; prints what to source
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PREFIX = ROOT / '.colcon' / 'launch_deps'
# The vendor's install.sh installs these (same order, same pins).
PYPI = ('osrf-pycommon==2.0.2', 'argcomplete==3.7.2')
PACKAGES = ('launch', 'launch_xml', 'launch_yaml', 'launch_ros', 'ros2launch', 'ros2cli',
            'ros2pkg', 'ros2run', 'ros2node', 'ros2service', 'ros2topic', 'ros2param',
            'rosidl_runtime_py')
MESSAGE_PACKAGES = ('composition_interfaces',)
STAMP = '.cdcca-launch-deps'


class LaunchDepsError(RuntimeError):
    """The vendored sources are missing or their installation failed."""


def vendor_dir() -> Path | None:
    """The vendored sources: ``CDCCA_ROS2_LAUNCH_SRC``, else ``../shared/vendor/ros2-launch``
    beside this checkout or beside the main checkout of a git worktree; None when absent."""
    explicit = os.environ.get('CDCCA_ROS2_LAUNCH_SRC')
    candidates = [Path(explicit)] if explicit else []
    candidates.append(ROOT.parent / 'shared' / 'vendor' / 'ros2-launch')
    git_file = ROOT / '.git'
    if git_file.is_file():  # a worktree: ".git" names the main checkout's git directory
        text = git_file.read_text().strip()
        if text.startswith('gitdir:'):
            gitdir = Path(text.split(':', 1)[1].strip())
            main = gitdir.parents[2] if gitdir.parent.name == 'worktrees' else None
            if main is not None:
                candidates.append(main.parent / 'shared' / 'vendor' / 'ros2-launch')
    for path in candidates:
        if (path / 'src' / 'launch_ros').is_dir() and (path / 'SOURCES.txt').is_file():
            return path.resolve()
    return None


def _site_packages(prefix: Path) -> Path:
    rel = Path(sysconfig.get_path('purelib')).relative_to(sysconfig.get_path('data'))
    return prefix / rel


def _inputs_hash(vendor: Path) -> str:
    digest = hashlib.sha256()
    digest.update((vendor / 'SOURCES.txt').read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(sys.executable.encode())
    return digest.hexdigest()[:16]


def launch_env(prefix: Path = DEFAULT_PREFIX, base: dict[str, str] | None = None
               ) -> dict[str, str]:
    """``base`` (default: this process's environment) with the launch prefix in front: what a
    process needs to run ``ros2 launch`` (and ``import launch_ros``)."""
    env = dict(os.environ if base is None else base)

    def front(name: str, value: Path) -> None:
        env[name] = str(value) + (os.pathsep + env[name] if env.get(name) else '')

    front('PYTHONPATH', _site_packages(prefix))
    front('PATH', prefix / 'bin')
    front('AMENT_PREFIX_PATH', prefix)
    front('CMAKE_PREFIX_PATH', prefix)
    front('LD_LIBRARY_PATH', prefix / 'lib')
    return env


def installed(prefix: Path = DEFAULT_PREFIX, vendor: Path | None = None) -> bool:
    """Whether ``prefix`` holds an installation of the current vendored sources."""
    vendor = vendor or vendor_dir()
    stamp = prefix / STAMP
    return (vendor is not None and stamp.is_file()
            and stamp.read_text().strip() == _inputs_hash(vendor))


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, 'a') as out:
        out.write(f'$ {" ".join(cmd)}\n')
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = ''.join(log.read_text().splitlines(keepends=True)[-30:])
        raise LaunchDepsError(f'{cmd[0]} ... failed with code {code} (log {log}):\n{tail}')


def install(prefix: Path = DEFAULT_PREFIX, vendor: Path | None = None,
            say=print) -> Path:
    """Install launch, launch_ros and the ``ros2`` CLI into ``prefix`` unless already there.

    Returns:
        ``prefix``.

    Raises:
        LaunchDepsError: no vendored sources, or a step failed (the log's tail is in the
            message).
    """
    vendor = vendor or vendor_dir()
    if vendor is None:
        raise LaunchDepsError('no vendored ROS 2 launch sources (../shared/vendor/ros2-launch; '
                              'set CDCCA_ROS2_LAUNCH_SRC)')
    prefix = Path(prefix).resolve()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f'{prefix.name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this checkout may be installing
        if installed(prefix, vendor):
            return prefix
        say(f'[launch_deps] installing ROS 2 launch from {vendor} into {prefix} (~1 min, once)')
        shutil.rmtree(prefix, ignore_errors=True)
        prefix.mkdir(parents=True)
        log = prefix / 'install.log'
        venv = Path(sys.prefix)
        with tempfile.TemporaryDirectory(prefix='cdcca-launch-deps-') as tmp:
            # pip builds in-tree: build scratch copies, never the shared sources.
            dirs = []
            for name in PACKAGES:
                shutil.copytree(vendor / 'src' / name, Path(tmp) / name)
                dirs.append(str(Path(tmp) / name))
            _run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                  '--no-warn-script-location', '--prefix', str(prefix), '--ignore-installed',
                  '--no-deps', *PYPI], log)
            _run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                  '--no-warn-script-location', '--prefix', str(prefix), '--ignore-installed',
                  '--no-deps', '--no-build-isolation', *dirs], log)
            ws = Path(tmp) / 'ws'
            ws.mkdir()
            for name in MESSAGE_PACKAGES:
                shutil.copytree(vendor / 'src' / name, ws / name)
            import numpy

            env = dict(os.environ, VIRTUAL_ENV=str(venv),
                       PATH=f'{venv / "bin"}{os.pathsep}{os.environ.get("PATH", "")}',
                       AMENT_PREFIX_PATH=str(venv), CMAKE_PREFIX_PATH=str(venv))
            _run([str(venv / 'bin' / 'colcon'), '--log-base', str(Path(tmp) / 'log'), 'build',
                  '--base-paths', str(ws), '--build-base', str(Path(tmp) / 'build'),
                  '--install-base', str(prefix), '--merge-install',
                  '--event-handlers', 'console_direct-', 'summary-',
                  '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}',
                  f'-DPython3_NumPy_INCLUDE_DIR={numpy.get_include()}',
                  '-DBUILD_TESTING=OFF', '-Wno-dev'], log, env=env)
        (prefix / STAMP).write_text(_inputs_hash(vendor) + '\n')
        say('[launch_deps] done')
    return prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python tools/launch_deps.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--prefix', type=Path, default=DEFAULT_PREFIX)
    parser.add_argument('--vendor', type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        prefix = install(args.prefix, args.vendor)
    except LaunchDepsError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    env = launch_env(prefix, base={})
    print('# to use ros2 launch in this shell, after the project environment:')
    for name, value in env.items():
        print(f'export {name}={value}:${name}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
