"""The tiny device of the device-runtime part tests (see ``device_helpers``)."""
from __future__ import annotations

import pytest
from device_helpers import save_student
from tiny_models import random_images

from cdcca_ros.core import wire


@pytest.fixture(scope='module')
def student_dir(tmp_path_factory):
    return save_student(tmp_path_factory.mktemp('student'))


@pytest.fixture(scope='module')
def keys():
    return wire.generate_keypair()


@pytest.fixture(scope='module')
def images():
    return random_images(3)
