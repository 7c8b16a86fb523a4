"""The family registry: lazy imports, family detection, errors (offline)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cdcca_ros.errors import ConfigError, ModelLoadError
from cdcca_ros.models import build_tiny, load_model
from cdcca_ros.models.registry import FAMILIES, family_class


def test_import_is_cheap():
    code = ('import sys, cdcca_ros.models; '
            'print("torch" in sys.modules, "transformers" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ['False', 'False']


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_classes(family):
    assert family_class(family).family == family


def test_unknown_family():
    with pytest.raises(ConfigError, match="unknown model family 'gpt'"):
        build_tiny('gpt', ['red'])
    with pytest.raises(ConfigError, match='quantization'):
        load_model('anywhere', family='blip2', quantization='3bit')


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match='cannot read a model config'):
        load_model(tmp_path)                               # empty directory
    with pytest.raises(ModelLoadError, match='cannot read a model config'):
        load_model('no-such-org/no-such-model')            # hub id, offline
    (tmp_path / 'cdcca.json').write_text('{"no_family": 1}')
    with pytest.raises(ModelLoadError, match='not a valid cdcca.json'):
        load_model(tmp_path)


def test_family_from_hf_config_without_cdcca_json(tmp_path):
    """A plain HF checkpoint (as from the hub) is recognised by its model_type."""
    model = build_tiny('llava', ['red', 'circle'])
    model.save(tmp_path)
    (tmp_path / 'cdcca.json').unlink()
    loaded = load_model(tmp_path)
    assert loaded.family == 'llava' and loaded.trainable_config is None
    assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'llava'


def test_wrong_family_for_directory(tmp_path):
    build_tiny('llava', ['red']).save(tmp_path)
    with pytest.raises(ModelLoadError, match="holds family 'llava', not 'blip2'"):
        load_model(tmp_path, family='blip2')


@pytest.mark.parametrize(('family', 'sizes', 'match'), [
    ('blip2', {'image_size': 60, 'patch_size': 8}, 'image_size=60'),
    ('blip2', {'lm_hidden': 30, 'lm_heads': 4}, 'lm_hidden=30'),
    ('llava', {'image_size': 60}, 'image_size=60'),
    ('qwen2_vl', {'image_size': 72, 'patch_size': 8}, 'image_size=72'),
    ('qwen2_vl', {'vision_hidden': 40, 'vision_heads': 4}, 'vision_hidden=40'),
])
def test_build_tiny_validates_sizes(family, sizes, match):
    with pytest.raises(ConfigError, match=match):
        build_tiny(family, ['red'], **sizes)


def test_student_vision_must_match_teacher():
    teacher = build_tiny('blip2', ['red'])
    with pytest.raises(ConfigError, match='conflicts with vision_from'):
        build_tiny('blip2', ['red'], vision_hidden=32, vision_from=teacher)
    with pytest.raises(ConfigError, match='Blip2MLLM'):
        build_tiny('blip2', ['red'], vision_from=build_tiny('llava', ['red']))
