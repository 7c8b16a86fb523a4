"""Tests of cdcca_ros.core.uplink.pipeline on the bundled student: tokens (UTS packings and
the shared basis) or the frame, and the cloud's decoding."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
from cdcca_ros.core.uplink.image import decode_jpeg
from cdcca_ros.core.uplink.pipeline import UplinkPipeline, decode_tokens
from cdcca_ros.core.uts import INDEX_BYTES, SEQUENCE_HEADER_BYTES, UtsConfig, pack_tokens
from cdcca_ros.errors import ConfigError


@pytest.fixture(scope='module')
def student():
    from cdcca_ros.models import bundled

    return bundled.load('bundled:student')


@pytest.fixture(scope='module')
def sample(student):
    from cdcca_ros.sim.domains import DRIFTED
    from cdcca_ros.sim.world import World

    s = World(3).samples(DRIFTED[0], 1, (640, 480), start=2_000_000)[0]
    tokens = student.vision_tokens([s.image])[0]
    answer = student.answer_from_tokens(tokens[None], None, [s.question])[0]
    return s, tokens, answer.step_probs


def pipeline(student, **kwargs) -> UplinkPipeline:
    cfg = UtsConfig(stage1_threshold=0.0, keep_ratio=kwargs.pop('keep_ratio', 1.0))
    return UplinkPipeline(cfg, student.mc_token_features, has_cls=True, **kwargs)


def test_the_bundled_student_ships_a_basis_bound_to_its_encoder(student):
    from cdcca_ros.models.bundled import BUNDLED_DIR

    basis = TokenBasis.load(Path(BUNDLED_DIR) / 'student' / BASIS_FILE,
                            space_id(student.vision_space()))
    assert basis.dim == student.vision_space().dim


def test_basis_packing_fits_the_budget_and_decodes_close(student, sample):
    from cdcca_ros.models.bundled import BUNDLED_DIR

    _, tokens, probs = sample
    basis = TokenBasis.load(Path(BUNDLED_DIR) / 'student' / BASIS_FILE)
    up = pipeline(student, packing='basis', basis=basis, budget_bytes=160).process(probs, tokens)
    assert up is not None and up.dtype == 'basis' and up.basis_version == basis.version
    assert len(up.uts.packed.data) <= 160
    # No uint16 indices travel: payload, one scale, two empty counts.
    assert up.uplink_bytes == 3 * SEQUENCE_HEADER_BYTES + len(up.uts.packed.data) + 4
    decoded, indices = decode_tokens('basis', up.uts.packed.data, up.uts.packed.scale, [],
                                     tokens.shape[0], tokens.shape[1], up.basis_version, basis)
    assert indices.tolist() == list(range(tokens.shape[0]))
    error = float((decoded - tokens.float()).norm() / tokens.float().norm())
    assert error < 0.3


def test_uts_packings_still_travel_with_their_indices(student, sample):
    _, tokens, probs = sample
    up = pipeline(student, packing='int8', keep_ratio=0.5).process(probs, tokens)
    kept = up.uts.kept_indices
    assert up.dtype == 'int8' and 0 < kept.numel() < tokens.shape[0]
    assert up.uplink_bytes >= INDEX_BYTES * kept.numel() + len(up.uts.packed.data)
    decoded, indices = decode_tokens('int8', up.uts.packed.data, up.uts.packed.scale,
                                     kept.tolist(), tokens.shape[0], tokens.shape[1])
    assert torch.equal(indices, kept)
    assert torch.allclose(decoded, tokens.float()[kept], atol=0.05 * float(tokens.abs().max()))


def test_image_mode_sends_the_frame_of_selected_samples_only(student, sample):
    s, tokens, probs = sample
    up = pipeline(student, mode='image').process(probs, tokens, s.image)
    assert up is not None and up.dtype == 'image' and up.uts is None
    assert decode_jpeg(up.image).shape == s.image.shape
    assert up.uplink_bytes == SEQUENCE_HEADER_BYTES + len(up.image)
    gated = UplinkPipeline(UtsConfig(stage1_threshold=50.0), student.mc_token_features,
                           mode='image')
    assert gated.process(probs, tokens, s.image) is None
    assert gated.selector.offered == 1 and gated.selector.passed == 0
    with pytest.raises(ConfigError, match='frame'):
        pipeline(student, mode='image').process(probs, tokens)


def test_an_error_target_codes_a_sample_only_as_finely_as_it_needs(student, sample):
    from cdcca_ros.models.bundled import BUNDLED_DIR

    _, tokens, probs = sample
    basis = TokenBasis.load(Path(BUNDLED_DIR) / 'student' / BASIS_FILE)

    def coded(**kw):
        up = pipeline(student, packing='basis', basis=basis, **kw).process(probs, tokens)
        decoded, _ = decode_tokens('basis', up.uts.packed.data, up.uts.packed.scale, [],
                                   tokens.shape[0], tokens.shape[1], up.basis_version, basis)
        return (len(up.uts.packed.data),
                float((decoded - tokens.float()).norm() / tokens.float().norm()))

    fixed_bytes, fixed_error = coded(budget_bytes=352)
    loose_bytes, loose_error = coded(budget_bytes=352, max_error=fixed_error * 2)
    assert loose_bytes < fixed_bytes and fixed_error < loose_error <= fixed_error * 2
    with pytest.raises(ConfigError, match='max_error'):
        pipeline(student, packing='basis', basis=basis, budget_bytes=352, max_error=1.0)


def test_bad_settings_are_refused(student):
    with pytest.raises(ConfigError, match='basis'):
        pipeline(student, packing='basis')
    with pytest.raises(ConfigError, match='mode'):
        pipeline(student, mode='video')
    with pytest.raises(ConfigError, match='packing'):
        pipeline(student, packing='zip')


def test_audit_samples_go_whole_in_every_mode(student, sample):
    from cdcca_ros.models.bundled import BUNDLED_DIR

    s, tokens, probs = sample
    n = tokens.shape[0]
    basis = TokenBasis.load(Path(BUNDLED_DIR) / 'student' / BASIS_FILE)
    # Stage 1 refuses everything; every sample is drawn for the audit.
    cfg = UtsConfig(stage1_threshold=50.0, keep_ratio=0.5, audit_fraction=1.0)
    tokens_up = UplinkPipeline(cfg, student.mc_token_features, has_cls=True, packing='basis',
                               basis=basis, budget_bytes=160).process(probs, tokens)
    # A basis uplink's audit sample is every token in ecq (the budget is for a kept subset).
    assert tokens_up is not None and tokens_up.audit and tokens_up.dtype == 'ecq'
    assert tokens_up.uts.kept_indices.tolist() == list(range(n))
    assert tokens_up.basis_version == ''
    assert tokens_up.uts.packed.data == pack_tokens(tokens.detach().cpu(), 'ecq').data
    # ... or every token in the basis, under the budget and error target of the others.
    in_basis = UplinkPipeline(cfg, student.mc_token_features, has_cls=True, packing='basis',
                              basis=basis, budget_bytes=352, max_error=0.1,
                              audit_packing='basis').process(probs, tokens)
    assert in_basis is not None and in_basis.audit and in_basis.dtype == 'basis'
    assert in_basis.basis_version == basis.version
    assert in_basis.uts.kept_indices.tolist() == list(range(n))
    decoded, idx = decode_tokens('basis', in_basis.uts.packed.data, in_basis.uts.packed.scale,
                                 [], n, tokens.shape[1], in_basis.basis_version, basis)
    assert idx.tolist() == list(range(n)) and len(in_basis.uts.packed.data) <= 352
    error = float((decoded - tokens.float()).norm() / tokens.float().norm())
    assert error <= 0.1 or len(in_basis.uts.packed.data) > 300  # the target, or the budget's
    with pytest.raises(ConfigError, match='audit packing'):
        UplinkPipeline(cfg, student.mc_token_features, packing='basis', basis=basis,
                       budget_bytes=352, audit_packing='fp16')
    image_up = UplinkPipeline(cfg, student.mc_token_features, mode='image').process(
        probs, tokens, s.image)
    assert image_up is not None and image_up.audit and image_up.dtype == 'image'
    plain = UplinkPipeline(UtsConfig(stage1_threshold=0.0), student.mc_token_features,
                           mode='image').process(probs, tokens, s.image)
    assert plain is not None and not plain.audit
