"""Rewrite build-machine paths in the ROS 2 wheels' exported CMake files.

The ROS 2 Kilted wheels on PyPI were built in a manylinux container; their exported CMake targets
name that container's Python include directory and numpy include directory, which do not exist
here, and CMake stops with "Imported target ... includes non-existent path". This script replaces
both with real paths. It is idempotent.

The numpy headers are copied to NUMPY_INCLUDE, a folder outside the source tree: the virtual
environment lives inside the repository, and CMake refuses to export a target whose include
directories lie inside the source directory ("... which is prefixed in the source directory").

Usage: python tools/fix_cmake_exports.py VENV NUMPY_INCLUDE
"""
from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy

PYTHON_BUILD_PATH = '/opt/python/cp311-cp311/include/python3.11'
# A numpy include path as an earlier version of this script wrote it (in the venv).
NUMPY_IN_VENV = re.compile(r'[^;"\s]*/site-packages/numpy/_core/include')


def fix(prefix: Path, numpy_include: Path) -> int:
    """Rewrite the paths in every ``share/*/cmake/*.cmake`` under ``prefix``.

    Returns:
        The number of files changed.
    """
    changed = 0
    python_include = sysconfig.get_paths()['include']
    for path in sorted(prefix.glob('share/*/cmake/*.cmake')):
        text = path.read_text()
        new = text.replace(PYTHON_BUILD_PATH, python_include)
        new = NUMPY_IN_VENV.sub(str(numpy_include), new)
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def copy_numpy_headers(dest: Path) -> None:
    """Copy this environment's numpy C headers to ``dest`` (replacing what is there)."""
    tmp = dest.with_name(dest.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(numpy.get_include(), tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    prefix, numpy_include = Path(argv[1]), Path(argv[2]).absolute()
    if not (prefix / 'share').is_dir():
        print(f'{prefix}: no share/ folder; is this the virtual environment?', file=sys.stderr)
        return 1
    python_include = Path(sysconfig.get_paths()['include'])
    if not (python_include / 'Python.h').is_file():
        print(f'no Python.h in {python_include}: install the Python 3.11 headers '
              '(Debian: python3.11-dev)', file=sys.stderr)
        return 1
    numpy_include.parent.mkdir(parents=True, exist_ok=True)
    copy_numpy_headers(numpy_include)
    print(f'fixed {fix(prefix, numpy_include)} CMake files under {prefix}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
