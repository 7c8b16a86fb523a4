"""Downlink codecs (issue 5): bits per updated parameter vs the accuracy gain they keep.

One AKD round the cloud's way: drifted-domain frames go through the device (vision tokens, UTS
stage 2 with the device defaults), the :class:`CloudRuntime` (AKD settings of the cloud node's
table, but 200 steps: see ``AKD_STEPS``) pseudo-labels them with the teacher, trains the
student and sends its delta under a budget of 1 bit per trainable value, refitted (see below).
The uncompressed delta ``trained - base`` (the cloud's own continuing copy) is then sent
through every codec, as a compact payload like the cloud's; each decoded delta is applied to
the device's base and the accuracy on held-out drifted samples (VQA scoring) is measured::

    gain_retained = (acc_codec - acc_base) / (acc_uncompressed - acc_base)

(None when the round gained less than one sample's worth: nothing to retain), with a paired
bootstrap 5-95% interval, because greedy accuracy moves in whole samples and a round's gain is
a few dozen of them. ``gain_retained_loss`` is the same share measured on the cross-entropy of
the canonical answers (teacher forced): smooth, so far less noisy. The held-out vision tokens
are computed once (the ViT is frozen and shared: no delta changes them).

Codecs: ``fp16``; ``nf4`` (the paper's choice) and ``nf4_dq`` (double quantization); ``sparse``
at the cloud's settings (its defaults) and at 2 bits; ``sparse@1bit`` and ``sparse@0.5bit``:
``compress`` under a byte budget of 1 and 0.5 bit per parameter (container included), which
turns the sparse codec's knobs down until it fits, selecting by magnitude. ``sparse@1bit+refit``
is the payload the cloud actually sent at 1 bit: coordinates ranked by ``|delta| *
sqrt(Fisher)`` and selected globally, then retrained through the codec on the round's samples
(:mod:`cdcca_ros.core.refit`); ``sparse@1bit+refit:fisher_only`` is its starting point (the
selection without retraining). The refit trains further, so a control row trains the
uncompressed delta as many more AKD steps: what extra training alone does to the gain.

Real models, shapes only: the trainable set of BLIP-2 OPT-2.7B, LLaVA-1.5-7B and Qwen2-VL-2B
(LoRA rank 8 on the language model's attention and MLP projections, plus its norms and biases,
plus BLIP-2's query tokens), filled with values resampled per kind (LoRA A, LoRA B, norms,
biases, other) from the measured delta, normalised, so the codecs see LoRA-like statistics;
payload / the whole model in fp16.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cdcca_ros.bench.common import (
    EVAL_START,
    BenchContext,
    BenchResult,
    Target,
    device_uts_config,
    model_image_size,
    world_samples,
)

NAME = 'downlink'
DESCRIPTION = ('bits per updated parameter of each delta codec and the share of the AKD '
               'accuracy gain it keeps; payload / full model on real model shapes')
REFIT_ROW = 'sparse@1bit+refit'
TARGETS = (Target(f'codecs/{REFIT_ROW}/bits_per_param', '<=', 1.0, 'issue 5'),
           Target(f'codecs/{REFIT_ROW}/gain_retained', '>=', 0.99, 'issue 5'))
LORA_RANK = 8
EVAL_BATCH = 50
# The cloud's settings (CloudConfig's codec_params default: the codec's own defaults).
CODECS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    # name: (codec, knobs, byte budget in bits per parameter or None)
    'fp16': ('fp16', {}, None),
    'nf4': ('nf4', {}, None),
    'nf4_dq': ('nf4', {'double_quant': True}, None),
    'sparse': ('sparse', {}, None),
    'sparse_b2': ('sparse', {'bits': 2.0}, None),
    'sparse@1bit': ('sparse', {}, 1.0),
    'sparse@0.5bit': ('sparse', {}, 0.5),
}
RECOMMENDED = 'sparse'
# 5x the cloud node's 40 steps: one 40-step round on the bundled models halves the answer loss
# but moves greedy accuracy by ~2 points (a couple of dozen samples), below what a gain share
# can be measured on; 200 steps give ~+6 points.
AKD_STEPS = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--train-per-domain', type=int, default=None,
                        help='uplinked samples per drifted domain (default 64, quick 2)')
    parser.add_argument('--eval-per-domain', type=int, default=None,
                        help='held-out samples per drifted domain (default 300, quick 2)')
    parser.add_argument('--akd-steps', type=int, default=None,
                        help=f'AKD steps of the round (default {AKD_STEPS}, quick 2)')
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help='UTS stage-2 keep ratio of the uplinked samples (default: the '
                             'device node table)')
    parser.add_argument('--refit-steps', type=int, default=None,
                        help='refit steps of the 1-bit round (default: the cloud node table; '
                             'quick 3)')
    parser.add_argument('--real-layers', type=int, default=None,
                        help='layers of each real config actually encoded (default: all; '
                             'quick 1); the payload is scaled to all layers')


# --- real model shapes -----------------------------------------------------------------------
@dataclass(frozen=True)
class RealConfig:
    """Shapes of a published MLLM (from its released config), enough to count and to build
    the trainable set: a language model of ``layers`` identical blocks plus the rest."""

    name: str
    total_params: int                 # whole model (vision + bridge + LM)
    layers: int
    lora: tuple[tuple[str, int, int], ...]   # per layer: (module, in, out)
    norms_per_layer: int              # norm weight+bias values per layer
    biases_per_layer: int             # linear bias values per layer
    other: tuple[tuple[str, int], ...]      # outside the layers: (name, values)


def _vit(layers: int, h: int, m: int, tokens: int, patch_in: int, qkv_bias: bool = True) -> int:
    per = 4 * h * h + (3 * h if qkv_bias else 0) + h + 2 * h * m + m + h + 4 * h
    return layers * per + patch_in * h + h + tokens * h + 4 * h


def real_configs() -> list[RealConfig]:
    """BLIP-2 OPT-2.7B, LLaVA-1.5-7B, Qwen2-VL-2B (published configs)."""
    out = []
    # BLIP-2 OPT-2.7B: EVA ViT-g/14 (39 layers, 1408, MLP 6144, 257 tokens), Q-Former (12
    # BERT-base layers with a query FFN and cross-attention every 2nd layer, 32 queries),
    # OPT-2.7B (32 layers, 2560, FFN 10240, vocab 50272, tied head).
    vit = _vit(39, 1408, 6144, 257, 3 * 14 * 14)
    qf_layer = 4 * 768 * 768 + 4 * 768 + 2 * (2 * 768 * 3072 + 3072 + 768) + 6 * 768
    qf_cross = 2 * 768 * 768 + 2 * 1408 * 768 + 4 * 768 + 2 * 768
    qformer = 12 * qf_layer + 6 * qf_cross + 32 * 768 + 2 * 768
    h, f, n = 2560, 10240, 32
    opt_layer = 4 * (h * h + h) + h * f + f + f * h + h + 4 * h
    opt = n * opt_layer + 50272 * h + 2050 * h + 2 * h
    out.append(RealConfig(
        name='blip2-opt-2.7b', total_params=vit + qformer + 768 * h + h + opt, layers=n,
        lora=(('q_proj', h, h), ('k_proj', h, h), ('v_proj', h, h), ('out_proj', h, h),
              ('fc1', h, f), ('fc2', f, h)),
        norms_per_layer=4 * h, biases_per_layer=4 * h + f + h,
        other=(('final_layer_norm', 2 * h), ('query_tokens', 32 * 768))))
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 1024, MLP 4096, 577 tokens), 2-layer MLP
    # projector 1024 -> 4096 -> 4096, Vicuna-7B (Llama: 32 layers, 4096, MLP 11008, vocab
    # 32000, untied head, no biases).
    clip = _vit(24, 1024, 4096, 577, 3 * 14 * 14)
    proj = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    h, f, n = 4096, 11008, 32
    llama = n * (4 * h * h + 3 * h * f + 2 * h) + 2 * 32000 * h + h
    out.append(RealConfig(
        name='llava-1.5-7b', total_params=clip + proj + llama, layers=n,
        lora=(('q_proj', h, h), ('k_proj', h, h), ('v_proj', h, h), ('o_proj', h, h),
              ('gate_proj', h, f), ('up_proj', h, f), ('down_proj', f, h)),
        norms_per_layer=2 * h, biases_per_layer=0, other=(('norm', h),)))
    # Qwen2-VL-2B: ViT (32 layers, 1280, MLP 5120, conv3d patches 2x14x14) + patch merger to
    # 1536; Qwen2-1.5B LM (28 layers, 1536, MLP 8960, 12 heads / 2 KV heads of 128, q/k/v
    # biases, vocab 151936, tied head).
    qvit = 32 * (1280 * 3840 + 3840 + 1280 * 1280 + 1280 + 2 * 1280 * 5120 + 5120 + 1280
                 + 4 * 1280) + 3 * 2 * 14 * 14 * 1280
    merger = 2 * 1280 + 5120 * 5120 + 5120 + 5120 * 1536 + 1536
    h, f, n, kv = 1536, 8960, 28, 256
    qwen_layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    qwen = n * qwen_layer + 151936 * h + h
    out.append(RealConfig(
        name='qwen2-vl-2b', total_params=qvit + merger + qwen, layers=n,
        lora=(('q_proj', h, h), ('k_proj', h, kv), ('v_proj', h, kv), ('o_proj', h, h),
              ('gate_proj', h, f), ('up_proj', h, f), ('down_proj', f, h)),
        norms_per_layer=2 * h, biases_per_layer=h + 2 * kv, other=(('norm', h),)))
    return out


def _kind(name: str) -> str:
    if 'lora_A' in name:
        return 'lora_A'
    if 'lora_B' in name:
        return 'lora_B'
    if 'norm' in name:
        return 'norm'
    if name.endswith('bias'):
        return 'bias'
    return 'other'


def delta_pools(delta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The measured delta's values per kind, each divided by its kind's RMS."""
    pools: dict[str, list[np.ndarray]] = {}
    for name, t in delta.items():
        pools.setdefault(_kind(name), []).append(t.detach().float().reshape(-1).numpy())
    out = {}
    for kind, parts in pools.items():
        values = np.concatenate(parts).astype(np.float64)
        rms = math.sqrt(float(np.mean(values ** 2))) if values.size else 0.0
        if rms > 0:
            out[kind] = (values / rms).astype(np.float32)
    return out


def synthetic_delta(cfg: RealConfig, pools: dict[str, np.ndarray], layers: int,
                    rng: np.random.Generator) -> dict[str, Any]:
    """The trainable set of ``layers`` blocks of ``cfg`` (plus the rest), values resampled."""
    import torch

    def draw(kind: str, shape: tuple[int, ...]) -> Any:
        pool = pools.get(kind)
        if pool is None:  # a kind the measured delta lacks: borrow the LoRA B values
            pool = pools.get('lora_B', next(iter(pools.values())))
        values = rng.choice(pool, size=int(np.prod(shape)), replace=True)
        return torch.from_numpy(values.astype(np.float32)).reshape(shape)

    out: dict[str, Any] = {}
    for i in range(layers):
        for module, d_in, d_out in cfg.lora:
            out[f'layers.{i}.{module}.lora_A.default.weight'] = draw('lora_A', (LORA_RANK, d_in))
            out[f'layers.{i}.{module}.lora_B.default.weight'] = draw('lora_B',
                                                                     (d_out, LORA_RANK))
        out[f'layers.{i}.norms'] = draw('norm', (cfg.norms_per_layer,))
        if cfg.biases_per_layer:
            out[f'layers.{i}.bias'] = draw('bias', (cfg.biases_per_layer,))
    for name, size in cfg.other:
        out[name] = draw('norm' if 'norm' in name else 'other', (size,))
    return out


def _layer_params(cfg: RealConfig) -> int:
    return (sum(LORA_RANK * (d_in + d_out) for _, d_in, d_out in cfg.lora)
            + cfg.norms_per_layer + cfg.biases_per_layer)


def trainable_params(cfg: RealConfig) -> int:
    """Values in the trainable set of ``cfg`` (all layers)."""
    return cfg.layers * _layer_params(cfg) + sum(size for _, size in cfg.other)


# --- evaluation --------------------------------------------------------------------------------
class HeldOut:
    """Held-out samples with their vision tokens computed once (the ViT is frozen and shared,
    so a delta never changes them): greedy answers, VQA scores and the answer loss."""

    def __init__(self, model: Any, samples: Sequence[Any]) -> None:
        import torch

        self.samples = list(samples)
        with torch.no_grad():
            self.tokens = [model.vision_tokens([x.image for x in self.samples[s:s + EVAL_BATCH]])
                           for s in range(0, len(self.samples), EVAL_BATCH)]

    def _parts(self) -> list[tuple[Any, list[Any]]]:
        return [(tok, self.samples[i * EVAL_BATCH:(i + 1) * EVAL_BATCH])
                for i, tok in enumerate(self.tokens)]

    def answers(self, model: Any) -> list[str]:
        """Greedy answers of ``model``."""
        texts: list[str] = []
        for tokens, part in self._parts():
            texts += [r.text for r in model.answer_from_tokens(tokens, None,
                                                               [x.question for x in part])]
        return texts

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """VQA accuracy of each answer."""
        from cdcca_ros.sim.scoring import vqa_accuracy

        return np.asarray([vqa_accuracy(t, s.answers)
                           for t, s in zip(texts, self.samples, strict=True)])

    def loss(self, model: Any) -> float:
        """Mean cross-entropy of the canonical answers (teacher forced, eval mode): a smooth
        measure of what a delta taught, where greedy accuracy moves in whole samples."""
        import torch

        total = 0.0
        model.torch_model.eval()
        with torch.no_grad():
            for tokens, part in self._parts():
                out = model.forward_train(tokens, None, [x.question for x in part],
                                          [x.answer for x in part])
                total += float(out.loss) * len(part)
        return total / len(self.samples)


def _agreement(texts: Sequence[str], reference: Sequence[str]) -> float:
    return float(np.mean([a.strip() == b.strip() for a, b in zip(texts, reference, strict=True)]))


def gain_interval(codec: np.ndarray, full: np.ndarray, base: np.ndarray, seed: int,
                  rounds: int = 1000) -> tuple[float, float]:
    """Paired bootstrap 5-95% interval of ``mean(codec - base) / mean(full - base)``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, codec.size, size=(rounds, codec.size))
    num = (codec[idx] - base[idx]).mean(axis=1)
    den = (full[idx] - base[idx]).mean(axis=1)
    ok = den > 0
    if not ok.any():
        return math.nan, math.nan
    values = num[ok] / den[ok]
    return float(np.percentile(values, 5)), float(np.percentile(values, 95))


def _uplink(model: Any, samples: Sequence[Any], cfg: Any) -> list[tuple[Any, Any, str]]:
    """What the device sends for each sample: (kept tokens as the cloud decodes them, kept
    indices, question), through UTS stage 2 and the packing of ``cfg``."""
    import torch

    from cdcca_ros.core.uts import pack_tokens, select_tokens, token_variance, unpack_tokens

    space = model.vision_space()
    out = []
    for s in range(0, len(samples), EVAL_BATCH):
        part = samples[s:s + EVAL_BATCH]
        tokens = model.vision_tokens([x.image for x in part])
        for x, tok in zip(part, tokens, strict=True):
            with torch.no_grad():
                feats = model.mc_token_features(tok[None], cfg.dropout_p, cfg.mc_masks)
            kept = select_tokens(token_variance(feats)[0], mode=cfg.stage2_mode,
                                 beta=cfg.beta, keep_ratio=cfg.keep_ratio,
                                 min_keep=cfg.min_keep,
                                 always_keep_cls=cfg.always_keep_cls and space.has_cls)
            packed = pack_tokens(tok.detach().cpu()[kept], cfg.pack_dtype)
            out.append((unpack_tokens(packed), kept, x.question))
    return out


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    import torch

    from cdcca_ros.core import dwc
    from cdcca_ros.core.akd import AKDConfig, AkdSample, AKDTrainer
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
    from cdcca_ros.core.refit import RefitConfig
    from cdcca_ros.core.rounds.config import GuardConfig
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.errors import PayloadTooLargeError
    from cdcca_ros.nodes.tables import defaults
    from cdcca_ros.sim.domains import DRIFTED

    n_train = ctx.args.train_per_domain or (2 if ctx.quick else 64)
    n_eval = ctx.args.eval_per_domain or (2 if ctx.quick else 300)
    cloud_params = defaults('cloud_node')
    steps = ctx.args.akd_steps or (2 if ctx.quick else AKD_STEPS)
    batch = 4 if ctx.quick else cloud_params['akd.batch_size']
    akd = AKDConfig.from_params(cloud_params, steps=steps, batch_size=batch, seed=ctx.seed)
    refit_steps = (ctx.args.refit_steps if ctx.args.refit_steps is not None
                   else (3 if ctx.quick else cloud_params['dwc.refit_steps']))
    refit_cfg = RefitConfig(steps=refit_steps, batch_size=batch,
                            fisher_batches=2 if ctx.quick else RefitConfig.fisher_batches,
                            seed=ctx.seed)
    torch.manual_seed(ctx.seed)

    # The device: what it uplinks, and its base for evaluation.
    device_model = ctx.models.student()
    base = device_model.trainable_state_dict()
    n_params = dwc.num_params(base)
    image_size = model_image_size(device_model)
    train = world_samples(ctx.seed, DRIFTED, n_train, image_size)
    uts = (device_uts_config() if ctx.args.keep_ratio is None
           else device_uts_config(keep_ratio=ctx.args.keep_ratio))
    uplinked = _uplink(device_model, train, uts)

    # The cloud: one round at a budget of 1 bit per trainable value, as the cloud node runs
    # it (codec, compact payload, refit). Its continuing copy (``trained``) is the
    # uncompressed AKD result, which every other codec row encodes.
    budget_1bit = max(64, n_params // 8)
    private, _ = generate_keypair()
    teacher = ctx.models.teacher()
    cloud = CloudRuntime(teacher, ctx.models.student(), private, CloudConfig(
        min_samples=len(uplinked), akd=akd, codec='sparse', budget_bytes=budget_1bit,
        refit=refit_cfg, refit_min_error=0.0, guard=GuardConfig.plain(akd.steps)))
    space = cloud.space
    for tokens, kept, question in uplinked:
        cloud.add_sample('robot1', tokens, kept, question, space.num_tokens, space.dim)
    round_result = cloud.run_round('robot1')
    if round_result is None:
        raise RuntimeError('the AKD round learnt nothing (every pseudo-label was empty)')
    trained = cloud.device('robot1').trained
    delta = dwc.compute_delta(trained, cloud.base)
    refit = round_result.refit
    sent = dwc.decode_payload(round_result.envelope.payload, spec=base)

    # Control: the uncompressed delta trained for as many more AKD steps as the refit took
    # (fresh optimiser, same samples), i.e. what the refit's extra training alone buys.
    samples = [AkdSample(tokens=t.float(), indices=k, question=q) for t, k, q in uplinked]
    cloud.student.load_trainable_state_dict(trained)
    control_trainer = AKDTrainer(teacher, cloud.student, dataclasses.replace(
        akd, steps=max(1, refit_steps), seed=ctx.seed + 1), progress=False)
    control_trainer.fit(control_trainer.label(samples))
    control_delta = dwc.compute_delta(cloud.student.trainable_state_dict(), cloud.base)

    # Held-out drifted samples: teacher, base, uncompressed, then each codec.
    held_out = HeldOut(device_model, world_samples(ctx.seed, DRIFTED, n_eval, image_size,
                                                   start=EVAL_START))
    teacher_texts = held_out.answers(teacher)
    teacher_accuracy = float(held_out.scores(teacher_texts).mean())

    def evaluate(decoded: dict[str, Any] | None) -> tuple[np.ndarray, list[str], float]:
        weights = base if decoded is None else dwc.apply_delta(base, decoded)
        device_model.load_trainable_state_dict(weights)
        texts = held_out.answers(device_model)
        return held_out.scores(texts), texts, held_out.loss(device_model)

    scores_base, texts_base, loss_base = evaluate(None)
    scores_full, texts_full, loss_full = evaluate(delta)
    agree_base = _agreement(texts_base, teacher_texts)
    agree_full = _agreement(texts_full, teacher_texts)
    acc_base, acc_full = float(scores_base.mean()), float(scores_full.mean())
    gain = acc_full - acc_base
    gain_agree = agree_full - agree_base
    gain_loss = loss_base - loss_full
    min_gain = 1.0 / len(held_out.samples)

    def row(decoded: dict[str, Any], stats: Any, budget: int | None) -> dict[str, Any]:
        scores, texts, loss = evaluate(decoded)
        acc = float(scores.mean())
        agree = _agreement(texts, teacher_texts)
        return {
            'bits_per_param': stats.bits_per_param,
            'gain_retained': (acc - acc_base) / gain if gain >= min_gain else None,
            'gain_retained_interval': (gain_interval(scores, scores_full, scores_base, ctx.seed)
                                       if gain >= min_gain else None),
            'gain_retained_loss': (loss_base - loss) / gain_loss if gain_loss > 0 else None,
            'gain_retained_agreement': ((agree - agree_base) / gain_agree
                                        if gain_agree >= min_gain else None),
            'uncompressed_agreement': _agreement(texts, texts_full),
            'accuracy': acc, 'teacher_agreement': agree, 'answer_loss': loss,
            'bytes': stats.nbytes,
            'rel_l2_error': stats.rel_l2_error, 'nonzero_fraction': stats.nonzero_fraction,
            'encode_ms': stats.encode_ms, 'codec': stats.codec,
            'budget_bytes': budget,
        }

    codecs: dict[str, dict[str, Any]] = {}
    for name, (codec_name, knobs, budget_bits) in CODECS.items():
        codec = dwc.get_codec(codec_name, **knobs)
        budget = None if budget_bits is None else max(64, int(n_params * budget_bits / 8))
        try:
            compressed = dwc.compress(delta, codec, budget, self_describing=False)
        except PayloadTooLargeError as err:
            codecs[name] = {'bits_per_param': None, 'gain_retained': None, 'error': str(err)}
            continue
        codecs[name] = row(compressed.decoded, compressed.stats, budget)
    if refit is not None:
        # Fisher selection alone (the refit's starting point), then what the cloud sent.
        codecs[f'{REFIT_ROW}:fisher_only'] = row(refit.initial.decoded, refit.initial.stats,
                                                 budget_1bit)
    codecs[REFIT_ROW] = row(sent, round_result.stats, budget_1bit)
    codecs[REFIT_ROW].update(
        refit_used=refit is not None and refit.used,
        refit_objective=([refit.objective_before, refit.objective_after]
                         if refit is not None else None),
        refit_s=refit.seconds if refit is not None else None)
    control_scores, control_texts, control_loss = evaluate(control_delta)
    control = {
        'steps': refit_steps, 'accuracy': float(control_scores.mean()),
        'answer_loss': control_loss,
        'gain_retained': ((float(control_scores.mean()) - acc_base) / gain
                          if gain >= min_gain else None),
        'gain_retained_loss': (loss_base - control_loss) / gain_loss if gain_loss > 0 else None,
        'uncompressed_agreement': _agreement(control_texts, texts_full)}

    # What a payload costs before any value: the compact container and the per-tensor side
    # data, measured on an all-zero delta.
    zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
    overhead = {name: len(dwc.get_codec(CODECS[name][0], **CODECS[name][1]).encode(
        zeros, self_describing=False)) for name in ('fp16', 'nf4', 'sparse')}
    overhead['fp16'] -= 2 * n_params  # fp16 stores every value, zero or not
    overhead['nf4'] -= n_params // 2 + 4 * sum(-(-v.numel() // 64) for v in delta.values())
    overhead['sparse_self_describing'] = len(dwc.get_codec('sparse').encode(zeros))
    decode_ms = _decode_ms(round_result.envelope.payload, base)

    # Real model shapes.
    pools = delta_pools(delta)
    rng = np.random.default_rng(ctx.seed)
    real: dict[str, dict[str, Any]] = {}
    payload_ratio: dict[str, float] = {}
    for cfg in real_configs():
        layers = min(cfg.layers, ctx.args.real_layers or (1 if ctx.quick else cfg.layers))
        synth = synthetic_delta(cfg, pools, layers, rng)
        encoded = dwc.num_params(synth)
        full_trainable = trainable_params(cfg)
        real_row: dict[str, Any] = {'total_params': cfg.total_params,
                                    'full_model_fp16_bytes': 2 * cfg.total_params,
                                    'trainable_params': full_trainable,
                                    'layers_encoded': layers, 'lora_rank': LORA_RANK,
                                    'codecs': {}}
        for name in ('fp16', 'nf4', 'sparse', 'sparse@1bit'):
            codec_name, knobs, budget_bits = CODECS[name]
            budget = None if budget_bits is None else int(encoded * budget_bits / 8)
            try:
                compressed = dwc.compress(synth, dwc.get_codec(codec_name, **knobs), budget,
                                          self_describing=False)
            except PayloadTooLargeError as err:
                real_row['codecs'][name] = {'error': str(err)}
                continue
            codec, nbytes = compressed.codec, compressed.stats.nbytes
            # Scale to all layers (the compact container is a few dozen bytes either way).
            scaled = nbytes * full_trainable / encoded
            real_row['codecs'][name] = {'knobs': codec.describe(),
                                        'bits_per_param': 8.0 * nbytes / encoded,
                                        'payload_bytes': scaled,
                                        'payload_over_full_model': scaled / (2 * cfg.total_params)}
        real[cfg.name] = real_row
        payload_ratio[cfg.name] = real_row['codecs'][RECOMMENDED].get('payload_over_full_model')
        del synth

    summary_keys = ('bits_per_param', 'gain_retained', 'gain_retained_interval',
                    'gain_retained_loss', 'uncompressed_agreement', 'accuracy', 'rel_l2_error')
    summary = {
        'codecs': {k: {kk: v.get(kk) for kk in summary_keys} for k, v in codecs.items()},
        'refit_control': control,
        'payload_over_full_model': payload_ratio,
        'payload_over_full_model_1bit': {
            k: v['codecs']['sparse@1bit'].get('payload_over_full_model') for k, v in real.items()},
        'accuracy_base': acc_base,
        'accuracy_uncompressed': acc_full,
        'gain': gain,
        'answer_loss_base': loss_base,
        'answer_loss_uncompressed': loss_full,
        'recommended_codec': RECOMMENDED,
        'trainable_params': n_params,
        'container_overhead_bytes': overhead['sparse'],
        'decode_ms': decode_ms,
    }

    def interval(v: dict[str, Any]) -> str:
        lo_hi = v.get('gain_retained_interval')
        return '-' if not lo_hi else f'{lo_hi[0]:.2f}..{lo_hi[1]:.2f}'

    rows: list[list[Any]] = [
        ['base (no delta)', None, None, acc_base, agree_base, None, None, None, None],
        ['uncompressed (float32)', 32.0, 0.0, acc_full, agree_full, 1.0, '-', 1.0, 1.0]]
    rows += [[f'{k}: {v.get("codec", "-")}', v.get('bits_per_param'), v.get('rel_l2_error'),
              v.get('accuracy'), v.get('teacher_agreement'), v.get('gain_retained'),
              interval(v), v.get('gain_retained_loss'), v.get('uncompressed_agreement')]
             for k, v in codecs.items()]
    rows.append([f'control: uncompressed + {refit_steps} more AKD steps', 32.0, None,
                 control['accuracy'], None, control['gain_retained'], '-',
                 control['gain_retained_loss'], control['uncompressed_agreement']])
    for name, real_row in real.items():
        for cname, c in real_row['codecs'].items():
            if 'error' in c:
                continue
            rows.append([f'{name} {cname}', c['bits_per_param'], None,
                         f'{c["payload_bytes"] / 2**20:.2f} MiB', None,
                         f'{c["payload_over_full_model"]:.2e} of model', None, None, None])
    detail = {
        'codecs': codecs,
        'refit_control': control,
        'real_models': real,
        'round': {'samples': round_result.samples, 'akd': asdict(akd),
                  'loss_first': round_result.losses[0] if round_result.losses else None,
                  'loss_last': round_result.losses[-1] if round_result.losses else None,
                  'agreement_before': round_result.agreement_before,
                  'agreement_after': round_result.agreement_after,
                  'train_s': round_result.train_s, 'refit': asdict(refit_cfg),
                  'refit_history': refit.history if refit is not None else None},
        'eval': {'domains': list(DRIFTED), 'per_domain': n_eval, 'start': EVAL_START,
                 'image_size': image_size, 'teacher_accuracy': teacher_accuracy,
                 'gain_teacher_agreement': gain_agree, 'gain_answer_loss': gain_loss},
        'uplink': {'per_domain': n_train, 'uts': asdict(uts),
                   'kept_tokens_mean': float(np.mean([k.numel() for _, k, _ in uplinked]))},
        'delta_kinds': {k: int(v.size) for k, v in pools.items()},
        'container_overhead_bytes': overhead,
        'decode_ms': decode_ms,
        'tensors': len(delta),
    }
    refit_row = codecs[REFIT_ROW]
    notes = [
        f'one AKD round on {round_result.samples} uplinked drifted samples (UTS keep ratio '
        f'{uts.keep_ratio:g}, {uts.pack_dtype}; {steps} steps, '
        f'batch {batch}, lr {akd.lr:g}); {n_params} trainable values',
        f'held-out drifted accuracy: base {acc_base:.1%}, after the uncompressed delta '
        f'{acc_full:.1%} (teacher {teacher_accuracy:.1%}), {len(held_out.samples)} samples; '
        f'answer loss {loss_base:.3f} -> {loss_full:.3f}',
        f'payloads are compact, as the cloud sends them (no tensor index: the device decodes '
        f'with its trainable set); fixed cost of a sparse payload: {overhead["sparse"]} B '
        f'({8 * overhead["sparse"] / n_params:.3f} bit/param over {len(delta)} tensors; '
        f'{overhead["sparse_self_describing"]} B self-describing); decoding the 1-bit payload '
        f'takes {decode_ms:.2f} ms (median)',
        f'{REFIT_ROW}: the cloud\'s own round at a budget of 1 bit per trainable value '
        f'({budget_1bit} B): coordinates ranked by |delta| x sqrt(Fisher) and selected '
        f'globally, then {refit_steps} steps retraining the kept coordinates through the codec '
        '(straight-through; AKD loss + match to the uncompressed student), compressed again '
        f'under the budget ({refit_row.get("refit_s") or 0:.1f} s); ":fisher_only" is its '
        'starting point; "sparse@1bit" compresses the uncompressed delta by magnitude alone',
        f'control: the uncompressed delta trained {refit_steps} more AKD steps on the same '
        f'samples keeps {_fmt(control["gain_retained"])} of the gain '
        f'({_fmt(control["gain_retained_loss"])} loss-based): the refit\'s extra training '
        'alone moves accuracy by that much',
        'gain kept = share of the accuracy gain (None when the round gained less than one '
        'sample\'s worth), with its paired-bootstrap 5-95% interval; loss-based = share of the '
        'drop in the canonical answers\' cross-entropy (smooth, far less noisy); last column: '
        'share of held-out answers equal to the uncompressed delta\'s',
        f'real models: LoRA r={LORA_RANK} on the LM attention + MLP, LM norms and biases '
        '(+ BLIP-2 query tokens); values resampled from this delta per kind, encoded by '
        'the same codecs (1-bit row: compress under a budget of 1 bit/param, no refit: '
        'shapes only, no model)',
    ]
    return BenchResult(summary=summary,
                       headers=['codec', 'bit/param', 'rel L2 err', 'accuracy',
                                'teacher agr.', 'gain kept', '5-95%', 'loss-based',
                                'agr. uncompr.'],
                       rows=rows, detail=detail, notes=notes)


def _fmt(x: float | None) -> str:
    return '-' if x is None else f'{x:.2f}'


def _decode_ms(payload: bytes, spec: dict[str, Any], repeats: int = 50) -> float:
    """Median time of decoding a compact payload, as the device gate does."""
    import time

    from cdcca_ros.core import dwc

    codec = dwc.get_codec(dwc.read_payload_codec(payload))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        codec.decode(payload, spec=spec)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))
