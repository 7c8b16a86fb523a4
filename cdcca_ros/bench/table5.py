"""Table 5 of the paper: bytes each direction of the loop moves, and the time at a link speed.

Uplink, for the paper's five-frame input (five selected frames):

* raw RGB frames at the camera's resolution (640x480; the paper's 1920x1080 computed beside);
* the JPEG at quality 90 of each frame (``cv2.imencode``, the fair image baseline);
* all vision tokens in fp16 (what the official code sends);
* the tokens UTS keeps (device defaults: stage-2 keep ratio, packing, + uint32 indices).

Downlink, for one CD-CCA round (the device's UTS uplink of a drifted stream, the cloud's AKD
round):

* the full student model in fp16 (what re-deploying the model would send);
* the delta of the trainable set in fp16, in NF4 (bitsandbytes, the paper's choice), and ours
  (the cloud's default codec under its byte budget, as the cloud node sends it), each as a
  compact DWC payload (no tensor index: the device decodes against its own trainable set).

Measured on the bundled models; the same rows are computed at the shapes of BLIP-2 OPT-2.7B
(ViT-g tokens 257x1408; its trainable set with LoRA r=8, values resampled from the measured
delta, see :mod:`cdcca_ros.bench.downlink`). Transfer time is ``8 * bytes / rate`` at 1 Gbit/s
(the paper's Gigabit Ethernet) and at 10 Mbit/s (an LTE uplink): serialisation only, no
protocol overhead (the ``link`` bench measures the real link).
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from cdcca_ros.bench.adaptation import (
    DEVICE_ID,
    IMAGE_SIZE,
    kib,
    markdown_table,
    plot_path,
    pyplot,
    save_figure,
)
from cdcca_ros.bench.common import (
    BENCH_START,
    BenchContext,
    BenchResult,
    Target,
    camera_size,
    device_params,
    device_uts_config,
    world_samples,
)

NAME = 'table5'
DESCRIPTION = ('paper Table 5: uplink (raw / JPEG / all tokens / UTS) and downlink (full model '
               '/ fp16 / NF4 / ours) bytes and transfer time at 1 Gbit/s and 10 Mbit/s')
TARGETS = (Target('uts_over_raw', '<=', 0.0021, 'paper Table 5: UTS sends 0.21% of the data'),
           Target('blip2/ours_over_full_model', '<=', 1e-4,
                  'paper Table 5: DWC sends 99.99% less than the model'))
FRAMES = 5  # the paper's uplink rows are for a five-frame input
LINKS = {'1 Gbit/s': 1e9, '10 Mbit/s': 1e7}
JPEG_QUALITY = 90
PAPER_FRAME = (1920, 1080)
# The paper's Table 5 (P, D, TL): uplink raw, uplink UTS, downlink full, downlink DWC.
PAPER = {
    'uplink_raw': {'params': None, 'bytes': 31.10e6, 'seconds': 0.498},
    'uplink_uts': {'params': None, 'bytes': 65.54e3, 'seconds': 0.001},
    'downlink_full': {'params': 7.78e9, 'bytes': 14.48e9, 'seconds': 65.490},
    'downlink_dwc': {'params': 1.65e6, 'bytes': 0.791e6, 'seconds': 0.013},
}
HEADERS = ['what', 'direction', 'P', 'D', *(f'TL @{k}' for k in LINKS), 'paper D',
           'paper TL', 'how']
BLIP2 = 'blip2-opt-2.7b'
BLIP2_TOKENS = (257, 1408, True)  # ViT-g/14 at 224 px: 256 patches + CLS, width 1408
REAL_LAYERS = 2  # layers of the real trainable set actually encoded (payload scaled)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench arguments."""
    parser.add_argument('--stream-per-domain', type=int, default=None,
                        help='drifted frames per domain of the round (default 16, quick 2)')
    parser.add_argument('--akd-steps', type=int, default=None,
                        help='AKD steps of the round (default: cloud node table; quick 2)')


def seconds(nbytes: float, bps: float) -> float:
    """Serialisation time of ``nbytes`` at ``bps`` bits per second."""
    return 8.0 * nbytes / bps


def _time(s: float) -> str:
    if s >= 1.0:
        return f'{s:.3f} s'
    if s >= 1e-3:
        return f'{s * 1e3:.3f} ms'
    return f'{s * 1e6:.1f} us'


def _params(n: float | None) -> str:
    if n is None:
        return '/'
    for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= size:
            return f'{n / size:.2f}{unit}'
    return f'{n:.0f}'


def _jpeg_bytes(rgb: np.ndarray) -> int:
    import cv2

    ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError('cv2.imencode failed to encode a JPEG')
    return int(buf.size)


# Bytes per packed token value (ecq is variable-length: the measured mean is used instead).
_VALUE_BYTES = {'fp16': 2.0, 'int8': 1.0, 'int4': 0.5, 'ecq': 0.5}


def uts_tokens_bytes(num_tokens: int, dim: int, has_cls: bool, cfg: Any,
                     value_bytes: float | None = None) -> int:
    """``UtsTokens`` content bytes of one sample's kept tokens at ``cfg``'s keep ratio and
    packing (computed; :func:`cdcca_ros.core.uts.uplink_bytes`).

    Args:
        value_bytes: Bytes per packed value; None: from the packing (ecq: an estimate).
    """
    from cdcca_ros.core.uts import uplink_bytes

    patches = num_tokens - (1 if has_cls else 0)
    kept = min(patches, math.ceil(cfg.keep_ratio * patches - 1e-9)) + (1 if has_cls else 0)
    per_value = value_bytes if value_bytes is not None else _VALUE_BYTES[cfg.pack_dtype]
    # float32 scales: none for fp16, one per sample for ecq, one per token otherwise.
    scales = {'fp16': 0, 'ecq': 1}.get(cfg.pack_dtype, kept)
    return uplink_bytes(math.ceil(kept * dim * per_value), scales, kept)


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    """Bytes of every row (log scale), uplink and downlink side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6))
    for ax, direction in zip(axes, ('uplink', 'downlink'), strict=True):
        mine = [r for r in rows if r['direction'] == direction]
        ax.barh(range(len(mine)), [max(r['bytes'], 1) for r in mine],
                color=['tab:blue' if r['how'] == 'measured' else 'tab:orange' for r in mine])
        ax.set_yticks(range(len(mine)))
        ax.set_yticklabels([r['what'] for r in mine], fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale('log')
        ax.set_xlabel(f'{direction} bytes (blue measured, orange computed)', fontsize=7)
        ax.grid(alpha=0.3, axis='x')
    save_figure(fig, path)


def run(ctx: BenchContext) -> BenchResult:
    """Measure one stream and one round, compute the rest; lay out the paper's Table 5."""
    import torch

    from cdcca_ros.bench.downlink import (
        delta_pools,
        real_configs,
        synthetic_delta,
        trainable_params,
    )
    from cdcca_ros.core import dwc
    from cdcca_ros.core.akd import AKDConfig
    from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime
    from cdcca_ros.core.device_runtime import DeviceRuntime
    from cdcca_ros.core.rounds.config import GuardConfig
    from cdcca_ros.core.uts import UtsPipeline, unpack_tokens
    from cdcca_ros.core.wire import generate_keypair
    from cdcca_ros.nodes.tables import defaults
    from cdcca_ros.sim.domains import DRIFTED

    torch.manual_seed(ctx.seed)
    per_domain = ctx.args.stream_per_domain or (2 if ctx.quick else 16)
    cloud_p = defaults('cloud_node')
    steps = ctx.args.akd_steps or (2 if ctx.quick else int(cloud_p['akd.steps']))
    batch = 4 if ctx.quick else int(cloud_p['akd.batch_size'])
    width, height = camera_size()
    cfg = device_uts_config()

    # --- uplink: the device answers a drifted stream at the camera's resolution.
    private, public = generate_keypair()
    device = DeviceRuntime(ctx.models.student(), DEVICE_ID, public,
                           max_new_tokens=device_params()['max_new_tokens'])
    space = device.model.vision_space()
    pipeline = UtsPipeline(cfg, device.mc_token_features, has_cls=space.has_cls)
    frames = world_samples(ctx.seed, DRIFTED, per_domain, (width, height), start=BENCH_START)
    jpeg, kept_bytes, kept_counts, uplinked, payload_values = [], [], [], [], []
    for s in frames:
        jpeg.append(_jpeg_bytes(s.image))
        answered = device.answer(s.image, s.question)
        result = pipeline.process(answered.step_probs, answered.tokens)
        if result is None:
            continue
        kept_bytes.append(result.uplink_bytes)
        payload_values.append((len(result.packed.data),
                               result.packed.shape[0] * result.packed.shape[1]))
        kept_counts.append(int(result.kept_indices.numel()))
        uplinked.append((unpack_tokens(result.packed), result.kept_indices, s.question))
    pass_rate = len(uplinked) / len(frames)
    raw = width * height * 3
    jpeg_mean = float(np.mean(jpeg))
    all_fp16 = space.num_tokens * space.dim * 2
    uts_mean = (float(np.mean(kept_bytes)) if kept_bytes
                else float(uts_tokens_bytes(space.num_tokens, space.dim, space.has_cls, cfg)))
    n_tok, dim, cls = BLIP2_TOKENS
    big_all = n_tok * dim * 2
    # The packing's measured bytes per value (exact for fixed-width packings, the mean for
    # ecq), applied to BLIP-2's token shapes.
    value_bytes = (sum(b for b, _ in payload_values) / max(1, sum(v for _, v in payload_values))
                   if payload_values else None)
    big_uts = uts_tokens_bytes(n_tok, dim, cls, cfg, value_bytes)
    paper_raw = PAPER_FRAME[0] * PAPER_FRAME[1] * 3

    # --- downlink: one AKD round on what was uplinked (every frame if stage 1 passed none,
    # so there is always a delta to encode), delta through each codec.
    if not uplinked:
        for s in frames:
            tok = device.model.vision_tokens([s.image])[0]
            uplinked.append((tok.detach(), None, s.question))
    teacher = ctx.models.teacher()
    cloud = CloudRuntime(teacher, ctx.models.student(), private, CloudConfig(
        min_samples=1, akd=AKDConfig(
            lambda_query=cloud_p['akd.lambda_query'], lambda_repr=cloud_p['akd.lambda_repr'],
            lambda_ce=cloud_p['akd.lambda_ce'], lr=cloud_p['akd.lr'], steps=steps,
            batch_size=batch, seed=ctx.seed),
        codec=cloud_p['dwc.codec'], budget_bytes=cloud_p['dwc.budget_bytes'],
        guard=GuardConfig.plain(steps)))
    for tokens, kept, question in uplinked:
        cloud.add_sample(DEVICE_ID, tokens, kept, question, space.num_tokens, space.dim)
    round_result = cloud.run_round(DEVICE_ID)
    if round_result is None:
        raise RuntimeError('the AKD round learnt nothing (every pseudo-label was empty)')
    delta = dwc.compute_delta(cloud.device(DEVICE_ID).trained, cloud.base)
    n_trainable = dwc.num_params(delta)
    full_params = sum(p.numel() for p in device.model.torch_model.parameters())
    # Compact payloads, as the cloud sends them (the device knows its trainable set).
    codecs = {'fp16': dwc.compress(delta, dwc.get_codec('fp16'), self_describing=False),
              'nf4': dwc.compress(delta, dwc.get_codec('nf4'), self_describing=False),
              'ours': dwc.compress(delta, dwc.get_codec(cloud_p['dwc.codec']),
                                   cloud_p['dwc.budget_bytes'], self_describing=False)}
    applied = len(round_result.envelope.payload)

    # --- BLIP-2 OPT-2.7B shapes.
    blip = next(c for c in real_configs() if c.name == BLIP2)
    rng = np.random.default_rng(ctx.seed)
    layers = 1 if ctx.quick else REAL_LAYERS
    synth = synthetic_delta(blip, delta_pools(delta), layers, rng)
    encoded = dwc.num_params(synth)
    big_trainable = trainable_params(blip)
    scale = big_trainable / encoded
    big = {'fp16': dwc.compress(synth, dwc.get_codec('fp16'), self_describing=False),
           'nf4': dwc.compress(synth, dwc.get_codec('nf4'), self_describing=False),
           'ours': dwc.compress(synth, dwc.get_codec(cloud_p['dwc.codec']),
                                self_describing=False),
           # A budget of 1 bit per value, as the downlink bench's sparse@1bit rows.
           'ours@1bit': dwc.compress(synth, dwc.get_codec(cloud_p['dwc.codec']),
                                     encoded // 8, self_describing=False)}
    big_bytes = {k: v.stats.nbytes * scale for k, v in big.items()}
    big_nonzero = {k: v.stats.nonzero_fraction * big_trainable for k, v in big.items()}

    def row(direction: str, what: str, nbytes: float, params: float | None, how: str,
            paper: str | None = None) -> dict[str, Any]:
        return {'direction': direction, 'what': what, 'bytes': float(nbytes), 'params': params,
                'how': how, 'paper': paper,
                'seconds': {k: seconds(nbytes, v) for k, v in LINKS.items()}}

    st = {k: v.stats for k, v in codecs.items()}
    rows = [
        row('uplink', f'raw RGB {width}x{height} x{FRAMES}', FRAMES * raw, None, 'computed'),
        row('uplink', f'raw RGB {PAPER_FRAME[0]}x{PAPER_FRAME[1]} x{FRAMES} (paper camera)',
            FRAMES * paper_raw, None, 'computed', 'uplink_raw'),
        row('uplink', f'JPEG q{JPEG_QUALITY} {width}x{height} x{FRAMES}', FRAMES * jpeg_mean,
            None, 'measured'),
        row('uplink', f'all tokens fp16 ({space.num_tokens}x{space.dim}) x{FRAMES}',
            FRAMES * all_fp16, None, 'measured'),
        row('uplink', f'UTS kept ({cfg.pack_dtype}, {np.mean(kept_counts or [0]):.0f} tokens)'
            f' x{FRAMES}', FRAMES * uts_mean, None, 'measured', 'uplink_uts'),
        row('uplink', f'BLIP-2 all tokens fp16 ({n_tok}x{dim}) x{FRAMES}', FRAMES * big_all,
            None, 'computed'),
        row('uplink', f'BLIP-2 UTS kept ({cfg.pack_dtype}, ratio {cfg.keep_ratio:g}) '
            f'x{FRAMES}', FRAMES * big_uts, None, 'computed'),
        row('downlink', 'full student model fp16', 2 * full_params, full_params, 'measured'),
        row('downlink', 'delta fp16', st['fp16'].nbytes, n_trainable, 'measured'),
        row('downlink', 'delta NF4 (bitsandbytes)', st['nf4'].nbytes, n_trainable, 'measured'),
        row('downlink', f'ours: {st["ours"].codec}', st['ours'].nbytes,
            st['ours'].nonzero_fraction * n_trainable, 'measured'),
        row('downlink', 'BLIP-2 OPT-2.7B full model fp16', 2 * blip.total_params,
            blip.total_params, 'computed', 'downlink_full'),
        row('downlink', 'BLIP-2 delta fp16', big_bytes['fp16'], big_trainable, 'computed'),
        row('downlink', 'BLIP-2 delta NF4', big_bytes['nf4'], big_trainable, 'computed'),
        row('downlink', 'BLIP-2 ours (default knobs)', big_bytes['ours'], big_nonzero['ours'],
            'computed'),
        row('downlink', 'BLIP-2 ours (budget 1 bit/value)', big_bytes['ours@1bit'],
            big_nonzero['ours@1bit'], 'computed', 'downlink_dwc'),
    ]
    table = []
    for r in rows:
        paper = PAPER.get(r['paper'] or '', {})
        table.append([r['what'], r['direction'], _params(r['params']), kib(r['bytes']),
                      *(_time(s) for s in r['seconds'].values()),
                      kib(paper.get('bytes')) if paper else '',
                      _time(paper['seconds']) if paper else '', r['how']])
    summary: dict[str, Any] = {
        'uplink': {'raw_bytes_per_frame': raw, 'jpeg_bytes_per_frame': jpeg_mean,
                   'all_tokens_fp16_bytes_per_frame': all_fp16,
                   'uts_bytes_per_frame': uts_mean, 'frames': FRAMES},
        'downlink': {'full_model_fp16_bytes': 2 * full_params,
                     'delta_fp16_bytes': st['fp16'].nbytes, 'delta_nf4_bytes': st['nf4'].nbytes,
                     'ours_bytes': st['ours'].nbytes, 'applied_envelope_payload': applied,
                     'trainable_params': n_trainable, 'model_params': full_params},
        'uts_over_raw': uts_mean / raw,
        'uts_over_jpeg': uts_mean / jpeg_mean,
        'ours_over_full_model': st['ours'].nbytes / (2 * full_params),
        'ours_over_nf4': st['ours'].nbytes / st['nf4'].nbytes,
        'stage1_pass_rate': pass_rate,
        'blip2': {'uts_over_raw_1080p': big_uts / paper_raw,
                  'ours_over_full_model': big_bytes['ours@1bit'] / (2 * blip.total_params),
                  'ours_default_over_full_model': big_bytes['ours'] / (2 * blip.total_params),
                  'ours_bytes': big_bytes['ours@1bit'], 'ours_default_bytes': big_bytes['ours'],
                  'nf4_bytes': big_bytes['nf4'], 'trainable_params': big_trainable,
                  'full_model_fp16_bytes': 2 * blip.total_params},
        'link_bps': LINKS,
        'seconds': {r['what']: r['seconds'] for r in rows},
    }
    path = plot_path(ctx, NAME)
    plot(rows, path)
    notes = [
        f'seed {ctx.seed}; uplink measured on {len(frames)} drifted frames at {width}x{height} '
        f'({per_domain} per domain), {len(kept_bytes)} selected by stage 1 '
        f'({pass_rate:.0%}); rows for {FRAMES} frames (the paper\'s five-frame input), all '
        'assumed selected',
        f'downlink: one AKD round ({steps} steps, batch {batch}) on the uplinked samples; the '
        f'cloud\'s codec and budget ({cloud_p["dwc.codec"]}, {cloud_p["dwc.budget_bytes"]} B), '
        'compact payloads (fixed cost ~60 B); P = values sent (nonzero values for ours); the '
        f'signed payload the device applied was {applied} B',
        'TL = 8 x D / link rate (serialisation only); paper: Gigabit Ethernet, 1920x1080 '
        'RealSense frames, LLaMA-Adapter 7B',
        f'BLIP-2 rows: computed at its shapes; its delta ({big_trainable / 1e6:.2f}M values: '
        f'LoRA r=8 on the OPT attention + MLP, norms, biases, query tokens) is {layers} of '
        f'{blip.layers} layers resampled from this round\'s delta per kind, encoded, scaled to '
        'all layers; "ours" at the codec\'s default knobs and under a budget of 1 bit per '
        'value (the summary\'s figure; the paper sent 1.65M values in 0.791 MB; what such a '
        'payload keeps of the gain, refitted, is measured by the downlink bench)',
        'synthetic frames are flat-shaded, so their JPEGs are far smaller than a real '
        'camera\'s; the raw rows are exact',
        f'![Table 5: bytes per direction]({path.name})',
    ]
    detail = {'rows': rows, 'paper': PAPER, 'markdown': markdown_table(HEADERS, table),
              'codecs': {k: {'codec': v.codec, 'bits_per_param': v.bits_per_param,
                             'rel_l2_error': v.rel_l2_error,
                             'nonzero_fraction': v.nonzero_fraction} for k, v in st.items()},
              'blip2_codecs': {k: {'codec': v.stats.codec,
                                   'bits_per_param': v.stats.bits_per_param}
                               for k, v in big.items()},
              'image_size_uplink': [width, height], 'model_input': IMAGE_SIZE,
              'uts_config': vars(cfg), 'plot': path.name}
    return BenchResult(summary=summary, headers=HEADERS, rows=table, detail=detail, notes=notes)
