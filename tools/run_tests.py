"""Run pytest and exit with its code without Python's interpreter teardown.

The suite starts native threads that outlive the tests (DDS participants of rclpy, Zenoh
sessions, torch's thread pools); tearing the interpreter down under them can crash *after* every
test has passed and the summary is printed, which would turn a green run red. The test results
are final once pytest returns, so this wrapper flushes the output and leaves with ``os._exit``.

Usage: python tools/run_tests.py [pytest arguments...]
"""
from __future__ import annotations

import os
import sys

import pytest

if __name__ == '__main__':
    code = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
