"""uts_node: Uncertainty-guided Token Sampling of the device's answered samples.

Runs in the device node's process (``device_node`` starts it when ``uts.enabled``): stage 2
pushes Monte-Carlo dropout masks through a part of the device model, so it needs that model
and its current adapter; sharing the process avoids a second copy of the model and a 100s-of-KB
token tensor per sample on DDS. Samples reach it through an in-process bounded queue (oldest
dropped), so answering never waits for UTS.

Every published sample's full tokens stay in a bounded :class:`~cdcca_ros.core.uts.TokenRing`
(``uts.ring_samples``): when the cloud's teacher cannot label a sample confidently from the kept
tokens it sends a ``token_request``, answered with a *pulled* UtsTokens per requested sample
(the tokens not sent before, packed as the uplink is), or an empty pulled one when the ring no
longer holds it. Audit samples (``uts.audit_fraction``, every token) are flagged ``audit``.
Sample ids are ``<device>-<boot>-<n>``: ``<boot>`` is drawn at each start, so a restarted node
never reuses an id (the cloud would drop the sample as a re-delivery, and a late token request
for the old sample would be answered with the new one's tokens).

Topics: out uts_tokens (cdcca_ros/UtsTokens; only the kept tokens and their indices, packed;
``uplink_bytes`` counts the CDR bytes of indices, scales and payload; pulled answers too),
in token_request (cdcca_ros/TokenRequest), out uts_heatmap (sensor_msgs/Image),
out /diagnostics. Parameters: the ``uts.*`` entries of the device node's table; the selection
settings change at runtime (``ros2 param set /robot1/device_node uts.entropy_threshold 0.2``):
the new settings apply from the next sample (stage 1's window starts over), and diagnostics show
the settings in use.
"""
from __future__ import annotations

import queue
import secrets
import sys
import threading
import uuid
from typing import Any

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from cdcca_ros.camera.convert import image_to_msg
from cdcca_ros.core.device_runtime import AnsweredSample
from cdcca_ros.core.uts import (
    TokenRing,
    UtsConfig,
    UtsPipeline,
    UtsResult,
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
from cdcca_ros.nodes.device_node import DeviceNode, spin_device
from cdcca_ros.nodes.process import run_node


def uts_config(params: dict[str, Any]) -> UtsConfig:
    """The UTS settings from the device node's ``uts.*`` parameters."""
    return UtsConfig(mc_masks=params['uts.mc_masks'], dropout_p=params['uts.dropout_p'],
                     stage1_mode=params['uts.stage1_mode'],
                     stage1_threshold=params['uts.entropy_threshold'],
                     stage1_fraction=params['uts.top_fraction'],
                     stage1_window=params['uts.window'], stage2_mode=params['uts.stage2_mode'],
                     beta=params['uts.beta'], keep_ratio=params['uts.keep_ratio'],
                     pack_dtype=params['uts.pack_dtype'],
                     audit_fraction=params['uts.audit_fraction'])


def space_id(space: Any) -> str:
    """The vision-token space id a sample carries (``UtsTokens.vision_space``)."""
    rows, cols = space.grid
    return (f'{space.encoder}:d{space.dim}:n{space.num_tokens}:g{rows}x{cols}'
            f':{"cls" if space.has_cls else "nocls"}')


def to_msg(device_id: str, sample_id: str, sample: AnsweredSample, result: UtsResult,
           header: Header, space: Any) -> UtsTokens:
    """The uplink message of one selected sample."""
    rows, cols = space.grid
    return UtsTokens(
        header=header, device_id=device_id, sample_id=sample_id,
        model_version=version_label(device_id, sample.version), vision_space=space_id(space),
        question=sample.question, device_answer=sample.text,
        entropy_mean=result.entropy.mean, entropy_max=result.entropy.max,
        num_tokens=int(sample.tokens.shape[0]), token_dim=int(sample.tokens.shape[1]),
        grid_rows=rows, grid_cols=cols, has_cls=space.has_cls,
        kept_indices=[int(i) for i in result.kept_indices],
        token_variance=[float(result.variance[i]) for i in result.kept_indices],
        dtype=result.packed.dtype, scales=[float(s) for s in result.packed.scale],
        payload=result.packed.data, audit=bool(result.audit))


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


class UtsNode(Node):
    """Selects uncertain samples and tokens of the device node's answers and publishes them."""

    @destroy_on_error
    def __init__(self, device: DeviceNode, **kwargs: Any) -> None:
        super().__init__('uts_node', **kwargs)
        self.device = device
        self.cfg = uts_config(device.params)
        self._pipeline: UtsPipeline | None = None
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
                         'pull_bytes': 0, 'pull_requests_refused': 0}
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
        cfg = uts_config({**self.device.params, **changes})  # UtsConfig checks the combination
        with self._pipeline_lock:
            self.cfg = cfg
            self._pipeline = None  # rebuilt with cfg for the next sample

    def _on_runtime(self, runtime: Any) -> None:
        """The device model was (re)loaded or unloaded (lifecycle): a new pipeline on it."""
        with self._pipeline_lock:
            self._pipeline = None  # releases the old model's features function

    def _pipeline_for(self, runtime: Any) -> UtsPipeline:
        with self._pipeline_lock:
            if self._pipeline is None:
                space = runtime.model.vision_space()
                self._pipeline = UtsPipeline(self.cfg, runtime.mc_token_features,
                                             has_cls=space.has_cls)
            return self._pipeline

    def process(self, sample: AnsweredSample, header: Header, rgb: np.ndarray
                ) -> UtsTokens | None:
        """Run both stages on one sample; publish and return the uplink message if selected."""
        runtime = self.device.runtime
        if runtime is None:
            self.counters['dropped'] += 1  # the model was unloaded meanwhile (cleanup)
            return None
        pipeline = self._pipeline_for(runtime)
        self.counters['offered'] += 1
        result = pipeline.process(sample.step_probs, sample.tokens)
        if result is None:
            return None
        space = runtime.model.vision_space()
        self.counters['selected'] += 1
        sample_id = f'{self.sample_prefix}-{self.counters["selected"]}'
        msg = to_msg(runtime.device_id, sample_id, sample, result, header, space)
        if result.audit:
            self.counters['audit'] += 1
        else:  # an audit sample went whole: nothing left to pull
            with self._ring_lock:
                self._ring.put(sample_id, sample.tokens, result.kept_indices)
        self._pub.publish(msg)
        runtime.note_uplinked(sample.tokens)  # the next update covers scenes like it
        self.counters['uplink_bytes'] += result.uplink_bytes
        self.counters['tokens_kept'] += len(msg.kept_indices)
        self.counters['tokens_total'] += msg.num_tokens
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
        cfg = self.cfg
        values.update({'stage1': f'{cfg.stage1_mode} threshold={cfg.stage1_threshold:g} '
                                 f'fraction={cfg.stage1_fraction:g} window={cfg.stage1_window}',
                       'stage2': f'{cfg.stage2_mode} keep_ratio={cfg.keep_ratio:g} '
                                 f'beta={cfg.beta:g} masks={cfg.mc_masks} '
                                 f'p={cfg.dropout_p:g}',
                       'pack_dtype': cfg.pack_dtype})
        values['queue'], values['queue_max'] = self._queue.qsize(), self._queue_max
        values['queue_bound'] = self._queue.maxsize
        if self.counters['tokens_total']:
            kept = self.counters['tokens_kept'] / self.counters['tokens_total']
            values['kept_fraction'] = f'{kept:.3f}'
        self._diag.publish(WARN if values['last_error'] else OK,
                           'selecting' if self.device.ready else 'waiting for the model', values)

    def destroy_node(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Start the device node with UTS in the same process (UTS needs the device model)."""
    sys.exit(run_node('uts_node', lambda argv: spin_device(argv, with_uts=True), args,
                      table='device_node', doc=__doc__, quiet=True))


if __name__ == '__main__':
    main()
