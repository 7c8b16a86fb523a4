"""The import package `cdcca_ros` holds both generated interfaces and pure-Python modules."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_generated_and_pure_python_in_one_import_package():
    msg = pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')
    import cdcca_ros
    from cdcca_ros import errors

    assert msg.Question.__module__.startswith('cdcca_ros.msg')
    assert issubclass(errors.DeltaRejectedError, errors.CdccaError)
    assert isinstance(cdcca_ros.__version__, str)


def test_installed_tree_holds_both_without_the_sources():
    """From outside the repository, the colcon install alone provides both halves."""
    pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')
    code = ('import cdcca_ros, cdcca_ros.errors, cdcca_ros.core, cdcca_ros.msg, cdcca_ros.srv;'
            'print(cdcca_ros.errors.__file__); print(cdcca_ros.msg.__file__)')
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p and Path(p) != REPO)
    out = subprocess.run([sys.executable, '-c', code], cwd='/', env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert len(out) == 2
    for path in out:
        assert not Path(path).is_relative_to(REPO / 'cdcca_ros'), path
    assert Path(out[0]).parent == Path(out[1]).parent.parent


def test_core_never_imports_rclpy():
    """The pure-Python core must stay usable without a ROS graph."""
    code = ('import sys, importlib, pkgutil, cdcca_ros;'
            'names = [m.name for p in ("core", "sim", "transport") '
            'for m in pkgutil.walk_packages([f"{cdcca_ros.__path__[0]}/{p}"], f"cdcca_ros.{p}.")];'
            '[importlib.import_module(n) for n in names if not n.endswith("__main__")];'
            'print(len(names), "rclpy" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, has_rclpy = out.stdout.split()
    # Every module and subpackage of the three packages was imported (an empty list would
    # prove nothing).
    roots = [REPO / 'cdcca_ros' / d for d in ('core', 'sim', 'transport')]
    expected = ([p for r in roots for p in r.rglob('*.py') if p.name != '__init__.py']
                + [p.parent for r in roots for p in r.rglob('__init__.py') if p.parent != r])
    assert int(count) == len(expected) >= 20, (count, sorted(str(p) for p in expected))
    assert has_rclpy == 'False'


def test_errors_carry_the_hierarchy():
    errors = importlib.import_module('cdcca_ros.errors')
    assert issubclass(errors.SignatureError, errors.WireError)
    assert issubclass(errors.WireError, ValueError)
    assert issubclass(errors.DeviceNotConnectedError, ConnectionError)


def test_a_new_home_does_not_rebuild_the_package(tmp_path):
    """Nodes run from the colcon install: `make run` under another HOME must not rebuild it."""
    venv = os.environ.get('VIRTUAL_ENV')
    if not venv or not (REPO / '.colcon' / '.cdcca-build').is_file():
        pytest.skip('not inside the environment built by tools/setup.sh')
    env = {**os.environ, 'HOME': str(tmp_path), 'CDCCA_VENV': venv}
    env.pop('XDG_CACHE_HOME', None)
    proc = subprocess.run([str(REPO / 'tools' / 'setup.sh')], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'building' not in proc.stdout and 'fixing' not in proc.stdout, proc.stdout
