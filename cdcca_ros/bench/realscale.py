"""Real scale (issue 15): the three model families at their real sizes, and the uplink there.

``python -m cdcca_ros.bench realscale --out FILE.json [--families blip2,llava,qwen2_vl]
[--device cpu|cuda]``

Per family, a real-size student with random weights (BLIP-2 OPT-2.7B, LLaVA-1.5-7B,
Qwen2-VL-2B; :mod:`cdcca_ros.models.real`: the hub's configurations, loaded through the same
path as a downloaded model) and its real trainable set (the paper's kinds and size, declared
by the configuration: LoRA r 1 on the language model's q_proj / v_proj, norms, biases, BLIP-2's
query tokens; 1.57 M values for BLIP-2), each in a process of its own
(:mod:`.realscale_family`): answer latency and peak memory, UTS per answer, uplink bytes per
selected sample against the frame's JPEG q90 at 640x480 and 1920x1080 and the reconstruction
error of what the teacher consumes, DWC payloads, hot-apply and answers lost, one cloud round
per sample. Shapes are real; accuracy at real size needs real weights and is not claimed.

On the bundled models, in this process:

* teacher agreement of the uplink (answers from what is sent vs from all exact tokens, Wilson
  interval): the device's default uplink as the node builds it (``basis``: the shared token
  basis shipped with the bundled student, decoded as the cloud decodes it), its ``ecq``
  fallback and the image mode;
* the DWC operating point: one AKD round (200 steps), then the cloud's refit at several bit
  budgets; the smallest at which, on held-out drifted samples, both the VQA accuracy gain kept
  (5% bound of a paired bootstrap interval) and the answer loss's reduction kept are >= 0.99
  is the setting the real-size payloads are measured at, and the measured delta's values (per
  kind) fill the real-size trainable sets.

``--parts`` measures only some of it (``uplink``, ``dwc``, ``families``), the rest taken from
``--bundled-from`` / ``--records-from``: ``--parts dwc`` with ``--records-from`` re-measures the
operating point and, on the meta device, every family's DWC payloads (minutes, not hours).

Where a model does not fit the machine's memory (weights plus a margin against ``MemAvailable``)
its language model is cut to the largest layer count that fits, and the record says so; on a
GPU all run in bf16 and, through bitsandbytes, 4-bit and 8-bit. CPU defaults (3 timed samples
+1 warm-up, 8 fit frames, bf16) took 86 min on the 2-core development machine under load
(bundled parts ~45 min of it). ``--bundled-from`` and ``--records-from`` take the bundled parts
and families of an earlier run, so one family can be measured again alone.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    device_params,
    device_uts_config,
    fmt,
    world_samples,
)

NAME = 'realscale'
DESCRIPTION = ('real-size BLIP-2 / LLaVA-1.5 / Qwen2-VL students: answer latency and memory, '
               'UTS, uplink vs JPEG, DWC, hot-apply, one cloud round')
FAMILIES = ('blip2', 'llava', 'qwen2_vl')
PAPER_DWC_BYTES = 791_000
TARGETS = (
    Target('families/blip2/uplink_over_jpeg_640', '<=', 0.03, 'issue 15'),
    Target('families/llava/uplink_over_jpeg_640', '<=', 0.03, 'issue 15'),
    Target('bundled_teacher_agreement', '>=', 0.95, 'issue 15'),
    Target('families/blip2/dwc_bytes_min', '<=', 400_000, 'issue 15'),
    *(t for f in FAMILIES for t in (
        Target(f'families/{f}/uts_over_answer', '<=', 0.10, 'issue 15'),
        Target(f'families/{f}/apply_over_answer', '<=', 0.5, 'issue 15'),
        Target(f'families/{f}/answers_lost', '==', 0, 'issue 15'))),
)
GAIN_KEPT = 0.99
PARTS = ('uplink', 'dwc', 'families')
MEMORY_MARGIN = 1.35        # weights x this + 2 GiB: activations, shadow trainable set, buffers
MEMORY_SLACK = 2 << 30
SUMMARY_KEYS = ('params', 'answer_ms', 'peak_rss_mb', 'uts_over_answer',
                'uplink_bytes_per_sample', 'uplink_over_jpeg_640', 'uplink_over_jpeg_1080',
                'dwc_bytes_4bit', 'dwc_bytes_min', 'apply_over_answer', 'answers_lost',
                'round_s_per_sample')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--families', default=','.join(FAMILIES),
                        help='comma-separated families (empty: the bundled parts only)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--dtypes', default=None,
                        help='dtypes per family (default cpu: bfloat16; cuda: '
                             'bfloat16,8bit,4bit); the first gives the summary figures')
    parser.add_argument('--samples', type=int, default=None,
                        help='timed samples per family (default 3, quick 1)')
    parser.add_argument('--fit-frames', type=int, default=None,
                        help='source frames the token basis is fitted on (default 8, quick 2)')
    parser.add_argument('--budget', type=int, default=512,
                        help='basis packing: payload budget of one sample at real size')
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help='stage-2 keep ratio of the real-size uplink (default: the device '
                             'node\'s uts.basis_keep_ratio)')
    parser.add_argument('--budget-sweep', default='256,1024,4096,16384')
    parser.add_argument('--keep-sweep', default='0.25,1.0')
    parser.add_argument('--bundled-per-domain', type=int, default=None,
                        help='bundled uplink samples per domain (default 40, quick 2)')
    parser.add_argument('--dwc-bits', default=None,
                        help='refit budgets (bit/param) tried on the bundled models (default '
                             '2,1.5,1,0.5,0.25; quick 1)')
    parser.add_argument('--parts', default=None,
                        help='comma-separated parts to measure: uplink (bundled agreement), '
                             'dwc (bundled operating point; with --records-from and without '
                             'families also the families\' DWC payloads, on the meta device), '
                             'families (the real-size measurements); default all (only '
                             'families with --bundled-from). Parts not measured come from '
                             '--bundled-from / --records-from')
    parser.add_argument('--dwc-eval-per-domain', type=int, default=None,
                        help='held-out samples per drifted domain of the DWC operating point '
                             '(default 150, quick 2)')
    parser.add_argument('--bundled-from', type=Path, default=None,
                        help='take the bundled uplink agreement and DWC operating point from '
                             'an earlier run\'s JSON (same seed and models) instead of '
                             'measuring them again')
    parser.add_argument('--records-from', type=Path, default=None,
                        help='families not measured in this run are taken from an earlier '
                             'run\'s JSON (its records)')
    parser.add_argument('--refit-steps', type=int, default=None,
                        help="the cloud's refit steps on the bundled models (default: "
                             'cloud_node dwc.refit_steps)')
    parser.add_argument('--applies', type=int, default=2, help='sequential hot-applies')
    parser.add_argument('--models', default='',
                        help='family=spec overrides (tests: tiny models)')
    parser.add_argument('--memory-gb', type=float, default=None,
                        help='memory to plan with (default: MemAvailable)')


# --- bundled: uplink agreement ---------------------------------------------------------------
def bundled_uplink(ctx: BenchContext, per_domain: int) -> dict[str, Any]:
    """Teacher agreement (vs all exact tokens) and bytes of the device's default uplink (built
    as the node builds it, decoded as the cloud decodes it), the ``ecq`` packing (the default's
    fallback for a model without a token basis) and the image mode on the bundled models."""
    import torch

    from cdcca_ros.bench.common import cloud_token_basis, device_uplink
    from cdcca_ros.core.uplink.image import decode_jpeg
    from cdcca_ros.core.uplink.pipeline import BASIS, UplinkPipeline, decode_tokens
    from cdcca_ros.core.uts import UtsPipeline, unpack_tokens
    from cdcca_ros.sim.domains import DRIFTED, SOURCE
    from cdcca_ros.sim.scoring import vqa_accuracy

    student, teacher = ctx.models.student(), ctx.models.teacher()
    space = student.vision_space()
    spec = ctx.models.spec('student')
    # Audit samples (sent whole, drawn at random) are not what UTS keeps: none here.
    fixed = {'stage1_threshold': 0.0, 'audit_fraction': 0.0}
    default = device_uplink(spec, space, student.mc_token_features, **fixed)
    basis = cloud_token_basis(spec, space)
    ecq_cfg = device_uts_config(pack_dtype='ecq', **fixed)
    ecq = UtsPipeline(ecq_cfg, student.mc_token_features, has_cls=space.has_cls)
    image = UplinkPipeline(ecq_cfg, student.mc_token_features, mode='image')
    samples = world_samples(ctx.seed, (SOURCE,) + DRIFTED, per_domain, (640, 480))

    def text(tokens: Any, idx: Any, question: str) -> str:
        return teacher.answer_from_tokens(tokens.float()[None],
                                          None if idx is None else idx[None], [question])[0].text

    rec: dict[str, list[float]] = {k: [] for k in (
        'default_agree', 'default_bytes', 'ecq_agree', 'ecq_bytes', 'image_agree',
        'image_bytes', 'exact_acc', 'default_acc', 'ecq_acc', 'image_acc')}
    for s in samples:
        with torch.no_grad():
            tokens = student.vision_tokens([s.image])[0]
            probs = student.answer_from_tokens(tokens[None], None, [s.question])[0].step_probs
        exact = text(tokens, None, s.question)
        rec['exact_acc'].append(vqa_accuracy(exact, s.answers))
        up = default.process(probs, tokens)
        packed = up.uts.packed
        if packed.dtype == BASIS:
            dec, idx = decode_tokens(BASIS, packed.data, list(packed.scale), [],
                                     tokens.shape[0], tokens.shape[1], up.basis_version, basis)
        else:
            dec, idx = unpack_tokens(packed), up.uts.kept_indices
        got = text(dec, idx, s.question)
        rec['default_agree'].append(float(got == exact))
        rec['default_acc'].append(vqa_accuracy(got, s.answers))
        rec['default_bytes'].append(up.uplink_bytes)
        r = ecq.process(probs, tokens)
        got = text(unpack_tokens(r.packed), r.kept_indices, s.question)
        rec['ecq_agree'].append(float(got == exact))
        rec['ecq_acc'].append(vqa_accuracy(got, s.answers))
        rec['ecq_bytes'].append(r.uplink_bytes)
        up = image.process(probs, tokens, s.image)
        with torch.no_grad():
            cloud_tokens = student.vision_tokens([decode_jpeg(up.image)])[0]
        got = text(cloud_tokens, None, s.question)
        rec['image_agree'].append(float(got == exact))
        rec['image_acc'].append(vqa_accuracy(got, s.answers))
        rec['image_bytes'].append(up.uplink_bytes)
    out: dict[str, Any] = {k: float(np.mean(v)) if v else None for k, v in rec.items()}
    cfg = default.uts.cfg
    out.update(samples=len(samples),
               default_interval=list(_wilson(sum(rec['default_agree']), len(samples))),
               default=(f'{default.packing}'
                        + (f' {default.basis.version}, budget {default.budget_bytes} B'
                           if default.basis is not None else '')
                        + f', keep {cfg.keep_ratio:g}'),
               ecq=f'ecq, keep {ecq_cfg.keep_ratio:g}')
    return out


# --- bundled: DWC operating point ------------------------------------------------------------
def default_uplinked(model: Any, spec: str, samples: list[Any]) -> list[tuple[Any, Any, str]]:
    """What the device's default uplink (:func:`device_uplink`, stage 1 and audit off: every
    sample through stage 2) delivers of each sample, decoded as the cloud decodes it:
    ``(tokens, kept indices, question)``."""
    import torch

    from cdcca_ros.bench.common import cloud_token_basis, device_uplink
    from cdcca_ros.core.uplink.pipeline import BASIS, decode_tokens
    from cdcca_ros.core.uts import unpack_tokens

    space = model.vision_space()
    pipe = device_uplink(spec, space, model.mc_token_features, stage1_threshold=0.0,
                         audit_fraction=0.0)
    basis = cloud_token_basis(spec, space)
    out = []
    for s in samples:
        with torch.no_grad():
            tokens = model.vision_tokens([s.image])[0]
            probs = model.answer_from_tokens(tokens[None], None, [s.question])[0].step_probs
        up = pipe.process(probs, tokens)
        packed = up.uts.packed
        if packed.dtype == BASIS:
            dec, idx = decode_tokens(BASIS, packed.data, list(packed.scale), [],
                                     space.num_tokens, space.dim, up.basis_version, basis)
        else:
            dec, idx = unpack_tokens(packed), up.uts.kept_indices
        out.append((dec, idx, s.question))
    return out


def _wilson(hits: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``hits / n``."""
    if n <= 0:
        return math.nan, math.nan
    p = hits / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bundled_dwc(ctx: BenchContext, bits_list: list[float], pools_path: Path,
                refit: bool = True) -> dict[str, Any]:
    """One AKD round on the bundled models (on what the default uplink delivers of 64 drifted
    samples per domain), the refit at each bit budget, the gain each keeps;
    writes the measured delta's per-kind values to ``pools_path``. Without ``refit`` only the
    round and the pools (the operating point comes from an earlier run).

    The gain kept is measured on held-out drifted samples as the issue states it, in VQA
    accuracy: ``(acc(compressed) - acc(base)) / (acc(uncompressed) - acc(base))`` with a paired
    bootstrap 5-95% interval, with the greedy answers equal to the uncompressed delta's (Wilson
    95% interval) and the answer loss's reduction kept beside it. The refit trains through the
    codec on the round's task loss, so a compressed delta may answer better than the
    uncompressed one (accuracy gain kept > 1); the operating point is therefore the smallest
    budget at which both the accuracy gain's 5% bound and the loss reduction kept are
    >= ``GAIN_KEPT``.
    """
    import torch

    from cdcca_ros.bench.common import EVAL_START, model_image_size
    from cdcca_ros.bench.downlink import AKD_STEPS, HeldOut, delta_pools, gain_interval
    from cdcca_ros.core import dwc
    from cdcca_ros.core.akd import AKDConfig, AkdSample, AKDTrainer
    from cdcca_ros.core.refit import RefitConfig, akd_task_loss, refit_compress
    from cdcca_ros.nodes.tables import defaults
    from cdcca_ros.sim.domains import DRIFTED

    quick = ctx.quick
    cloud = defaults('cloud_node')
    batch = 4 if quick else cloud['akd.batch_size']
    akd = AKDConfig.from_params(cloud, steps=2 if quick else AKD_STEPS, batch_size=batch,
                                seed=ctx.seed)
    torch.manual_seed(ctx.seed)
    device = ctx.models.student()
    base = device.trainable_state_dict()
    n_params = dwc.num_params(base)
    size = model_image_size(device)
    uplinked = default_uplinked(device, ctx.models.spec('student'),
                                world_samples(ctx.seed, DRIFTED, 2 if quick else 64, size))
    student = ctx.models.student()
    trainer = AKDTrainer(ctx.models.teacher(), student, akd)
    labelled = trainer.label([AkdSample(tokens=t.float(), indices=k, question=q)
                              for t, k, q in uplinked])
    trainer.fit(labelled)
    trained = student.trainable_state_dict()
    delta = dwc.compute_delta(trained, base)
    np.savez(pools_path, **delta_pools(delta))
    if not refit:
        return {'trainable_params': n_params}
    per_domain = getattr(ctx.args, 'dwc_eval_per_domain', None) or (2 if quick else 150)
    held = HeldOut(device, world_samples(ctx.seed, DRIFTED, per_domain, size,
                                         start=EVAL_START))

    def evaluate(d: dict[str, Any] | None) -> tuple[float, np.ndarray, list[str]]:
        device.load_trainable_state_dict(base if d is None else dwc.apply_delta(base, d))
        texts = held.answers(device)
        return held.loss(device), held.scores(texts), texts

    loss_base, acc_base, _ = evaluate(None)
    loss_full, acc_full, texts_full = evaluate(delta)
    gain = float(acc_full.mean() - acc_base.mean())
    steps = getattr(ctx.args, 'refit_steps', None) or cloud['dwc.refit_steps']
    refit_cfg = RefitConfig(steps=3 if quick else steps, batch_size=batch,
                            fisher_batches=2 if quick else RefitConfig.fisher_batches,
                            seed=ctx.seed)
    rows = {}
    for bits in bits_list:
        budget = max(64, int(n_params * bits / 8))
        result = refit_compress(student, labelled, base, delta, dwc.get_codec('sparse'),
                                budget, refit_cfg, task_loss=akd_task_loss(trainer))
        student.load_trainable_state_dict(trained)
        loss_c, acc_c, texts_c = evaluate(result.compressed.decoded)
        same = sum(a.strip() == b.strip() for a, b in zip(texts_c, texts_full, strict=True))
        rows[f'{bits:g}'] = {
            'bits': bits, 'bytes': result.compressed.stats.nbytes,
            'bits_per_param': result.compressed.stats.bits_per_param,
            'accuracy': float(acc_c.mean()),
            'gain_kept': (float(acc_c.mean() - acc_base.mean()) / gain if gain > 0 else None),
            'gain_kept_interval': (list(gain_interval(acc_c, acc_full, acc_base, ctx.seed))
                                   if gain > 0 else None),
            'answers_as_uncompressed': same / len(texts_c),
            'answers_as_uncompressed_interval': list(_wilson(same, len(texts_c))),
            'gain_kept_loss': ((loss_base - loss_c) / (loss_base - loss_full)
                               if loss_base > loss_full else None)}
    for r in rows.values():
        # Kept both ways: the accuracy gain's lower bound (the refit trains on the round's
        # task loss, so a compressed delta can answer better than the uncompressed one: the
        # point estimate alone flatters it) and the answer loss's reduction.
        parts = [r['gain_kept_interval'][0] if r['gain_kept_interval'] else None,
                 r['gain_kept_loss']]
        r['gain_kept_worst'] = (min(parts) if all(v is not None and math.isfinite(v)
                                                  for v in parts) else None)
    ok = [r['bits'] for r in rows.values()
          if r['gain_kept_worst'] is not None and r['gain_kept_worst'] >= GAIN_KEPT]
    chosen = min(ok) if ok else max(bits_list)
    return {'trainable_params': n_params, 'refit_steps': refit_cfg.steps,
            'held_out': len(held.samples), 'accuracy_base': float(acc_base.mean()),
            'accuracy_trained': float(acc_full.mean()), 'answer_loss_base': loss_base,
            'answer_loss_trained': loss_full, 'refit': rows, 'bits_at_gain': chosen,
            'gain_measure': ('the lower of: VQA accuracy gain kept (5% bound of its paired '
                             'bootstrap interval) and answer-loss reduction kept, held-out '
                             'drifted samples'),
            'gain_target': GAIN_KEPT, 'met': bool(ok)}


# --- families ----------------------------------------------------------------------------------
def _plan_layers(spec: str, dtype: str, memory: float) -> int | None:
    """None when ``spec`` fits ``memory`` bytes in ``dtype``; else the LM layer count that
    does (a real configuration only)."""
    from cdcca_ros.models.real import DTYPE_BYTES, real_model

    if not spec.startswith('real:') or dtype not in DTYPE_BYTES:
        return None
    model = real_model(spec.removeprefix('real:'))
    need = model.weight_bytes(dtype) * MEMORY_MARGIN + MEMORY_SLACK
    if need <= memory:
        return None
    from cdcca_ros.models import bundled

    config = json.loads((Path(bundled.resolve(spec)) / 'config.json').read_text())
    layers = int(config.get('text_config', config)['num_hidden_layers'])
    return max(1, int(layers * (memory - MEMORY_SLACK) / need))


def run_family(ctx: BenchContext, family: str, spec: str, dtype: str, settings: dict[str, Any]
               ) -> dict[str, Any]:
    """Measure one family in a child process (see :mod:`.realscale_family`)."""
    from cdcca_ros.bench.realscale_family import memory_available_bytes
    from cdcca_ros.models.real import real_model

    memory = (ctx.args.memory_gb * 2**30 if ctx.args.memory_gb
              else float(memory_available_bytes()))
    layers = _plan_layers(spec, dtype, memory) if ctx.args.device == 'cpu' else None
    teacher_spec = None
    if spec.startswith('real:'):
        student = real_model(spec.removeprefix('real:'))
        teacher = real_model(student.teacher) if student.teacher else None
        if teacher is not None and not layers and dtype in ('float32', 'bfloat16', 'float16') \
                and (teacher.weight_bytes(dtype) + student.weight_bytes(dtype)) \
                * MEMORY_MARGIN + MEMORY_SLACK <= memory:
            teacher_spec = teacher.spec
    child = dict(settings, family=family, spec=spec, dtype=dtype, lm_layers=layers,
                 teacher_spec=teacher_spec)
    settings_path = ctx.workdir / f'{family}-{dtype}.settings.json'
    out_path = ctx.workdir / f'{family}-{dtype}.json'
    settings_path.write_text(json.dumps(child))
    proc = subprocess.run([sys.executable, '-m', 'cdcca_ros.bench.realscale_family',
                           str(settings_path), str(out_path)], check=False)
    if proc.returncode != 0 or not out_path.is_file():
        return {'family': family, 'spec': spec, 'dtype': dtype,
                'error': f'measurement process exited with {proc.returncode}'}
    rec = json.loads(out_path.read_text())
    rec['settings'] = {k: child[k] for k in ('samples', 'fit_frames', 'budget', 'keep_ratio',
                                             'applies', 'threads', 'lm_layers')}
    return rec


def _dtype_notes(records: dict[str, list[dict[str, Any]]], memory_gb: float | None
                 ) -> list[str]:
    """Per real-size family: why it ran in its dtype (float32 against the memory planned)."""
    from cdcca_ros.bench.realscale_family import memory_available_bytes
    from cdcca_ros.models.real import real_model

    memory = memory_gb * 2**30 if memory_gb else float(memory_available_bytes())
    notes = []
    for family, recs in records.items():
        spec = str(recs[0].get('spec', ''))
        if not spec.startswith('real:'):
            continue
        model = real_model(spec.removeprefix('real:'))
        need = {d: (model.weight_bytes(d) * MEMORY_MARGIN + MEMORY_SLACK) / 2**30
                for d in ('float32', 'bfloat16')}
        fits = {d: v <= memory / 2**30 for d, v in need.items()}
        notes.append(
            f'{family}: {", ".join(str(r.get("dtype")) for r in recs)} (planned memory '
            f'{memory / 2**30:.1f} GiB; float32 needs ~{need["float32"]:.1f} GiB with the '
            f'margin: {"fits" if fits["float32"] else "does not fit"}; bfloat16 '
            f'~{need["bfloat16"]:.1f} GiB: '
            + ('fits)' if fits['bfloat16'] else
               'does not fit, the language model is cut to the layers that do)'))
    return notes


def _uplink_note(uplink: dict[str, Any]) -> str:
    """The bundled uplink's agreement in words (this version's keys or an earlier run's)."""
    lo, hi = uplink.get('default_interval') or (None, None)
    other = (f'ecq ({uplink["ecq"]}) {fmt(uplink["ecq_agree"])} at {fmt(uplink["ecq_bytes"])} B'
             if 'ecq' in uplink else
             f'{uplink.get("basis")}: {fmt(uplink.get("basis_agree"))} at '
             f'{fmt(uplink.get("basis_bytes"))} B')
    return (f'bundled uplink ({uplink["samples"]} samples, source + drifted, 640x480): teacher '
            f'answers equal to those from all exact tokens: default ({uplink["default"]}) '
            f'{uplink["default_agree"]:.3f} [{fmt(lo)}, {fmt(hi)}] at '
            f'{uplink["default_bytes"]:.0f} B; {other}; image mode '
            f'{uplink["image_agree"]:.3f} at {uplink["image_bytes"]:.0f} B')


def _real_uplink_note(settings: dict[str, Any], records: dict[str, list[dict[str, Any]]],
                      measured: bool) -> str:
    """The real-size uplink's setting: this run's, or that of the records taken over."""
    if measured:
        keep, budget, where = settings['keep_ratio'], settings['budget'], ''
        frames = f'{settings["fit_frames"]} '
    else:
        setting = next((r[0]['uplink_setting'] for r in records.values()
                        if r and r[0].get('uplink_setting')), {})
        keep, budget = setting.get('keep_ratio'), setting.get('budget_bytes')
        where, frames = ' (the records taken over)', ''
    return (f'real-size uplink{where}: keep {fmt(keep)}, basis budget {fmt(budget)} B; the '
            f'basis is fitted on {frames}source frames of the random-weight encoder (errors '
            'are those of random features, not of trained ones)')


def _dwc_note(point: dict[str, Any]) -> str:
    """The operating point in words (accuracy gain kept with its interval; the loss's)."""
    def row(key: str, r: dict[str, Any]) -> str:
        if 'gain_kept' not in r:  # a record of the loss-only measure
            return f'{key}: loss {fmt(r.get("gain_kept_loss"))}'
        lo, hi = r['gain_kept_interval'] or (None, None)
        return (f'{key}: accuracy {fmt(r["gain_kept"])} [{fmt(lo)}, {fmt(hi)}], loss '
                f'{fmt(r["gain_kept_loss"])}, answers as uncompressed '
                f'{fmt(r["answers_as_uncompressed"])}')
    measure = point.get('gain_measure', 'answer-loss reduction kept')
    return (f'DWC operating point: the smallest refit budget keeping >= {GAIN_KEPT} of the '
            f'gain ({measure}; {point.get("held_out", "?")} samples, accuracy '
            f'{fmt(point.get("accuracy_base"))} -> {fmt(point.get("accuracy_trained"))}) on '
            f'the bundled models: {point["bits_at_gain"]:g} bit/param'
            f'{"" if point["met"] else " (none met: the largest tried)"}; tried '
            + '; '.join(row(k, v) for k, v in point['refit'].items())
            + f'. The paper shipped {PAPER_DWC_BYTES} B')


def _parts(args: argparse.Namespace) -> tuple[str, ...]:
    """The parts this run measures (``--parts``; default all, or only the families with
    ``--bundled-from``), checked against what the earlier runs given can supply."""
    from cdcca_ros.errors import ConfigError

    if args.parts is None:
        return ('families',) if args.bundled_from else PARTS
    parts = tuple(p for p in str(args.parts).split(',') if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f'--parts: unknown {unknown}; known: {PARTS}')
    if not {'uplink', 'dwc'} <= set(parts) and not args.bundled_from:
        raise ConfigError('--parts without uplink or dwc needs --bundled-from (an earlier '
                          'run whose bundled parts are kept)')
    if 'families' not in parts and not args.records_from:
        raise ConfigError('--parts without families needs --records-from (an earlier run '
                          'whose family records are kept)')
    return parts


def family_dwc(spec: str, pools_path: Path, bits: float, seed: int) -> dict[str, Any]:
    """DWC payload figures of ``spec``'s trainable set, built on the meta device (no weights):
    a delta with values resampled per kind from the bundled delta (``pools_path``), compressed
    at the codec's 4 bits and at ``bits`` per parameter (as :mod:`.realscale_family`)."""
    import torch

    from cdcca_ros.bench.realscale_family import synthetic_delta
    from cdcca_ros.core import dwc
    from cdcca_ros.models import bundled

    model = bundled.load(spec, device='meta', dtype='bfloat16')
    shapes = {n: torch.empty(p.shape, dtype=p.dtype, device='meta')
              for n, p in model.trainable_parameters().items()}
    n_params = sum(t.numel() for t in shapes.values())
    delta = {k: v.to(shapes[k].dtype)
             for k, v in synthetic_delta(shapes, dict(np.load(pools_path)), seed).items()}
    codec = dwc.get_codec('sparse')
    four = dwc.compress(delta, codec, None, self_describing=False)
    low = dwc.compress(delta, codec, max(64, int(n_params * bits / 8)), self_describing=False)
    return {'trainable_params': n_params, 'dwc_bytes_4bit': four.stats.nbytes,
            'dwc_bits_4bit': four.stats.bits_per_param, 'dwc_bytes_min': low.stats.nbytes,
            'dwc_bits_min': low.stats.bits_per_param, 'dwc_setting_bits': bits,
            'trainable_set': (model.trainable_config.to_dict()
                              if model.trainable_config else None),
            'dwc_measured': 'meta device, full layer count'}


def _figures(rec: dict[str, Any]) -> dict[str, Any]:
    figures = {k: rec.get(k) for k in SUMMARY_KEYS}
    if isinstance(figures['answer_ms'], dict):
        figures['answer_ms'] = rec['answer_ms'].get('median')
        figures['answer_ms_p5_p95'] = [rec['answer_ms'].get('p5'), rec['answer_ms'].get('p95')]
    for key in ('dtype', 'uplink_token_rel_err', 'uplink_embed_rel_err', 'lock_over_answer',
                'round_mode', 'trimmed', 'dwc_bits_min', 'dwc_setting_bits', 'jpeg_640',
                'jpeg_1080', 'ecq_uplink_bytes', 'image_mode', 'trainable_params', 'error'):
        if key in rec:
            figures[key] = rec[key]
    return figures


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    args = ctx.args
    families = [f for f in str(args.families).split(',') if f]
    for f in families:
        if f not in FAMILIES:
            from cdcca_ros.errors import ConfigError

            raise ConfigError(f'--families: unknown family {f!r}; known: {FAMILIES}')
    overrides = dict(item.split('=', 1) for item in str(args.models).split(',') if '=' in item)
    dtypes = [d for d in (args.dtypes or ('bfloat16,8bit,4bit' if args.device == 'cuda'
                                          else 'bfloat16')).split(',') if d]
    quick = ctx.quick
    bits_list = [float(b) for b in (args.dwc_bits or ('1' if quick else '2,1.5,1,0.5,0.25'))
                 .split(',')]
    pools = ctx.workdir / 'delta_pools.npz'
    parts = _parts(args)
    earlier_bundled = (json.loads(Path(args.bundled_from).read_text())['detail']
                       if args.bundled_from else None)
    if 'uplink' in parts:
        uplink = bundled_uplink(ctx, args.bundled_per_domain or (2 if quick else 40))
    else:
        assert earlier_bundled is not None  # _parts checked
        uplink = dict(earlier_bundled['bundled_uplink'], source=str(args.bundled_from))
    if 'dwc' in parts:
        dwc_point = bundled_dwc(ctx, bits_list, pools)
    else:
        # The operating point of an earlier run (same seed and models); the AKD round is run
        # again for the delta's values (the pools are not kept in the JSON) when a family is
        # measured.
        assert earlier_bundled is not None
        dwc_point = earlier_bundled['bundled_dwc']
        again = (bundled_dwc(ctx, bits_list, pools, refit=False) if families
                 else {'trainable_params': dwc_point['trainable_params']})
        if again['trainable_params'] != dwc_point['trainable_params']:
            from cdcca_ros.errors import ConfigError

            raise ConfigError(f'--bundled-from {args.bundled_from}: its bundled trainable set '
                              f'has {dwc_point["trainable_params"]} parameters, these models '
                              f'{again["trainable_params"]}')
        dwc_point['from'] = str(args.bundled_from)
    settings = {
        'device': 'cuda' if args.device == 'cuda' else 'cpu', 'seed': ctx.seed,
        'threads': args.threads, 'samples': args.samples or (1 if quick else 3),
        'fit_frames': args.fit_frames or (2 if quick else 8), 'budget': args.budget,
        'keep_ratio': (args.keep_ratio if args.keep_ratio is not None
                       else float(device_params()['uts.basis_keep_ratio'])),
        'budget_sweep': [int(b) for b in str(args.budget_sweep).split(',') if b],
        'keep_sweep': [float(k) for k in str(args.keep_sweep).split(',') if k],
        'dwc_bits': dwc_point['bits_at_gain'], 'pools': str(pools),
        'applies': args.applies, 'max_new_tokens': device_params()['max_new_tokens']}
    records: dict[str, list[dict[str, Any]]] = {}
    for family in families if 'families' in parts else []:
        from cdcca_ros.models.real import STUDENTS

        spec = overrides.get(family, f'real:{STUDENTS[family]}')
        for dtype in dtypes:
            if dtype in ('4bit', '8bit') and args.device != 'cuda':
                continue
            records.setdefault(family, []).append(run_family(ctx, family, spec, dtype,
                                                             settings))
    reused = []
    records_run: dict[str, Any] | None = None
    if args.records_from:
        # Families measured in an earlier run (e.g. one family re-run with other settings).
        earlier_doc = json.loads(Path(args.records_from).read_text())
        earlier = earlier_doc['detail']['records']
        # The run that measured them (carried over when that file took them over itself).
        records_run = earlier_doc['detail'].get('records_run') or {
            k: earlier_doc.get(k) for k in ('created', 'duration_s', 'machine', 'args')}
        records_run['dtype_notes'] = records_run.get('dtype_notes') or [
            n for n in earlier_doc.get('notes', []) if 'planned memory' in n]
        for f in FAMILIES:
            if f not in records and f in earlier:
                records[f] = earlier[f]
                reused.append(f)
    records = {f: records[f] for f in FAMILIES if f in records}
    redone = []
    if 'dwc' in parts and 'families' not in parts:
        # This run's operating point on the earlier records' families: the DWC payloads of
        # each real-size trainable set, built on the meta device (shapes only).
        for f, recs in records.items():
            spec = str(recs[0].get('spec', ''))
            if not spec.startswith('real:'):
                continue
            figures = family_dwc(spec, pools, dwc_point['bits_at_gain'], ctx.seed)
            for rec in recs:
                rec.update(figures)
            redone.append(f)
    summary: dict[str, Any] = {
        'families': {f: _figures(recs[0]) for f, recs in records.items()},
        'bundled_teacher_agreement': uplink['default_agree'],
        'bundled_teacher_agreement_interval': uplink.get('default_interval'),
        'bundled_uplink_default': uplink['default'],
        'bundled_teacher_agreement_ecq': uplink.get('ecq_agree'),
        'bundled_teacher_agreement_image': uplink['image_agree'],
        'bundled_uplink_bytes': uplink['default_bytes'],
        'bundled_uplink_bytes_ecq': uplink.get('ecq_bytes'),
        'dwc_bits_at_gain': dwc_point['bits_at_gain'],
        'dwc_gain_target_met': dwc_point['met'],
        'paper_dwc_bytes': PAPER_DWC_BYTES,
        'device': args.device, 'dtypes': dtypes,
    }
    headers = ['figure', *records]
    labels = [('params', 'parameters'), ('dtype', 'dtype'), ('answer_ms', 'answer ms (median)'),
              ('peak_rss_mb', 'peak RSS MB'), ('uts_over_answer', 'UTS / answer'),
              ('uplink_bytes_per_sample', 'uplink B / sample (basis)'),
              ('uplink_over_jpeg_640', '  / JPEG q90 640x480'),
              ('uplink_over_jpeg_1080', '  / JPEG q90 1920x1080'),
              ('uplink_token_rel_err', '  token rel. error'),
              ('uplink_embed_rel_err', '  LM input rel. error'),
              ('ecq_uplink_bytes', 'ecq keep 0.5 B / sample (fallback)'),
              ('dwc_bytes_4bit', 'DWC bytes, 4 bit'), ('dwc_bytes_min', 'DWC bytes, min setting'),
              ('apply_over_answer', 'hot-apply / answer'), ('answers_lost', 'answers lost'),
              ('round_s_per_sample', 'round s / sample')]
    rows = []
    for key, label in labels:
        rows.append([label, *[summary['families'][f].get(key) for f in records]])
    md = ['| figure | ' + ' | '.join(records) + ' |', '|---' * (len(records) + 1) + '|']
    md += [f'| {r[0].strip()} | ' + ' | '.join(fmt(c) for c in r[1:]) + ' |' for r in rows]
    notes = [
        _uplink_note(uplink),
        _dwc_note(dwc_point),
        _real_uplink_note(settings, records, 'families' in parts),
    ]
    for f, recs in records.items():
        for rec in recs:
            notes += [f'{f} ({rec.get("dtype")}): {n}' for n in rec.get('notes', [])]
            if rec.get('round_mode'):
                notes.append(f'{f} ({rec.get("dtype")}) round: {rec["round_mode"]}')
            if rec.get('error'):
                notes.append(f'{f} ({rec.get("dtype")}): {rec["error"]}')
    if redone:
        notes.append(f'{", ".join(redone)}: DWC payloads (dwc_*, trainable_params) measured in '
                     'this run on the meta device at its operating point, with the real '
                     'configuration\'s trainable set at its full layer count; the other figures '
                     f'are the records of {args.records_from}')
    if reused:
        created = (records_run or {}).get('created')
        notes.append(f'{", ".join(reused)}: records of {args.records_from} (an earlier run '
                     f'of this bench{f", created {created}" if created else ""}; its settings '
                     'are in each record, its machine and duration in detail.records_run)')
    if args.device == 'cpu':
        notes += (_dtype_notes(records, args.memory_gb) if not reused or records_run is None
                  or not records_run['dtype_notes'] else records_run['dtype_notes'])
        notes.append('no GPU: bitsandbytes 4-bit / 8-bit and the GPU memory column are not '
                     'measured')
    return BenchResult(summary=summary, headers=headers, rows=rows,
                       detail={'markdown': '\n'.join(md), 'records': records,
                               'bundled_uplink': uplink, 'bundled_dwc': dwc_point,
                               'records_run': records_run,
                               'settings': settings},
                       notes=notes)
