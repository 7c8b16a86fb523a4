# Source this file (bash) to work inside cdcca_ros's environment: the virtual environment, the
# ROS 2 wheels' prefix, and the colcon install of this package. `make run CMD=...` does it for you.
_cdcca_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_cdcca_venv=${CDCCA_VENV:-$_cdcca_root/.venv}
export VIRTUAL_ENV=$_cdcca_venv
export PATH=$_cdcca_venv/bin:$PATH
# The wheels' bootstrapper sets LD_LIBRARY_PATH itself but not the ament prefix.
export AMENT_PREFIX_PATH=$_cdcca_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}
export CMAKE_PREFIX_PATH=$_cdcca_venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
export ROS_HOME=${ROS_HOME:-$_cdcca_root/.colcon/ros_home}
export ROS_LOG_DIR=${ROS_LOG_DIR:-$ROS_HOME/log}
# The colcon install prefix (merged layout): generated messages, libraries, share/ (launch, config).
_cdcca_prefix=$_cdcca_root/.colcon/install
export AMENT_PREFIX_PATH=$_cdcca_prefix:$AMENT_PREFIX_PATH
export CMAKE_PREFIX_PATH=$_cdcca_prefix:$CMAKE_PREFIX_PATH
export PYTHONPATH=$_cdcca_prefix/lib/python3.11/site-packages${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH=$_cdcca_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$_cdcca_prefix/bin:$PATH
unset _cdcca_prefix
unset _cdcca_root _cdcca_venv
