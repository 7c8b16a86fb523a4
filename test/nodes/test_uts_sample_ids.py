"""UTS sample ids stay unique across restarts of the device process: the cloud drops a repeated
id as a re-delivery, so a restarted device starting again at robot1-1 lost its first samples."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('cdcca_ros.msg', reason='package not built: run through `make test`')


def test_sample_ids_differ_across_restarts(ros_context, tiny_student_dir, tmp_path):
    from rclpy.parameter import Parameter
    from std_msgs.msg import Header

    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.models import bundled
    from cdcca_ros.nodes.device_node import DeviceNode
    from cdcca_ros.nodes.uts_node import UtsNode

    runtime = DeviceRuntime(bundled.load(str(tiny_student_dir)), 'robot1',
                            state_dir=tmp_path / 'state')
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ids = []
    for _ in range(2):  # two "boots" of the device process
        device = DeviceNode(runtime, context=ros_context, parameter_overrides=[
            Parameter('uts.stage1_mode', value='top_fraction'),
            Parameter('uts.top_fraction', value=1.0)])
        uts = UtsNode(device, context=ros_context)
        try:
            for question in ('what color is the circle?', 'how many objects are there?'):
                msg = uts.process(runtime.answer(image, question), Header(), image)
                assert msg is not None
                ids.append(msg.sample_id)
        finally:
            uts.destroy_node()
            device.destroy_node()
    assert len(set(ids)) == 4, ids
    assert all(i.startswith('robot1-') for i in ids)
