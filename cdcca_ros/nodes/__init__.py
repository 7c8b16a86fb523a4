"""Thin ROS 2 nodes over the pure-Python core."""
