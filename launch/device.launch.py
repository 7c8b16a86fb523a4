"""Launch the device node set of cdcca_ros (see cdcca_ros/nodes/sets.py).

    ros2 launch cdcca_ros device.launch.py [<node>.<param>:=<value> ...]

Every node parameter is a launch argument named <node>.<param> (`ros2 launch cdcca_ros
device.launch.py --show-args` lists them); config/<node>.yaml holds the deployment's values.
use_camera:=false (your own camera driver), use_bridge:=false (no cloud link yet) and
image_topic:=<topic> start only the part you need.
Without ROS 2 launch, `python -m cdcca_ros.runner device` starts the same nodes.
"""
from cdcca_ros.nodes.launch_support import description


def generate_launch_description():
    return description('device')
