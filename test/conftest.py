"""Shared test set-up: isolation of ROS 2 traffic, logs and model hubs.

Every test run gets one ROS domain id and localhost-only discovery, so parallel runs and other
sessions on the machine never see each other's topics: ``CDCCA_TEST_DOMAIN_ID`` or
``ROS_DOMAIN_ID`` when set, else a free one in 1..101 picked and locked for the run
(:mod:`cdcca_ros.nodes.ros_domain`). A test that leaves it changed fails (and the value is put
back for the rest of the run), and so does the session when it differs at the end. ROS logs go
to a temporary folder, and no test may reach a model hub.
"""
from __future__ import annotations

import os
import tempfile

import pytest

from cdcca_ros.nodes.ros_domain import DomainLease, apply_env, resolve_domain, ros_isolation

# Set before anything imports rclpy: the domain id and discovery range are read at init.
# The lease holds the domain's lock for the whole run (until this process ends).
ROS_DOMAIN = resolve_domain()
ROS_ENV = ros_isolation(ROS_DOMAIN.domain_id)
apply_env(ROS_ENV)
os.environ['ROS_LOG_DIR'] = tempfile.mkdtemp(prefix='cdcca-roslog-')
os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# Test processes publish camera frames to the nodes: the nodes' Fast DDS profile (8 MiB
# shared-memory segments) for them too.
from cdcca_ros.nodes.dds_profile import use_dds_profile  # noqa: E402

use_dds_profile()


@pytest.fixture
def ros_context():
    """A fresh rclpy context (its own DDS participant), shut down even when the test fails."""
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx)
    try:
        yield ctx
    finally:
        if ctx.ok():
            rclpy.shutdown(context=ctx)


@pytest.fixture
def ros_context_pair():
    """Two independent rclpy contexts: traffic between them goes through DDS discovery."""
    import rclpy
    from rclpy.context import Context

    contexts = [Context(), Context()]
    for ctx in contexts:
        rclpy.init(context=ctx)
    try:
        yield contexts
    finally:
        for ctx in contexts:
            if ctx.ok():
                rclpy.shutdown(context=ctx)


def _ros_env_changes() -> dict[str, tuple[str | None, str | None]]:
    """``{variable: (expected, found)}`` for every ROS isolation variable not as set above."""
    return {key: (value, os.environ.get(key)) for key, value in ROS_ENV.items()
            if os.environ.get(key) != value}


def pytest_report_header(config: pytest.Config) -> str:
    lock = f', lock {ROS_DOMAIN.lock_path}' if ROS_DOMAIN.locked else ''
    return f'ROS domain {ROS_DOMAIN.domain_id} ({ROS_DOMAIN.how}{lock}), localhost discovery'


@pytest.fixture
def ros_domain_lease() -> DomainLease:
    """The run's ROS domain: its id, how it was chosen, its lock."""
    return ROS_DOMAIN


@pytest.fixture(autouse=True)
def _ros_env_kept() -> object:
    """Fails the test that changed the run's ROS domain or discovery (a bench run in-process,
    a fixture...), and puts them back so the rest of the run stays in its domain."""
    yield
    changed = _ros_env_changes()
    if changed:
        apply_env(ROS_ENV)
        pytest.fail(f'the ROS environment of the run was changed (expected, found): {changed}',
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    changed = _ros_env_changes()
    if changed:
        print(f'\nERROR: the ROS environment of the run was changed by the end of the session '
              f'(expected, found): {changed}')
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _launch_deps():
    """tools/launch_deps.py as a module (tools/ is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / 'tools' / 'launch_deps.py'
    spec = importlib.util.spec_from_file_location('cdcca_launch_deps', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='session')
def ros2_launch_env() -> dict[str, str]:
    """The environment of a process that runs ``ros2 launch`` (and imports launch_ros).

    ROS 2 launch is not among the PyPI wheels: the vendored upstream sources
    (``../shared/vendor/ros2-launch``) are installed once per checkout into
    ``.colcon/launch_deps`` (``tools/launch_deps.py``; ~1 min the first time, a stamp after),
    never into the virtual environment. Skips where the vendored sources are absent.
    """
    deps = _launch_deps()
    if deps.vendor_dir() is None:
        pytest.skip('ROS 2 launch sources not found (../shared/vendor/ros2-launch or '
                    'CDCCA_ROS2_LAUNCH_SRC): the PyPI wheels have no launch')
    try:
        prefix = deps.install()
    except deps.LaunchDepsError as err:
        pytest.fail(f'installing ROS 2 launch for the tests failed: {err}', pytrace=False)
    return deps.launch_env(prefix)


@pytest.fixture(scope='session')
def launch_importable(ros2_launch_env) -> None:
    """``launch`` and ``launch_ros`` importable in the test process itself."""
    import importlib
    import sys

    site = ros2_launch_env['PYTHONPATH'].split(os.pathsep)[0]  # launch_env puts it first
    if site not in sys.path:
        sys.path.append(site)
    importlib.invalidate_caches()
