"""The nodes' Fast DDS profile: when it applies, and that camera frames cross processes."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np

from cdcca_ros.nodes.dds_profile import DDS_PROFILE, use_dds_profile

VAR = 'FASTDDS_DEFAULT_PROFILES_FILE'


def test_profile_is_set_only_when_nothing_else_is() -> None:
    env: dict[str, str] = {}
    assert use_dds_profile(env) == str(DDS_PROFILE) and env[VAR] == str(DDS_PROFILE)
    for taken in ({VAR: '/etc/mine.xml'}, {'FASTRTPS_DEFAULT_PROFILES_FILE': '/etc/old.xml'},
                  {'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}, {'CDCCA_DDS_PROFILE': 'off'},
                  {'CDCCA_DDS_PROFILE': '0'}):
        env = dict(taken)
        assert use_dds_profile(env) is None
        assert env == taken  # left exactly as it was
    env = {'RMW_IMPLEMENTATION': 'rmw_fastrtps_dynamic_cpp'}
    assert use_dds_profile(env) == str(DDS_PROFILE)


def test_profile_file_holds_a_frame_in_shared_memory() -> None:
    ns = {'d': 'http://www.eprosima.com'}
    root = ET.parse(DDS_PROFILE).getroot()
    sizes = [int(t.findtext('d:segment_size', namespaces=ns))
             for t in root.iterfind('.//d:transport_descriptor', ns)
             if t.findtext('d:type', namespaces=ns) == 'SHM']
    assert sizes and min(sizes) >= 4 * 640 * 480 * 3  # several VGA rgb8 frames in flight
    participant = root.find('.//d:participant', ns)
    assert participant is not None and participant.get('is_default_profile') == 'true'
    # This test process runs with it (test/conftest.py), as the nodes do.
    assert os.environ.get(VAR) == str(DDS_PROFILE)


SUBSCRIBER = r'''
import sys, threading
import rclpy
from rclpy.node import Node
from sensor_msgs.msg import Image
from cdcca_ros.nodes.common import SENSOR_QOS, use_dds_profile
use_dds_profile()
rclpy.init()
node = Node('frame_counter')
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()

def got(msg):
    if len(msg.data) == 640 * 480 * 3:
        print('frame', flush=True)

sub = node.create_subscription(Image, 'frames', got, SENSOR_QOS)
matched = False
while not stop.is_set():  # until the test's line on stdin (or its end)
    rclpy.spin_once(node, timeout_sec=0.05)
    if not matched and sub.get_publisher_count() >= 1:
        matched = True
        print('matched', flush=True)
'''


def test_vga_frames_reach_another_process_on_best_effort(ros_context) -> None:
    """With Fast DDS's built-in 512 KiB segments 1 of 60 such frames arrived here."""
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from cdcca_ros.nodes.common import SENSOR_QOS

    proc = subprocess.Popen([sys.executable, '-c', SUBSCRIBER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None and proc.stdin is not None
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout],
                     daemon=True).start()

    def next_line(timeout: float) -> str | None:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            return None

    node = Node('frame_source', context=ros_context)
    sent = 30
    received = 0
    try:
        pub = node.create_publisher(Image, 'frames', SENSOR_QOS)
        # Both sides have discovered each other (a best-effort frame sent earlier is lost).
        deadline = time.monotonic() + 15.0
        while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pub.get_subscription_count() == 1
        assert next_line(max(0.0, deadline - time.monotonic())) == 'matched'
        frame = np.random.default_rng(0).integers(0, 255, 640 * 480 * 3, dtype=np.uint8)
        msg = Image(height=480, width=640, encoding='rgb8', step=640 * 3,
                    data=frame.tobytes())
        for _ in range(sent):
            pub.publish(msg)
            time.sleep(0.1)  # a 10 fps camera
        # Count arrivals until all did, or none came for a second (the rest are lost).
        while received < sent and next_line(1.0) == 'frame':
            received += 1
    finally:
        node.destroy_node()
        try:
            proc.stdin.write('stop\n')
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout=10)
    assert received >= sent * 0.8, f'{received} of {sent} frames arrived'
