"""uts_node: Uncertainty-guided Token Sampling of the device's answered samples.

Runs in the device node's process (``device_node`` starts it when ``uts.enabled``; it has no
process of its own, so no ``main``: ``python -m cdcca_ros.nodes.device_node`` runs both): stage 2
pushes Monte-Carlo dropout masks through a part of the device model, so it needs that model
and its current adapter; sharing the process avoids a second copy of the model and a 100s-of-KB
token tensor per sample on DDS. Samples reach it through an in-process bounded queue (oldest
dropped), so answering never waits for UTS.

A selected sample goes up as its kept tokens (``uts.uplink: tokens``, packed as
``uts.pack_dtype`` says; ``basis``, the default, codes them in the token basis shared with the
cloud under ``uts.budget_bytes``, stage 2 keeping ``uts.basis_keep_ratio`` of them -- all by
default: on the bundled models every token under the budget kept the teacher's answers 0.955
equal to those from all exact tokens, half of them 0.895 at the same bytes; a model without a
basis file packs ``ecq`` at ``uts.keep_ratio`` and says so on diagnostics) or as its frame in
JPEG (``uts.uplink: image``), see :mod:`cdcca_ros.core.uplink`.

Captions (``describe`` questions and the ``caption`` topic, offered while ``uts.captions`` is
on) go through a pipeline of their own: stage 1 on the whole caption's entropy against
``uts.caption_entropy_threshold`` (top_fraction: a window of captions only), no audit draws;
stage 2 and the packing as for answers. The uplinked message carries the ``describe`` question.

Every published sample's full tokens stay in a bounded :class:`~cdcca_ros.core.uts.TokenRing`
(``uts.ring_samples``): when the cloud's teacher cannot label a sample confidently from the kept
tokens it sends a ``token_request``, answered with a *pulled* UtsTokens per requested sample
(the tokens not sent before, packed as the uplink is), or an empty pulled one when the ring no
longer holds it (pulls of a ``basis`` uplink are packed ``ecq``; the image mode sends whole
frames, so nothing is pulled). Audit samples (``uts.audit_fraction``, every token, ``ecq`` when
the uplink packs ``basis``; the whole frame in image mode) are flagged ``audit``.
Sample ids are ``<device>-<boot>-<n>``: ``<boot>`` is drawn at each start, so a restarted node
never reuses an id (the cloud would drop the sample as a re-delivery, and a late token request
for the old sample would be answered with the new one's tokens).

Topics: out uts_tokens (cdcca_ros/UtsTokens; only the kept tokens and their indices, packed, or
the frame; ``uplink_bytes`` counts the CDR bytes of the content fields; pulled answers too),
in token_request (cdcca_ros/TokenRequest), out uts_heatmap (sensor_msgs/Image),
out /diagnostics. Parameters: the ``uts.*`` entries of the device node's table; the selection
settings change at runtime (``ros2 param set /robot1/device_node uts.entropy_threshold 0.2``):
the new settings apply from the next sample (stage 1's window starts over), and diagnostics show
the settings in use.
"""
from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from cdcca_ros.camera.convert import image_to_msg
from cdcca_ros.core.device.answers import AnsweredSample
from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
from cdcca_ros.core.uplink.image import JPEG_FORMAT
from cdcca_ros.core.uplink.pipeline import BASIS, UplinkPipeline, UplinkSample
from cdcca_ros.core.uts import (
    PACK_DTYPES,
    TokenRing,
    UtsConfig,
    pack_tokens,
    uplink_bytes,
    variance_heatmap,
)
from cdcca_ros.errors import CdccaError
from cdcca_ros.msg import TokenRequest, UtsTokens
from cdcca_ros.nodes.common import (
    OK,
    RELIABLE_QOS,
    SENSOR_QOS,
    UPLINK_QOS,
    WARN,
    Diagnostics,
    LastError,
    destroy_on_error,
    version_label,
)


def uts_config(params: dict[str, Any]) -> UtsConfig:
    """The UTS settings from the device node's ``uts.*`` parameters (a packing UTS does not
    do itself, ``basis``, is left to :class:`UplinkPipeline`: ``ecq`` here, which is also the
    packing of pulls and audit samples then)."""
    pack = params['uts.pack_dtype'] if params['uts.pack_dtype'] in PACK_DTYPES else 'ecq'
    return UtsConfig(mc_masks=params['uts.mc_masks'], dropout_p=params['uts.dropout_p'],
                     stage1_mode=params['uts.stage1_mode'],
                     stage1_threshold=params['uts.entropy_threshold'],
                     stage1_fraction=params['uts.top_fraction'],
                     stage1_window=params['uts.window'], stage2_mode=params['uts.stage2_mode'],
                     beta=params['uts.beta'], keep_ratio=params['uts.keep_ratio'],
                     pack_dtype=pack, audit_fraction=params['uts.audit_fraction'])


def caption_uts_config(cfg: UtsConfig, params: dict[str, Any]) -> UtsConfig:
    """``cfg`` for captions: stage 1 on the caption's whole-sequence entropy against
    ``uts.caption_entropy_threshold`` (top_fraction: a window of captions only), no audit
    draws (the audit watches answers); stage 2 and the packing as for answers."""
    return dataclasses.replace(cfg, stage1_threshold=params['uts.caption_entropy_threshold'],
                               audit_fraction=0.0)


def basis_uts_config(cfg: UtsConfig, params: dict[str, Any]) -> UtsConfig:
    """``cfg`` as the ``basis`` packing runs it: stage 2 keeps ``uts.basis_keep_ratio`` of the
    tokens (the byte budget, not the keep ratio, bounds that packing's bytes)."""
    return dataclasses.replace(cfg, keep_ratio=params['uts.basis_keep_ratio'])


def device_basis(params: dict[str, Any], space: Any) -> TokenBasis:
    """The token basis of the device's model (``uts.basis``, else beside the model).

    Raises:
        ConfigError: No basis file, or an unreadable one.
        BasisMismatchError: It belongs to another vision space.
    """
    from cdcca_ros.errors import ConfigError
    from cdcca_ros.models import bundled

    path = Path(params['uts.basis']) if params['uts.basis'] else \
        Path(bundled.resolve(params['model'])) / BASIS_FILE
    if not path.is_file():
        raise ConfigError(f'no token basis at {path} (python -m cdcca_ros.core.uplink.fit '
                          f'--model {params["model"]} writes one)')
    return TokenBasis.load(path, space_id(space))


def to_msg(device_id: str, sample_id: str, sample: AnsweredSample, up: UplinkSample,
           header: Header, space: Any) -> UtsTokens:
    """The uplink message of one selected sample."""
    rows, cols = space.grid
    msg = UtsTokens(
        header=header, device_id=device_id, sample_id=sample_id,
        model_version=version_label(device_id, sample.version), vision_space=space_id(space),
        question=sample.question, device_answer=sample.text,
        entropy_mean=up.entropy.mean, entropy_max=up.entropy.max,
        num_tokens=int(sample.tokens.shape[0]), token_dim=int(sample.tokens.shape[1]),
        grid_rows=rows, grid_cols=cols, has_cls=space.has_cls, dtype=up.dtype,
        audit=bool(up.audit), basis_version=up.basis_version)
    result = up.uts
    if result is None:
        msg.image = CompressedImage(header=header, format=JPEG_FORMAT, data=up.image or b'')
        return msg
    if result.packed.dtype != BASIS:  # 'basis' payloads carry the kept set as a bitmap
        msg.kept_indices = [int(i) for i in result.kept_indices]
        msg.token_variance = [float(result.variance[i]) for i in result.kept_indices]
    msg.scales = [float(s) for s in result.packed.scale]
    msg.payload = result.packed.data
    return msg


def pulled_msg(device_id: str, sample_id: str, rest: tuple[Any, Any] | None, space: Any,
               pack_dtype: str, header: Header) -> UtsTokens:
    """The answer to a token pull: ``rest`` (tokens ``[K', D]``, indices ``[K']``) packed as
    the uplink packs, or an empty pulled message when ``rest`` is None (sample gone)."""
    msg = UtsTokens(header=header, device_id=device_id, sample_id=sample_id, pulled=True,
                    dtype=pack_dtype)
    if space is not None:
        rows, cols = space.grid
        msg.vision_space, msg.num_tokens, msg.token_dim = (space_id(space),
                                                           int(space.num_tokens),
                                                           int(space.dim))
        msg.grid_rows, msg.grid_cols, msg.has_cls = rows, cols, bool(space.has_cls)
    if rest is not None:
        tokens, indices = rest
        packed = pack_tokens(tokens, pack_dtype)
        msg.kept_indices = [int(i) for i in indices]
        msg.scales = [float(s) for s in packed.scale]
        msg.payload = packed.data
    return msg


class DeviceHost(Protocol):
    """What UTS needs of the device node it runs beside (``device_node``'s node)."""

    params: dict[str, Any]
    runtime: Any                 # the DeviceRuntime (None until the model is loaded)
    listeners: list[Callable[[AnsweredSample], None]]
    param_listeners: list[Callable[[dict[str, Any]], None]]
    runtime_listeners: list[Callable[[Any], None]]

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and answering."""


class UtsNode(Node):
    """Selects uncertain samples and tokens of the device node's answers and publishes them."""

    @destroy_on_error
    def __init__(self, device: DeviceHost, **kwargs: Any) -> None:
        super().__init__('uts_node', **kwargs)
        self.device = device
        self.cfg = uts_config(device.params)
        self._params = device.params  # with the runtime changes not yet applied there
        self._pipeline: UplinkPipeline | None = None
        self._caption_pipeline: UplinkPipeline | None = None  # captions' own stage 1
        self._packing_note = ''  # the packing in use, when it is not the one asked for
        self._pipeline_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._queue_max = 0  # longest the hand-off queue got (diagnostics)
        # Sample ids must not repeat across restarts of this process: the cloud remembers the
        # ids it took and drops a repeat as a re-delivery.
        self._boot = uuid.uuid4().hex[:8]
        self._pub = self.create_publisher(UtsTokens, 'uts_tokens', UPLINK_QOS)
        self._heatmap_pub = self.create_publisher(Image, 'uts_heatmap', SENSOR_QOS)
        self._diag = Diagnostics(self, hardware_id=device.params['device_id'])
        self.counters = {'offered': 0, 'selected': 0, 'uplink_bytes': 0, 'tokens_kept': 0,
                         'tokens_total': 0, 'dropped': 0, 'errors': 0, 'audit': 0,
                         'pull_requests': 0, 'pulls_served': 0, 'pulls_missed': 0,
                         'pull_bytes': 0, 'pull_requests_refused': 0,
                         'captions_offered': 0, 'captions_selected': 0}
        self._ring = TokenRing(max_samples=device.params['uts.ring_samples'])
        #: Prefix of this run's sample ids (a new ``<boot>`` at every start).
        self.sample_prefix = f'{device.params["device_id"]}-{secrets.token_hex(3)}'
        self._ring_lock = threading.Lock()  # the worker puts, the request callback reads
        self.create_subscription(TokenRequest, 'token_request', self._on_token_request,
                                 RELIABLE_QOS)
        self.errors = LastError()
        self._stop = threading.Event()
        device.listeners.append(self._offer)
        device.param_listeners.append(self._on_param)
        device.runtime_listeners.append(self._on_runtime)
        self._thread = threading.Thread(target=self._worker, daemon=True)
        self._thread.start()
        self.create_timer(1.0, self._report)

    def _offer(self, sample: AnsweredSample, header: Header, rgb: np.ndarray) -> None:
        try:
            self._queue.put_nowait((sample, header, rgb))
        except queue.Full:
            self.counters['dropped'] += 1
        self._queue_max = max(self._queue_max, self._queue.qsize())

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                sample, header, rgb = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(sample, header, rgb)
            except (CdccaError, RuntimeError, ValueError) as err:
                self.counters['errors'] += 1
                self.get_logger().error(self.errors.set('sample', f'UTS failed on a sample: '
                                                                  f'{err}'))
            else:
                self.errors.clear('sample')

    def _on_param(self, changes: dict[str, Any]) -> None:
        """Runtime change of ``uts.*`` parameters: the new settings, checked together, apply
        from the next sample (raises ConfigError, refusing the set, when they do not fit)."""
        params = {**self.device.params, **changes}
        cfg = uts_config(params)  # UtsConfig checks the combination
        basis_uts_config(cfg, params)  # ... and that of the basis packing
        caption_uts_config(cfg, params)
        with self._pipeline_lock:
            self.cfg, self._params = cfg, params
            self._pipeline = self._caption_pipeline = None  # rebuilt for the next sample

    def _on_runtime(self, runtime: Any) -> None:
        """The device model was (re)loaded or unloaded (lifecycle): a new pipeline on it."""
        with self._pipeline_lock:
            # releases the old model's features function
            self._pipeline = self._caption_pipeline = None

    def _pipeline_for(self, runtime: Any, caption: bool = False) -> UplinkPipeline:
        """The answers' pipeline, or the captions' (their own stage 1, same stage 2)."""
        with self._pipeline_lock:
            if caption:
                if self._caption_pipeline is None:
                    self._caption_pipeline = self._make_pipeline(runtime, caption=True)
                return self._caption_pipeline
            if self._pipeline is None:
                self._pipeline = self._make_pipeline(runtime)
            return self._pipeline

    def _make_pipeline(self, runtime: Any, caption: bool = False) -> UplinkPipeline:
        params = self._params
        space = runtime.model.vision_space()
        packing, basis = params['uts.pack_dtype'], None
        self._packing_note = ''
        if packing == BASIS and params['uts.uplink'] == 'tokens':
            try:
                basis = device_basis(params, space)
                self._packing_note = f'basis {basis.version}'
            except CdccaError as err:
                packing = 'ecq'
                self._packing_note = f'ecq (basis packing unavailable: {err})'
                self.get_logger().warning(f'uts.pack_dtype basis: {err}; packing ecq instead')
        cfg = basis_uts_config(self.cfg, params) if basis is not None else self.cfg
        if caption:
            cfg = caption_uts_config(cfg, params)
        return UplinkPipeline(cfg, runtime.mc_token_features, has_cls=space.has_cls,
                              packing=packing, basis=basis,
                              budget_bytes=params['uts.budget_bytes'],
                              max_error=params['uts.basis_max_error'],
                              audit_packing=params['uts.audit_packing'],
                              mode=params['uts.uplink'], jpeg_quality=params['uts.jpeg_quality'])

    def process(self, sample: AnsweredSample, header: Header, rgb: np.ndarray
                ) -> UtsTokens | None:
        """Run UTS on one sample; publish and return the uplink message if selected."""
        runtime = self.device.runtime
        if runtime is None:
            self.counters['dropped'] += 1  # the model was unloaded meanwhile (cleanup)
            return None
        pipeline = self._pipeline_for(runtime, caption=sample.caption)
        self.counters['offered'] += 1
        self.counters['captions_offered'] += int(sample.caption)
        up = pipeline.process(sample.step_probs, sample.tokens, rgb)
        if up is None:
            return None
        space = runtime.model.vision_space()
        self.counters['selected'] += 1
        self.counters['captions_selected'] += int(sample.caption)
        sample_id = f'{self.sample_prefix}-{self.counters["selected"]}'
        msg = to_msg(runtime.device_id, sample_id, sample, up, header, space)
        result = up.uts
        if up.audit:
            self.counters['audit'] += 1
        elif result is not None:  # an audit sample or a frame went whole: nothing to pull
            with self._ring_lock:
                self._ring.put(sample_id, sample.tokens, result.kept_indices)
        self._pub.publish(msg)
        runtime.note_uplinked(sample.tokens)  # the next update covers scenes like it
        self.counters['uplink_bytes'] += up.uplink_bytes
        self.counters['tokens_total'] += msg.num_tokens
        if result is None:
            return msg
        self.counters['tokens_kept'] += int(result.kept_indices.numel())
        wanted = self._heatmap_pub.get_subscription_count() > 0
        if self.device.params['uts.publish_heatmap'] and wanted:
            variance = (result.variance.cpu().numpy() if hasattr(result.variance, 'cpu')
                        else np.asarray(result.variance))
            heat = variance_heatmap(variance, space.grid, space.has_cls, rgb,
                                    kept=np.asarray(result.kept_indices))
            self._heatmap_pub.publish(image_to_msg(heat, 'rgb8', Image, header=header))
        return msg

    def _on_token_request(self, msg: TokenRequest) -> None:
        """Answer each requested sample with the rest of its tokens (or an empty pulled
        message when the ring no longer holds it)."""
        device_id = self.device.params['device_id']
        if msg.device_id != device_id:
            self.counters['pull_requests_refused'] += 1
            self.get_logger().warning(f'token request {msg.request_id!r} names device '
                                      f'{msg.device_id!r}, this is {device_id!r}: ignored')
            return
        self.counters['pull_requests'] += 1
        runtime = self.device.runtime
        space = runtime.model.vision_space() if runtime is not None else None
        header = Header(stamp=self.get_clock().now().to_msg())
        for sample_id in msg.sample_ids:
            with self._ring_lock:
                rest = self._ring.rest(sample_id)
            try:
                out = pulled_msg(device_id, sample_id, rest, space, self.cfg.pack_dtype, header)
            except (CdccaError, ValueError) as err:
                self.counters['errors'] += 1
                self.get_logger().error(self.errors.set('pull',
                                                        f'pull of {sample_id!r} failed: {err}'))
                out = pulled_msg(device_id, sample_id, None, space, self.cfg.pack_dtype, header)
                rest = None
            self._pub.publish(out)
            if rest is None:
                self.counters['pulls_missed'] += 1
            else:
                self.counters['pulls_served'] += 1
                self.counters['pull_bytes'] += uplink_bytes(len(out.payload), len(out.scales),
                                                            len(out.kept_indices))

    def _report(self) -> None:
        values: dict[str, Any] = dict(self.counters)
        with self._ring_lock:
            values['ring_samples'] = len(self._ring)
            values['ring_bytes'] = self._ring.nbytes
        values.update(self.errors.values())
        pipeline = self._pipeline
        cfg = pipeline.uts.cfg if pipeline is not None else self.cfg
        caption_threshold = self._params['uts.caption_entropy_threshold']
        values.update({'stage1': f'{cfg.stage1_mode} threshold={cfg.stage1_threshold:g} '
                                 f'fraction={cfg.stage1_fraction:g} window={cfg.stage1_window}',
                       'stage2': f'{cfg.stage2_mode} keep_ratio={cfg.keep_ratio:g} '
                                 f'beta={cfg.beta:g} masks={cfg.mc_masks} '
                                 f'p={cfg.dropout_p:g}',
                       'caption_stage1': (f'threshold={caption_threshold:g}'
                                          if self._params['uts.captions'] else 'off'),
                       'pack_dtype': self._params['uts.pack_dtype'],
                       'uplink': self._params['uts.uplink']})
        if self._packing_note:
            values['packing'] = self._packing_note
        values['queue'], values['queue_max'] = self._queue.qsize(), self._queue_max
        values['queue_bound'] = self._queue.maxsize
        if self.counters['tokens_total']:
            kept = self.counters['tokens_kept'] / self.counters['tokens_total']
            values['kept_fraction'] = f'{kept:.3f}'
        warn = values['last_error'] or 'unavailable' in self._packing_note
        self._diag.publish(WARN if warn else OK,
                           'selecting' if self.device.ready else 'waiting for the model', values)

    def destroy_node(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        super().destroy_node()

