"""Crash-safe file writes for checkpoints and persisted adapters."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over
    ``path`` (``os.replace`` is atomic on POSIX).
    """
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
