"""Tests of cdcca_ros.models.real: the published models at their real configurations, built on
the meta device (shapes only: no test loads a multi-GB model)."""
from __future__ import annotations

import pytest

from cdcca_ros.errors import ConfigError, ModelLoadError
from cdcca_ros.models.real import STUDENTS, count_params, real_model, real_models


@pytest.fixture(scope='module')
def meta_models():
    from cdcca_ros.models.real import load_real

    return {name: load_real(name, device='meta', dtype='bfloat16') for name in real_models()}


def test_every_family_has_a_student_and_a_teacher():
    models = real_models()
    assert set(STUDENTS) == {'blip2', 'llava', 'qwen2_vl'}
    for family, name in STUDENTS.items():
        student = models[name]
        assert student.family == family and student.role == 'student'
        assert models[student.teacher].family == family
        assert models[student.teacher].role == 'teacher'


def test_meta_builds_have_the_published_parameter_counts(meta_models):
    for name, model in meta_models.items():
        published = real_model(name).published_params
        count = count_params(model)
        assert abs(count - published) <= 0.01 * published, (name, count, published)
        assert next(model.torch_model.parameters()).device.type == 'meta'


def test_students_share_their_teachers_vision_space_and_train_the_papers_set(meta_models):
    for name in STUDENTS.values():
        student, teacher = meta_models[name], meta_models[real_model(name).teacher]
        # Raw space (dim, tokens, grid, CLS, encoder config): the fingerprint needs values.
        assert student._vision_space_raw() == teacher._vision_space_raw()
        trainable = student.trainable_parameters()
        assert any('lora_' in k for k in trainable)
        assert not any(student._is_shared_vision(k) for k in trainable)
        # LoRA, norms, biases (and BLIP-2's query tokens): a small share of the model.
        assert 0 < count_params(student, trainable=True) < 0.01 * count_params(student)
        # The declared set: LoRA only on the language model's q_proj / v_proj.
        lora = {k.split('.lora_')[0].rsplit('.', 1)[-1] for k in trainable if 'lora_' in k}
        assert lora == {'q_proj', 'v_proj'}, (name, lora)
    assert 'query_tokens' in meta_models[STUDENTS['blip2']].trainable_parameters()
    # The paper updates 1.65 M parameters; BLIP-2 OPT-2.7B's declared set is that size.
    blip2 = count_params(meta_models[STUDENTS['blip2']], trainable=True)
    assert 0.8 * 1.65e6 <= blip2 <= 1.2 * 1.65e6, blip2
    space = meta_models[STUDENTS['blip2']]._vision_space_raw()
    assert space[:4] == (1408, 257, (16, 16), True)
    assert meta_models[STUDENTS['llava']]._vision_space_raw()[:2] == (1024, 576)


def test_unknown_names_and_impossible_loads_are_refused():
    from cdcca_ros.models import bundled

    with pytest.raises(ConfigError, match='no real configuration'):
        real_model('gpt-5')
    with pytest.raises(ModelLoadError, match='known'):
        bundled.resolve('real:nope')
    with pytest.raises(ConfigError, match='meta'):
        bundled.load('bundled:student', device='meta')
    with pytest.raises(ConfigError, match='quantize'):
        bundled.load('real:qwen2-vl-2b', quantization='4bit')
    with pytest.raises(ConfigError, match='dtype'):
        bundled.load('real:qwen2-vl-2b', device='meta', dtype='int3')


def test_a_declared_trainable_set_is_configured_at_load_and_a_bad_one_refused(make_model,
                                                                               tmp_path):
    import json

    from cdcca_ros.models import bundled
    from cdcca_ros.models.base import TrainableConfig

    model = make_model('blip2')
    model.trainable_config = None  # saved as a base without a trainable set (as materialize)
    model.save(tmp_path / 'm')
    meta_path = tmp_path / 'm' / 'cdcca.json'
    meta = json.loads(meta_path.read_text())
    declared = TrainableConfig(lora_r=1, lora_alpha=2, lora_targets=('q_proj', 'v_proj'))
    meta['trainable_set'] = declared.to_dict()
    meta_path.write_text(json.dumps(meta))
    loaded = bundled.load(str(tmp_path / 'm'))
    assert loaded.trainable_config == declared
    assert {k for k in loaded.trainable_parameters() if 'lora_' in k} and not any(
        'k_proj.lora_' in k or 'fc1.lora_' in k for k in loaded.trainable_parameters())
    meta['trainable_set'] = {'lora_r': 0}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match='trainable_set'):
        bundled.load(str(tmp_path / 'm'))
