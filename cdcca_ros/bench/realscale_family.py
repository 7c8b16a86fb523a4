"""One family of the ``realscale`` bench, measured in a process of its own.

``python -m cdcca_ros.bench.realscale_family SETTINGS.json OUT.json`` (started by
:mod:`cdcca_ros.bench.realscale`, one process per family and dtype, so each peak RSS is that
model's and its memory is returned before the next one loads).

On one real-size student with random weights (``real:<name>``, or any spec for tests):

1. answers as the device does (:class:`DeviceRuntime`: vision tokens, greedy decoding; the
   hot-apply probe eager: tracing a billion-parameter model buys nothing), timed per sample;
2. UTS at the device defaults (stage 1 forced to pass so stage 2 runs) per answer;
3. the uplink: a token basis fitted on source-domain frames of the model's own encoder; kept
   tokens coded under the byte budget; their reconstruction error, and that of what the
   language model consumes from them (Q-Former / projector / merger output: the stage the
   teacher shares); the JPEG q90 of the same frame at 640x480 and 1920x1080 (the image mode's
   bytes) and the cloud's encoder time on it;
4. DWC: the real trainable set filled with values resampled per kind from the bundled models'
   measured delta, compressed at the codec's 4 bits and at the measured operating point;
5. hot-apply of signed deltas at that operating point, alone and while another thread answers
   (answers lost = raised, non-finite or timed out);
6. one cloud round per sample: teacher pseudo-label + AKD step when the teacher fits in memory
   too, else the student's own step (forward, backward, AdamW) alone, said so.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

JPEG_QUALITY = 90
FRAME_640 = (640, 480)
FRAME_1080 = (1920, 1080)
# Sample ranges of their own (beyond the benches' and the evaluation's).
START = 3_000_000
FIT_START = 0  # source-domain frames of the training range: what the model was trained on


def memory_available_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (0 when unknown)."""
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def trimmed_spec(spec: str, layers: int | None, workdir: Path) -> tuple[str, dict[str, Any]]:
    """``spec``, or a copy of its real configuration with at most ``layers`` language-model
    layers (what fits), loaded through the same path; returns (spec, what was trimmed)."""
    from cdcca_ros.models import bundled

    if not layers:
        return spec, {}
    src = Path(bundled.resolve(spec))
    dst = workdir / f'{src.name}-{layers}l'
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = json.loads((dst / 'config.json').read_text())
    text = config.get('text_config', config)
    before = int(text['num_hidden_layers'])
    text['num_hidden_layers'] = min(before, int(layers))
    if 'max_window_layers' in text:
        text['max_window_layers'] = text['num_hidden_layers']
    (dst / 'config.json').write_text(json.dumps(config, indent=2))
    return str(dst), {'lm_layers': text['num_hidden_layers'], 'lm_layers_real': before}


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {'n': 0}
    return {'n': int(arr.size), 'median': float(np.median(arr)),
            'p5': float(np.percentile(arr, 5)), 'p95': float(np.percentile(arr, 95))}


def _rel(a: Any, b: Any) -> float:
    den = float(b.float().norm())
    return float((a.float() - b.float()).norm()) / den if den > 0 else math.nan


def synthetic_delta(shapes: dict[str, Any], pools: dict[str, np.ndarray], seed: int
                    ) -> dict[str, Any]:
    """A delta of the trainable set ``shapes`` (name -> tensor) with values resampled per kind
    (LoRA A, LoRA B, norms, biases, other) from ``pools`` (the measured delta, normalised)."""
    import torch

    from cdcca_ros.bench.downlink import _kind

    rng = np.random.default_rng(seed)
    out = {}
    for name, t in shapes.items():
        pool = pools.get(_kind(name))
        if pool is None:
            pool = pools.get('lora_B', next(iter(pools.values())))
        values = rng.choice(pool, size=t.numel(), replace=True).astype(np.float32)
        out[name] = torch.from_numpy(values).reshape(t.shape)
    return out


class _Family:
    """The measurements of one model (see the module docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        self.s = settings
        self.out: dict[str, Any] = {'family': settings['family'], 'spec': settings['spec'],
                                    'dtype': settings['dtype'], 'device': settings['device'],
                                    'notes': []}
        self.workdir = Path(tempfile.mkdtemp(prefix='cdcca-realscale-'))
        torch.manual_seed(int(settings['seed']))
        torch.set_num_threads(int(settings['threads']))

    def note(self, text: str) -> None:
        self.out['notes'].append(text)

    def progress(self, step: str) -> None:
        """One line per step on stderr (a killed process says where it was)."""
        print(f'[realscale {self.s["family"]} {self.s["dtype"]}] {step} (peak RSS '
              f'{peak_rss_mb():.0f} MB)', file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ model
    def load(self) -> Any:
        from cdcca_ros.models import bundled
        from cdcca_ros.models.real import count_params

        s = self.s
        spec, trimmed = trimmed_spec(s['spec'], s.get('lm_layers'), self.workdir)
        if trimmed:
            self.note(f'memory: language model cut to {trimmed["lm_layers"]} of '
                      f'{trimmed["lm_layers_real"]} layers (the largest that fits); figures '
                      'that scale with it are of that model')
        t0 = time.perf_counter()
        quant = s['dtype'] if s['dtype'] in ('4bit', '8bit') else None
        dtype = None if quant else s['dtype']
        if quant:
            from cdcca_ros.models.real import materialize

            spec = str(materialize(spec.removeprefix('real:'), self.workdir / 'weights'))
        model = bundled.load(spec, quantization=quant, device=s['device'], dtype=dtype)
        self.out['load_s'] = time.perf_counter() - t0
        self.out['params'] = count_params(model)
        self.out['trainable_params'] = count_params(model, trainable=True)
        self.out['trimmed'] = trimmed
        space = model.vision_space()
        self.out['vision_space'] = {'dim': space.dim, 'num_tokens': space.num_tokens,
                                    'grid': list(space.grid), 'has_cls': space.has_cls}
        return model

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        import torch

        from cdcca_ros.bench.common import device_uts_config
        from cdcca_ros.bench.uplink import _jpeg_bytes
        from cdcca_ros.core.device_runtime import DeviceRuntime
        from cdcca_ros.core.uts import UtsPipeline
        from cdcca_ros.core.wire import generate_keypair
        from cdcca_ros.sim.domains import DRIFTED, SOURCE
        from cdcca_ros.sim.world import World

        s = self.s
        model = self.load()
        n = int(s['samples'])
        world = World(int(s['seed']))
        # One frame per domain in turn (source, then the drifted ones), at both resolutions.
        domains = ((SOURCE,) + DRIFTED) * (n // (len(DRIFTED) + 1) + 1)
        frames = [world.sample(d, START + i, FRAME_640) for i, d in enumerate(domains[:n + 1])]
        self.out['jpeg_640'] = float(np.mean([_jpeg_bytes(f.image, JPEG_QUALITY)
                                              for f in frames]))
        self.out['jpeg_1080'] = float(np.mean([
            _jpeg_bytes(world.sample(f.domain, f.index, FRAME_1080).image, JPEG_QUALITY)
            for f in frames]))
        self.private, public = generate_keypair()
        t0 = time.perf_counter()
        self.runtime = DeviceRuntime(model, 'robot1', public, self.workdir / 'device',
                                     max_new_tokens=int(s['max_new_tokens']),
                                     trace_probe=False, shadow_probe=True)
        self.out['runtime_setup_s'] = time.perf_counter() - t0

        # 1 + 2: answers and UTS (stage 1 forced to pass: every sample pays stage 2; no
        # audit draw: an audit sample skips stage 2 and goes whole).
        pipeline = UtsPipeline(device_uts_config(stage1_threshold=0.0, audit_fraction=0.0),
                               self.runtime.mc_token_features,
                               has_cls=model.vision_space().has_cls)
        answer_ms, uts_ms, answered, results = [], [], [], []
        for i, f in enumerate(frames):
            t0 = time.perf_counter()
            a = self.runtime.answer(f.image, f.question)
            t_answer = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            r = pipeline.process(a.step_probs, a.tokens)
            t_uts = (time.perf_counter() - t0) * 1e3
            if i == 0:
                continue  # warm-up
            answer_ms.append(t_answer)
            uts_ms.append(t_uts)
            answered.append((f, a))
            results.append(r)
        self.out['answer_ms'] = _percentiles(answer_ms)
        self.out['uts_ms'] = _percentiles(uts_ms)
        self.out['uts_over_answer'] = float(np.median(uts_ms) / np.median(answer_ms))
        self.out['answer_text'] = answered[0][1].text
        self.out['ecq_uplink_bytes'] = float(np.mean([r.uplink_bytes for r in results]))
        self.progress('answers and UTS done')
        sent = self.uplink(model, answered, results)
        self.progress('uplink done')
        self.dwc_and_apply(answered)
        self.progress('DWC and hot-apply done')
        gc.collect()
        self.cloud_round(model, sent)
        self.progress('round done')
        if s['device'].startswith('cuda'):
            self.out['peak_gpu_mb'] = torch.cuda.max_memory_allocated() / 2**20
        self.out['peak_rss_mb'] = peak_rss_mb()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.out

    # ------------------------------------------------------------------ uplink
    def uplink(self, model: Any, answered: list[Any], results: list[Any]
               ) -> list[tuple[Any, Any, str]]:
        """Measure the uplink; returns what the cloud decodes at the chosen setting per sample
        (tokens, indices, question)."""
        import torch

        from cdcca_ros.core.uplink.basis import fit_basis, space_id
        from cdcca_ros.core.uplink.image import decode_jpeg, encode_jpeg
        from cdcca_ros.core.uts import select_tokens
        from cdcca_ros.sim.domains import SOURCE
        from cdcca_ros.sim.world import World

        s = self.s
        space = model.vision_space()
        fit_frames = World(int(s['seed']) + 7).samples(SOURCE, int(s['fit_frames']), FRAME_640,
                                                       start=FIT_START)
        t0 = time.perf_counter()
        with torch.no_grad():
            fit_tokens = torch.cat([model.vision_tokens([f.image]).float().cpu()
                                    for f in fit_frames])
        basis = fit_basis(fit_tokens, space_id(space))
        self.out['basis'] = {'fit_s': time.perf_counter() - t0, 'fit_tokens':
                             int(fit_tokens.shape[0] * fit_tokens.shape[1]),
                             'rank': basis.rank, 'dim': basis.dim,
                             'file_bytes': basis.rank * basis.dim * 4 + basis.dim * 4
                             + basis.rank * 4}
        budget, keep = int(s['budget']), float(s['keep_ratio'])
        budgets = sorted({budget, *[int(b) for b in s['budget_sweep']]})
        keeps = sorted({keep, *[float(k) for k in s['keep_sweep']]})
        has_cls = space.has_cls
        rows: dict[str, dict[str, list[float]]] = {}
        chosen: dict[str, list[float]] = {'bytes': [], 'token_err': [], 'embed_err': [],
                                          'pack_ms': [], 'decode_ms': []}
        encode_ms, image_bytes = [], []
        sent: list[tuple[Any, Any, str]] = []
        for (frame, a), r in zip(answered, results, strict=True):
            tokens = a.tokens.detach().float().cpu()
            for k in keeps:
                idx = select_tokens(r.variance, keep_ratio=k, always_keep_cls=has_cls)
                exact = tokens.index_select(0, idx)
                with torch.no_grad():
                    exact_embeds = model._image_embeds(exact[None].to(model.device,
                                                                      model._vision_dtype()),
                                                       idx[None])[0].float()
                for b in budgets:
                    try:
                        t0 = time.perf_counter()
                        packed = basis.pack(exact, idx, tokens.shape[0], budget_bytes=b)
                        t_pack = (time.perf_counter() - t0) * 1e3
                    except Exception:  # noqa: BLE001 - a budget below the bitmap: no row
                        continue
                    t0 = time.perf_counter()
                    decoded, _ = basis.unpack(packed.data, packed.step, tokens.shape[0],
                                              tokens.shape[1])
                    t_decode = (time.perf_counter() - t0) * 1e3
                    with torch.no_grad():
                        embeds = model._image_embeds(
                            decoded[None].to(model.device, model._vision_dtype()),
                            idx[None])[0].float()
                    row = rows.setdefault(f'keep {k:g} budget {b}', {
                        'bytes': [], 'token_err': [], 'embed_err': [], 'kept': []})
                    row['bytes'].append(len(packed.data))
                    row['token_err'].append(_rel(decoded, exact))
                    row['embed_err'].append(_rel(embeds, exact_embeds))
                    row['kept'].append(int(idx.numel()))
                    if k == keep and b == budget:
                        sent.append((decoded, idx, frame.question))
                        chosen['bytes'].append(len(packed.data))
                        chosen['token_err'].append(row['token_err'][-1])
                        chosen['embed_err'].append(row['embed_err'][-1])
                        chosen['pack_ms'].append(t_pack)
                        chosen['decode_ms'].append(t_decode)
            # Image mode: the frame as JPEG, the cloud encodes it with its own encoder.
            jpeg = encode_jpeg(frame.image, JPEG_QUALITY)
            image_bytes.append(len(jpeg))
            t0 = time.perf_counter()
            with torch.no_grad():
                model.vision_tokens([decode_jpeg(jpeg)])
            encode_ms.append((time.perf_counter() - t0) * 1e3)
        # Content bytes on the link: payload + one scale + three sequence counts (no indices).
        per_sample = float(np.mean(chosen['bytes'])) + 16
        self.out.update({
            'uplink_bytes_per_sample': per_sample,
            'uplink_over_jpeg_640': per_sample / self.out['jpeg_640'],
            'uplink_over_jpeg_1080': per_sample / self.out['jpeg_1080'],
            'uplink_token_rel_err': float(np.mean(chosen['token_err'])),
            'uplink_embed_rel_err': float(np.mean(chosen['embed_err'])),
            'uplink_pack_ms': float(np.median(chosen['pack_ms'])),
            'uplink_decode_ms': float(np.median(chosen['decode_ms'])),
            'uplink_setting': {'keep_ratio': keep, 'budget_bytes': budget},
            'uplink_sweep': {k: {m: float(np.mean(v)) for m, v in row.items()}
                             for k, row in rows.items()},
            'image_mode': {'bytes': float(np.mean(image_bytes)),
                           'cloud_encode_ms': float(np.median(encode_ms))},
        })
        return sent

    # ------------------------------------------------------------------ DWC + apply
    def dwc_and_apply(self, answered: list[Any]) -> None:
        from cdcca_ros.bench.apply import delta_stream
        from cdcca_ros.core import dwc

        s = self.s
        runtime = self.runtime
        base = runtime.model.trainable_state_dict()
        n_params = dwc.num_params(base)
        pools = dict(np.load(s['pools']))
        delta = synthetic_delta(base, pools, int(s['seed']))
        # The measured delta's scale relative to its weights is what the pools keep; give it
        # the trainable set's dtype like a trained delta.
        delta = {k: v.to(base[k].dtype) for k, v in delta.items()}
        codec = dwc.get_codec('sparse')
        t0 = time.perf_counter()
        four = dwc.compress(delta, codec, None, self_describing=False)
        t_four = time.perf_counter() - t0
        bits = float(s['dwc_bits'])
        budget = max(64, int(n_params * bits / 8))
        t0 = time.perf_counter()
        low = dwc.compress(delta, codec, budget, self_describing=False)
        self.out.update({
            'dwc_bytes_4bit': four.stats.nbytes, 'dwc_bits_4bit': four.stats.bits_per_param,
            'dwc_bytes_min': low.stats.nbytes, 'dwc_bits_min': low.stats.bits_per_param,
            'dwc_setting_bits': bits, 'dwc_encode_s': [t_four, time.perf_counter() - t0]})
        del delta, four, low

        # Hot-apply: deltas at that budget, signed; alone, then while a thread answers.
        stream = delta_stream(base, self.private, 'robot1', 'sparse', budget, int(s['seed']))
        applies, lock_ms = [], []
        for _ in range(int(s['applies'])):
            env, _ = next(stream)
            report = runtime.apply(env)
            applies.append(report.apply_ms)
            lock_ms.append(report.swap_ms)
            runtime.flush(timeout=120.0)
        med_answer = self.out['answer_ms']['median']
        env, _ = next(stream)
        frame = answered[0][0]
        outcomes: list[str] = []
        timeout_ms = 20.0 * med_answer
        started = threading.Event()

        def answer_loop(stop: threading.Event) -> None:
            while not stop.is_set():
                started.set()
                t0 = time.perf_counter()
                try:
                    a = runtime.answer(frame.image, frame.question)
                    ok = bool(np.isfinite(a.step_probs).all())
                    outcome = 'ok' if ok else 'non_finite'
                except Exception as err:  # noqa: BLE001 - any failure is a lost answer
                    outcome = f'error: {err}'
                if outcome == 'ok' and (time.perf_counter() - t0) * 1e3 > timeout_ms:
                    outcome = 'timeout'
                outcomes.append(outcome)

        stop = threading.Event()
        thread = threading.Thread(target=answer_loop, args=(stop,), daemon=True)
        thread.start()
        started.wait(60.0)
        report = runtime.apply(env)
        while len(outcomes) < 2 and thread.is_alive():  # one answer overlapping, one after
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=timeout_ms / 1000.0 + 60.0)
        del stream, env  # the cloud-side copies of the trainable set
        self.out.update({
            'apply_ms': _percentiles(applies),
            'apply_over_answer': float(np.median(applies) / med_answer),
            'lock_over_answer': float(np.median(lock_ms) / med_answer),
            'apply_concurrent_ms': report.apply_ms,
            'answers_during_apply': len(outcomes),
            'answers_lost': sum(o != 'ok' for o in outcomes),
            'apply_payload_bytes': report.payload_bytes,
            'probe_shadow': runtime.probe_shadow})

    # ------------------------------------------------------------------ round
    def cloud_round(self, model: Any, sent: list[tuple[Any, Any, str]]) -> None:
        """One round per sample on what the uplink delivered (decoded kept tokens)."""
        import torch

        from cdcca_ros.core.akd import AKDConfig, AkdSample, AKDTrainer
        from cdcca_ros.models import bundled
        from cdcca_ros.models.real import real_model

        s = self.s
        teacher_spec = s.get('teacher_spec')
        samples = [AkdSample(tokens=t.float(), indices=i, question=q) for t, i, q in sent]
        if teacher_spec:
            teacher = bundled.load(teacher_spec, device=s['device'], dtype=s['dtype'])
            trainer = AKDTrainer(teacher, model, AKDConfig(steps=len(samples), batch_size=1,
                                                           lr=1e-4), progress=False)
            t0 = time.perf_counter()
            trainer.fit(samples)
            self.out['round_s_per_sample'] = (time.perf_counter() - t0) / len(samples)
            self.out['round_mode'] = f'teacher {teacher_spec} pseudo-labels + AKD step'
            return
        params = list(model.trainable_parameters().values())
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        model.torch_model.train()
        try:
            for smp in samples:
                t0 = time.perf_counter()
                out = model.forward_train(smp.tokens[None], smp.indices[None],
                                          [smp.question], ['red'])
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
        finally:
            model.torch_model.eval()
        self.out['round_s_per_sample'] = float(np.median(times))
        name = s['spec'].removeprefix('real:')
        teacher = None
        try:
            teacher = real_model(name).teacher
        except Exception:  # noqa: BLE001 - a test spec has no real teacher
            pass
        self.out['round_mode'] = (f'student side alone (forward + backward + AdamW on the '
                                  'trainable set, on the uplinked kept tokens): the teacher '
                                  f'{teacher or ""} does not fit beside it')


def main(argv: list[str]) -> int:
    """``SETTINGS.json OUT.json``: measure one family, write its record."""
    settings = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = _Family(settings).run()
    Path(argv[1]).write_text(json.dumps(out, default=float))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
