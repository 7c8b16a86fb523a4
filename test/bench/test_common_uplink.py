"""The benches' device uplink follows the node's defaults: the basis packing where the student
ships a token basis (decoded by the cloud's own copy), ecq at uts.keep_ratio where it does not."""
from __future__ import annotations

import numpy as np
import torch

from cdcca_ros.bench.common import cloud_token_basis, device_params, device_uplink


def _sample(model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        tokens = model.vision_tokens([image])[0]
        probs = model.answer_from_tokens(tokens[None], None, ['what colour?'])[0].step_probs
    return tokens, probs


def test_the_bundled_student_uplinks_basis_coded_tokens_the_cloud_decodes():
    from cdcca_ros.core.uplink.pipeline import BASIS, decode_tokens
    from cdcca_ros.models import bundled

    model = bundled.load('bundled:student')
    space = model.vision_space()
    pipe = device_uplink('bundled:student', space, model.mc_token_features,
                         stage1_threshold=0.0, audit_fraction=0.0)
    p = device_params()
    assert p['uts.pack_dtype'] == BASIS and pipe.packing == BASIS
    assert pipe.uts.cfg.keep_ratio == p['uts.basis_keep_ratio']
    tokens, probs = _sample(model)
    up = pipe.process(probs, tokens)
    packed = up.uts.packed
    assert packed.dtype == BASIS and len(packed.data) <= p['uts.budget_bytes']
    decoded, idx = decode_tokens(BASIS, packed.data, list(packed.scale), [], space.num_tokens,
                                 space.dim, up.basis_version,
                                 cloud_token_basis('bundled:student', space))
    assert torch.equal(idx, up.uts.kept_indices) and decoded.shape == (idx.numel(), space.dim)


def test_a_student_without_a_basis_falls_back_to_ecq_at_the_keep_ratio(tiny_specs):
    from cdcca_ros.models import bundled

    _, student = tiny_specs
    model = bundled.load(student)
    space = model.vision_space()
    pipe = device_uplink(student, space, model.mc_token_features)
    assert pipe.packing == 'ecq' and pipe.basis is None
    assert pipe.uts.cfg.keep_ratio == device_params()['uts.keep_ratio']
    assert cloud_token_basis(student, space) is None


def test_a_benchs_device_parameters_reach_the_uplink():
    """``--device uts.*=...`` overrides reach the pipeline (they were once dropped: the
    uplink read the table defaults whatever the bench was given)."""
    from cdcca_ros.models import bundled

    model = bundled.load('bundled:student')
    params = {**device_params(), 'uts.audit_fraction': 0.35, 'uts.basis_keep_ratio': 0.5}
    pipe = device_uplink('bundled:student', model.vision_space(), model.mc_token_features,
                         params=params)
    assert pipe.uts.cfg.audit_fraction == 0.35 and pipe.uts.cfg.keep_ratio == 0.5
    default = device_uplink('bundled:student', model.vision_space(), model.mc_token_features)
    assert default.uts.cfg.audit_fraction == device_params()['uts.audit_fraction'] != 0.35
