"""The shipped caption heads (``make models``): they load beside the bundled models, caption
as recorded in ``captions.json``, and the recorded scores show the gap the paper's Table 2
starts from (teacher good on drifted scenes, the source-only student worse)."""
from __future__ import annotations

import json

import pytest

from cdcca_ros.models.bundled import BUNDLED_DIR
from cdcca_ros.sim.captions import caption_samples
from cdcca_ros.sim.train_captions import SCORES_FILE, CaptionRecipe

RECORD_PATH = BUNDLED_DIR / SCORES_FILE
pytestmark = pytest.mark.skipif(not RECORD_PATH.is_file(),
                                reason='no bundled caption heads: run `make models`')


@pytest.fixture(scope='module')
def record() -> dict:
    return json.loads(RECORD_PATH.read_text())


def test_record_shows_the_drift_gap(record: dict) -> None:
    teacher, student = record['scores']['teacher'], record['scores']['student']
    # CIDEr-D on the COCO scale (x100 in papers): the student is good on its own domain ...
    assert student['in']['cider'] >= 3.0
    # ... and far worse on shifted and novel scenes, where the teacher still captions well
    for split in ('near', 'out'):
        assert student['in']['cider'] - student[split]['cider'] >= 1.0, split
        assert teacher[split]['cider'] - student[split]['cider'] >= 1.0, split
        assert teacher[split]['cider'] >= 2.5, split
    assert teacher['all']['bleu4'] > student['all']['bleu4']
    assert record['recipe']['seed'] == CaptionRecipe().seed


@pytest.mark.parametrize('name', ['teacher', 'student'])
def test_shipped_heads_caption_as_recorded(record: dict, name: str) -> None:
    from cdcca_ros.models.bundled import load
    from cdcca_ros.models.caption_head import Captioner
    from cdcca_ros.sim.world import World

    model = load(f'bundled:{name}')
    captioner = Captioner.load(model, BUNDLED_DIR / name)
    world = World(record['recipe']['world_seed'])
    examples = record['scores'][name]['examples']
    samples = [caption_samples(world, e['domain'], 1, record['recipe']['image_size'],
                               e['index'])[0] for e in examples]
    got = [r.text for r in captioner.caption([s.image for s in samples])]
    assert got == [e['caption'] for e in examples]
