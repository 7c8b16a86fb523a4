"""The Fast DDS profile of the cdcca_ros processes (no rclpy import: set it before any).

Fast DDS's built-in shared-memory transport has 512 KiB segments, so a 640x480 rgb8 frame goes
over UDP fragments instead and, on the best-effort sensor QoS, mostly never arrives in another
process. :data:`DDS_PROFILE` keeps the same transports with 8 MiB segments (see the file).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

#: The profile (``fastdds.xml`` next to this module; installed with the package).
DDS_PROFILE = Path(__file__).with_name('fastdds.xml')
_PROFILE_VARS = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')


def use_dds_profile(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point Fast DDS at :data:`DDS_PROFILE` for the participants this process creates next.

    Left alone (returns None) when the RMW is not Fast DDS, a profile file is already set
    (``FASTDDS_DEFAULT_PROFILES_FILE`` / ``FASTRTPS_DEFAULT_PROFILES_FILE``), or
    ``CDCCA_DDS_PROFILE`` is ``0``/``off``/``false``. Call before ``rclpy.init``; child
    processes inherit it. Returns the profile path set.
    """
    env = os.environ if environ is None else environ
    rmw = env.get('RMW_IMPLEMENTATION') or 'rmw_fastrtps_cpp'
    if (not rmw.startswith('rmw_fastrtps') or any(env.get(v) for v in _PROFILE_VARS)
            or env.get('CDCCA_DDS_PROFILE', '1').strip().lower() in ('0', 'off', 'false')):
        return None
    env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(DDS_PROFILE)
    return str(DDS_PROFILE)
