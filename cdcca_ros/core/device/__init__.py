"""The parts of the device's model runtime (:mod:`cdcca_ros.core.device_runtime`), no rclpy.

- :mod:`~cdcca_ros.core.device.answers`: the answer record UTS reads and the multiple-choice
  prompt;
- :mod:`~cdcca_ros.core.device.weights`: the trainable weights in flat buffers (Eq. 8, the
  finite check and the hash in one pass) and the copy into the model;
- :mod:`~cdcca_ros.core.device.probe`: the check of swapped-in weights, on a shadow copy of
  the model and as a ``torch.jit`` trace where it can;
- :mod:`~cdcca_ros.core.device.persist`: the adapter in use on disk, written off the apply
  path and restored, checked, on a restart.
"""
