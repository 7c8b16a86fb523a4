"""Uplink bytes (issue 4): what one selected sample costs on the link, and how many are selected.

Per sample (frames at the camera's resolution, 640x480, of the source and every drifted domain):

* the raw RGB frame, and its JPEG at quality 90 (``cv2.imencode``: the fair baseline, an
  ``image`` uplink mode would send it);
* all vision tokens in fp16 (what the official code sends);
* the UTS-kept tokens as ``uts_node`` sends them, at the keep ratio of ``--keep-ratio``
  (default: the device's), in every packing (fp16, int8, int4, ecq): the CDR bytes of the
  token fields of ``UtsTokens`` (payload, scales, uint16 kept indices, each with its 4-byte
  count: what ``uts_node`` counts as uplink bytes), and the whole serialized message when the
  ROS messages are built. ``summary.uts_over_jpeg`` is that of ``--dtype`` (default: the
  device's packing).

Packing is judged by what the cloud does with the tokens: the teacher's answer from the
unpacked kept tokens is compared with its answer from the exact (float32) kept tokens. A sweep
over the keep ratio (packing ``--dtype``) shows the bytes/answer trade-off.

Stage 1: the fraction of samples whose answer entropy passes the device's default gate, on the
source and on the drifted domains, with the entropy distribution per domain and the student's
accuracy, so a better default threshold can be read off.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from typing import Any

import numpy as np

from cdcca_ros.bench.common import (
    BenchContext,
    BenchResult,
    Target,
    camera_size,
    device_params,
    device_uts_config,
    fmt,
    ratio,
    world_samples,
)

NAME = 'uplink'
DESCRIPTION = ('uplink bytes per selected sample (raw, JPEG q90, all tokens, UTS-kept tokens in '
               'every packing) and stage-1 pass rates on source vs drifted domains')
TARGET_OVER_JPEG = 0.01
TARGETS = (Target('uts_over_jpeg', '<=', TARGET_OVER_JPEG, 'issue 4'),)
JPEG_QUALITY = 90


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    from cdcca_ros.core.uts import PACK_DTYPES

    parser.add_argument('--per-domain', type=int, default=None,
                        help='samples per domain (default 60, quick 2)')
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help='stage-2 keep ratio of the measured configuration '
                             '(default: the device node\'s uts.keep_ratio)')
    parser.add_argument('--dtype', choices=PACK_DTYPES, default=None,
                        help='packing of summary.uts_over_jpeg and of the sweep '
                             '(default: the device node\'s uts.pack_dtype)')
    parser.add_argument('--keep-ratios', default='0.1,0.25,0.5,0.75,1.0',
                        help='keep ratios of the sweep')


def recommend(over_jpeg: dict[str, float], agreement: dict[str, float],
              target: float = TARGET_OVER_JPEG) -> str:
    """The packing to use: among those within the byte target, the one the teacher agrees
    with most (then the fewest bytes); if none is within it, the fewest bytes."""
    within = [d for d, r in over_jpeg.items() if r <= target]
    if within:
        return max(within, key=lambda d: (agreement[d], -over_jpeg[d]))
    return min(over_jpeg, key=lambda d: over_jpeg[d])


def _jpeg_bytes(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> int:
    import cv2

    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError('cv2.imencode failed to encode a JPEG')
    return int(buf.size)


def _message_bytes(sample: Any, result: Any, space: Any) -> int | None:
    """Serialized size of the ``UtsTokens`` message uts_node would publish (None without ROS)."""
    try:
        from rclpy.serialization import serialize_message
        from std_msgs.msg import Header

        from cdcca_ros.core.uplink.pipeline import UplinkSample
        from cdcca_ros.nodes.uts_node import to_msg
    except ImportError:
        return None
    msg = to_msg('robot1', 'robot1-000001', sample, UplinkSample(entropy=result.entropy,
                                                                 uts=result),
                 Header(frame_id='camera'), space)
    return len(serialize_message(msg))


def _teacher_text(teacher: Any, tokens: Any, indices: Any, question: str) -> str:
    import torch

    idx = None if indices is None else torch.as_tensor(indices, dtype=torch.long)[None]
    return teacher.answer_from_tokens(tokens.float()[None], idx, [question])[0].text


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f'p{q}': float(np.percentile(arr, q)) for q in (10, 25, 50, 75, 90)} | {
        'mean': float(arr.mean())}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Probability that a positive scores above a negative (ties count half); None when a
    side is empty."""
    if positive.size == 0 or negative.size == 0:
        return None
    both = np.concatenate([positive, negative])
    order = both.argsort(kind='mergesort')
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    for value in np.unique(both):  # average ranks of ties
        tie = both == value
        ranks[tie] = ranks[tie].mean()
    r_pos = ranks[:positive.size].sum()
    return float((r_pos - positive.size * (positive.size + 1) / 2)
                 / (positive.size * negative.size))


def run(ctx: BenchContext) -> BenchResult:
    """Measure and summarise (see the module docstring)."""
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.uts import (
        PACK_DTYPES,
        UtsConfig,
        UtsPipeline,
        pack_stats,
        pack_tokens,
        select_tokens,
        unpack_tokens,
        uplink_bytes,
    )
    from cdcca_ros.sim.domains import DRIFTED, SOURCE
    from cdcca_ros.sim.scoring import vqa_accuracy

    per_domain = ctx.args.per_domain or (2 if ctx.quick else 60)
    ratios = [float(r) for r in str(ctx.args.keep_ratios).split(',') if r.strip()]
    width, height = camera_size()
    params = device_params()
    student = ctx.models.student()
    teacher = ctx.models.teacher()
    runtime = DeviceRuntime(student, 'robot1', max_new_tokens=params['max_new_tokens'])
    space = student.vision_space()
    default = device_uts_config()
    keep_ratio = default.keep_ratio if ctx.args.keep_ratio is None else ctx.args.keep_ratio
    dtype = ctx.args.dtype or default.pack_dtype
    UtsConfig(keep_ratio=keep_ratio, pack_dtype=dtype)  # checks both (ConfigError)
    selectors = {}
    # Stage 2 on every sample: the bytes of a selected sample do not depend on whether this
    # one was selected, and the pack comparison needs many samples.
    pipeline = UtsPipeline(device_uts_config(stage1_threshold=0.0, keep_ratio=keep_ratio,
                                             pack_dtype=dtype),
                           runtime.mc_token_features, has_cls=space.has_cls)
    domains = (SOURCE,) + DRIFTED
    samples = world_samples(ctx.seed, domains, per_domain, (width, height))
    rec: dict[str, list[Any]] = {k: [] for k in (
        'domain', 'jpeg', 'entropy', 'passed', 'correct', 'msg', 'agree_all',
        'teacher_acc_all', 'kept')}
    packs: dict[str, dict[str, list[float]]] = {
        d: {'bytes': [], 'agree': [], 'acc': [], 'rel_l2': [], 'cosine': []}
        for d in PACK_DTYPES}
    sweep: dict[float, dict[str, list[float]]] = {r: {'bytes': [], 'agree': [], 'acc': []}
                                                  for r in ratios}
    for s in samples:
        answered = runtime.answer(s.image, s.question)
        selector = selectors.setdefault(s.domain, default.make_selector())
        rec['domain'].append(s.domain)
        rec['jpeg'].append(_jpeg_bytes(s.image))
        rec['entropy'].append(answered.entropy_mean)
        rec['passed'].append(selector.offer(answered.entropy_mean))
        rec['correct'].append(vqa_accuracy(answered.text, s.answers))
        result = pipeline.process(answered.step_probs, answered.tokens)
        assert result is not None  # stage 1 threshold 0 passes every sample
        kept_idx = result.kept_indices
        kept = answered.tokens.detach().float().cpu()[kept_idx]
        rec['kept'].append(int(kept_idx.numel()))
        rec['msg'].append(_message_bytes(answered, result, space))
        exact = _teacher_text(teacher, kept, kept_idx, s.question)
        all_tokens = _teacher_text(teacher, answered.tokens, None, s.question)
        rec['agree_all'].append(float(exact == all_tokens))
        rec['teacher_acc_all'].append(vqa_accuracy(all_tokens, s.answers))
        for d in PACK_DTYPES:
            packed = result.packed if d == dtype else pack_tokens(kept, d)
            st = pack_stats(kept, d)
            text = _teacher_text(teacher, unpack_tokens(packed), kept_idx, s.question)
            row = packs[d]
            row['bytes'].append(uplink_bytes(len(packed.data), len(packed.scale),
                                             int(kept_idx.numel())))
            row['agree'].append(float(text == exact))
            row['acc'].append(vqa_accuracy(text, s.answers))
            row['rel_l2'].append(st.rel_l2)
            row['cosine'].append(st.cosine)
        for r in ratios:
            idx = select_tokens(result.variance, mode='keep_ratio', keep_ratio=r,
                                min_keep=default.min_keep,
                                always_keep_cls=default.always_keep_cls and space.has_cls)
            packed = pack_tokens(answered.tokens.detach().float().cpu()[idx], dtype)
            text = _teacher_text(teacher, unpack_tokens(packed), idx, s.question)
            sweep[r]['bytes'].append(uplink_bytes(len(packed.data), len(packed.scale),
                                                  int(idx.numel())))
            sweep[r]['agree'].append(float(text == all_tokens))
            sweep[r]['acc'].append(vqa_accuracy(text, s.answers))

    domain = np.asarray(rec['domain'])
    src = domain == SOURCE
    drift = ~src
    jpeg_mean = float(np.mean(rec['jpeg']))
    raw = width * height * 3
    n_tok, dim = space.num_tokens, space.dim
    all_fp16 = n_tok * dim * 2
    mean = {d: {k: float(np.mean(v)) for k, v in row.items()} for d, row in packs.items()}
    over_jpeg = {d: ratio(mean[d]['bytes'], jpeg_mean) for d in PACK_DTYPES}
    agreement = {d: mean[d]['agree'] for d in PACK_DTYPES}
    recommended = recommend(over_jpeg, agreement)
    msgs = [m for m in rec['msg'] if m is not None]
    passed = np.asarray(rec['passed'], dtype=bool)
    entropy = np.asarray(rec['entropy'])
    correct = np.asarray(rec['correct'])
    # A threshold that passes 10% of the source samples (what the model already knows) and
    # what it passes of the drifted ones.
    suggested = float(np.percentile(entropy[src], 90)) if src.any() else math.nan
    summary = {
        'raw_bytes': raw,
        'jpeg_bytes': jpeg_mean,
        'all_tokens_fp16_bytes': all_fp16,
        'pack_dtype': dtype,
        'keep_ratio': keep_ratio,
        'kept_tokens_mean': float(np.mean(rec['kept'])),
        'uts_bytes': mean[dtype]['bytes'],
        'uts_over_jpeg': over_jpeg[dtype],
        **{f'uts_bytes_{d}': mean[d]['bytes'] for d in PACK_DTYPES},
        **{f'uts_{d}_over_jpeg': over_jpeg[d] for d in PACK_DTYPES},
        **{f'teacher_agreement_{d}': agreement[d] for d in PACK_DTYPES},
        'uts_msg_over_jpeg': ratio(float(np.mean(msgs)), jpeg_mean) if msgs else None,
        'all_tokens_over_jpeg': ratio(all_fp16, jpeg_mean),
        'pack_dtype_default': default.pack_dtype,
        'pack_dtype_device': params['uts.pack_dtype'],
        'keep_ratio_default': default.keep_ratio,
        'pack_dtype_recommended': recommended,
        'pass_rate_source': float(passed[src].mean()) if src.any() else math.nan,
        'pass_rate_drifted': float(passed[drift].mean()) if drift.any() else math.nan,
        'entropy_threshold_default': default.stage1_threshold,
        'entropy_threshold_suggested': suggested,
        'pass_rate_drifted_at_suggested': (float((entropy[drift] > suggested).mean())
                                           if drift.any() else math.nan),
        'entropy_auroc_drifted_vs_source': auroc(entropy[drift], entropy[src]),
        'entropy_auroc_wrong_vs_right': auroc(entropy[correct < 1.0], entropy[correct >= 1.0]),
        'samples': len(samples),
    }
    per_domain_rows = []
    per_domain_detail = {}
    acc_packed = np.asarray(packs[dtype]['acc'])
    for d in domains:
        m = domain == d
        wrong = m & (correct < 1.0)
        right = m & (correct >= 1.0)
        per_domain_detail[d] = {
            'samples': int(m.sum()), 'jpeg_bytes': float(np.mean(np.asarray(rec['jpeg'])[m])),
            'pass_rate': float(passed[m].mean()), 'entropy': _quantiles(entropy[m].tolist()),
            'student_accuracy': float(correct[m].mean()),
            'pass_rate_wrong': float(passed[wrong].mean()) if wrong.any() else None,
            'pass_rate_right': float(passed[right].mean()) if right.any() else None,
            'pass_rate_at_suggested': float((entropy[m] > suggested).mean()),
            'teacher_accuracy_all_tokens': float(np.mean(np.asarray(rec['teacher_acc_all'])[m])),
            f'teacher_accuracy_uts_{dtype}': float(acc_packed[m].mean()),
        }
        pd = per_domain_detail[d]
        per_domain_rows.append([f'stage 1 on {d}', pd['pass_rate'],
                                pd['entropy'].get('p50'), pd['student_accuracy'],
                                pd['pass_rate_at_suggested']])
    rows: list[list[Any]] = [
        ['raw frame RGB', raw, ratio(raw, jpeg_mean), '-'],
        [f'JPEG q{JPEG_QUALITY} {width}x{height}', jpeg_mean, 1.0, '-'],
        [f'all tokens fp16 ({n_tok}x{dim})', all_fp16, ratio(all_fp16, jpeg_mean), '-'],
    ]
    rows += [[f'UTS kept ({keep_ratio:g}), {d}' + (' *' if d == dtype else ''),
              mean[d]['bytes'], over_jpeg[d], agreement[d]] for d in PACK_DTYPES]
    if msgs:
        rows.append([f'UtsTokens message ({dtype})', float(np.mean(msgs)),
                     summary['uts_msg_over_jpeg'], '-'])
    for r in ratios:
        b = float(np.mean(sweep[r]['bytes']))
        rows.append([f'keep_ratio {r:g}, {dtype} (vs all tokens)', b, ratio(b, jpeg_mean),
                     float(np.mean(sweep[r]['agree']))])
    detail = {
        'per_domain': per_domain_detail,
        'packings': {d: {'bytes': mean[d]['bytes'], 'over_jpeg': over_jpeg[d],
                         'teacher_agreement_vs_exact_kept': agreement[d],
                         'teacher_accuracy': mean[d]['acc'], 'rel_l2_mean': mean[d]['rel_l2'],
                         'cosine_mean': mean[d]['cosine']} for d in PACK_DTYPES},
        'keep_ratio_sweep': {f'{r:g}': {
            'bytes': float(np.mean(v['bytes'])), 'over_jpeg': ratio(float(np.mean(v['bytes'])),
                                                                    jpeg_mean),
            'teacher_agreement_vs_all_tokens': float(np.mean(v['agree'])),
            'teacher_accuracy': float(np.mean(v['acc']))} for r, v in sweep.items()},
        'teacher_agreement_kept_vs_all_tokens': float(np.mean(rec['agree_all'])),
        'teacher_accuracy_all_tokens': float(np.mean(rec['teacher_acc_all'])),
        f'teacher_accuracy_uts_{dtype}': float(acc_packed.mean()),
        'message_bytes_mean': float(np.mean(msgs)) if msgs else None,
        'vision_space': asdict(space), 'uts_config_default': asdict(default),
        'frame_size': [width, height], 'jpeg_quality': JPEG_QUALITY,
    }
    agree_text = ', '.join(f'{d} {agreement[d]:.1%} ({mean[d]["bytes"]:.0f} B)'
                           for d in PACK_DTYPES)
    notes = [
        f'{len(samples)} frames {width}x{height} ({per_domain} per domain); bytes are means, '
        'ratios are totals over the run (what the link carries)',
        f'measured configuration: keep_ratio {keep_ratio:g} ({summary["kept_tokens_mean"]:.1f} '
        f'of {n_tok} tokens kept), packing {dtype} (*): summary.uts_over_jpeg; device defaults '
        f'keep_ratio {default.keep_ratio:g}, {default.pack_dtype}'
        + ('' if params['uts.pack_dtype'] == default.pack_dtype else
           f' among UTS\'s own packings (the device packs {params["uts.pack_dtype"]}, '
           f'measured by the realscale bench; {default.pack_dtype} is its fallback)'),
        'UTS bytes = CDR bytes of the UtsTokens token fields: payload + float32 scales + '
        'uint16 kept indices, each with its 4-byte count (uts_node\'s uplink_bytes); the '
        'message adds question, answer, ids and per-token variance',
        f'packing: teacher answers from unpacked tokens equal those from exact kept tokens in '
        f'{agree_text}: use {recommended} (within {TARGET_OVER_JPEG:.0%} of the JPEG, the '
        'most agreement; else the fewest bytes)',
        f'stage 1 default threshold {default.stage1_threshold:g} nats passes '
        f'{summary["pass_rate_source"]:.1%} of source and {summary["pass_rate_drifted"]:.1%} '
        f'of drifted samples; {suggested:.3g} nats would pass 10% of source and '
        f'{summary["pass_rate_drifted_at_suggested"]:.1%} of drifted',
        'entropy AUROC (how well the answer entropy ranks): drifted vs source '
        f'{fmt(summary["entropy_auroc_drifted_vs_source"])}, wrong vs right answers '
        f'{fmt(summary["entropy_auroc_wrong_vs_right"])}',
    ]
    return BenchResult(summary=summary, headers=['uplink per sample', 'bytes', 'x JPEG',
                                                 'teacher agreement'],
                       rows=rows + [['-', '-', '-', '-']] + [
                           [r[0], f'pass {r[1]:.1%}', f'H50 {r[2]:.3g}',
                            f'acc {r[3]:.1%}'] for r in per_domain_rows],
                       detail=detail, notes=notes)
