"""Shared test set-up: isolation of ROS 2 traffic, logs and model hubs.

Every test run gets its own ROS domain id and localhost-only discovery, so parallel runs and other
sessions on the machine never see each other's topics. ROS logs go to a temporary folder, and no
test may reach a model hub.
"""
from __future__ import annotations

import os
import tempfile

import pytest

# Set before anything imports rclpy: the domain id and discovery range are read at init.
os.environ['ROS_DOMAIN_ID'] = str(os.environ.get('CDCCA_TEST_DOMAIN_ID') or 10 + os.getpid() % 90)
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.pop('ROS_STATIC_PEERS', None)
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
