"""cdcca_ros: cloud-device collaborative continual adaptation for multimodal LLMs on ROS 2.

The import package holds both the pure-Python core (``core``, ``models``, ``sim``,
``transport``, ``nodes``) and the interfaces that rosidl generates (``msg``, ``srv``).
During development the sources and the colcon install tree are two different folders;
``extend_path`` lets ``cdcca_ros.msg`` come from the install tree while the Python
modules come from the source tree, whichever of the two is first on ``sys.path``.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # noqa: F821 - set by the import system

__version__ = '0.1.0'
