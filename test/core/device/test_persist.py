"""The adapter in use on disk: written in the background in version order, restored on a
restart, refused when corrupt or foreign (:mod:`cdcca_ros.core.device.persist`)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from device_helpers import Cloud, load, model_hash, runtime
from tiny_models import QUESTION

from cdcca_ros.core.device import persist
from cdcca_ros.core.device_runtime import DeviceRuntime
from cdcca_ros.errors import ModelError


def test_two_quick_applies_then_restart_lands_on_the_second(student_dir, keys, images,
                                                            tmp_path) -> None:
    rt = runtime(student_dir, keys, tmp_path / 'device')
    assert rt.persisted_version == 0  # nothing on disk: a restart starts from the base
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    rt.apply(cloud.step(2))
    answers = [rt.answer(im, QUESTION).step_probs for im in images]
    # No flush: a runtime starting on the folder waits for the pending writes itself.
    again = runtime(student_dir, keys, tmp_path / 'device')
    assert again.version == 2 and again.round == 2
    assert again.base_hash == rt.base_hash == model_hash(again)
    assert rt.persisted_version == 2 and rt.status()['persisted_version'] == 2
    assert all(np.array_equal(again.answer(im, QUESTION).step_probs, a)
               for im, a in zip(images, answers, strict=True))
    # The cloud's next delta applies on the restarted device.
    again.apply(cloud.step(3))
    assert again.version == 3


def test_rollback_is_persisted(student_dir, keys, tmp_path) -> None:
    rt = runtime(student_dir, keys, tmp_path / 'device')
    base_hash = rt.base_hash
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    assert rt.rollback() == 2
    assert rt.base_hash == base_hash == model_hash(rt)
    assert rt.flush(timeout=30) and rt.persisted_version == 2
    again = runtime(student_dir, keys, tmp_path / 'device')
    assert again.version == 2 and again.base_hash == base_hash


def test_writer_writes_the_latest_version_in_order(student_dir, keys, tmp_path,
                                                   monkeypatch) -> None:
    rt = runtime(student_dir, keys, tmp_path / 'device')
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    envelopes = [cloud.step(seed) for seed in range(1, 6)]
    written: list[int] = []
    started, release = threading.Event(), threading.Event()
    real_write = persist.write_adapter

    def slow_write(directory, snapshot) -> None:
        started.set()
        release.wait(30)  # a slow disk: the applies overtake the writer
        real_write(directory, snapshot)
        written.append(snapshot.version)

    monkeypatch.setattr(persist, 'write_adapter', slow_write)
    rt.apply(envelopes[0])
    assert started.wait(30)  # v1 is being written
    for env in envelopes[1:]:
        rt.apply(env)  # does not wait for the disk...
        assert rt.persisted_version == 0  # ...and never claims what is not there
    assert rt.status()['persisted_version'] == 0
    release.set()
    assert rt.flush(timeout=30)
    assert written == [1, 5]  # in order; versions overtaken while writing are skipped
    assert rt.persisted_version == 5
    from safetensors import safe_open

    with safe_open(str(tmp_path / 'device' / persist.WEIGHTS_FILE), 'pt') as f:
        meta = f.metadata()
    assert meta['version'] == '5' and meta['hash'] == rt.base_hash


def test_failed_write_is_reported_and_retried(student_dir, keys, tmp_path) -> None:
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the state folder should be')
    rt = runtime(student_dir, keys, blocker)
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))  # the apply itself succeeds
    assert rt.flush(timeout=30)
    assert rt.version == 1 and rt.persisted_version == 0
    assert 'cannot persist v1' in rt.status()['persist_error']
    blocker.unlink()
    rt.apply(cloud.step(2))
    assert rt.flush(timeout=30)
    assert rt.persisted_version == 2 and rt.status()['persist_error'] == ''


def test_corrupt_or_foreign_state_is_refused(student_dir, keys, tmp_path) -> None:
    rt = runtime(student_dir, keys, tmp_path / 'device')
    cloud = Cloud(rt.model.trainable_state_dict(), keys[0])
    rt.apply(cloud.step(1))
    assert rt.flush(timeout=30)
    with pytest.raises(ModelError, match='belongs to'):
        DeviceRuntime(load(student_dir), 'robot2', keys[1], tmp_path / 'device')
    path = tmp_path / 'device' / persist.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one weight byte: the recorded hash no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match='hash'):
        runtime(student_dir, keys, tmp_path / 'device')
