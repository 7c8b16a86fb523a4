"""uts_node: Uncertainty-guided Token Sampling of the device's answered samples.

Runs in the device node's process (``device_node`` starts it when ``uts.enabled``): stage 2
pushes Monte-Carlo dropout masks through a part of the device model, so it needs that model
and its current adapter; sharing the process avoids a second copy of the model and a 100s-of-KB
token tensor per sample on DDS. Samples reach it through an in-process bounded queue (oldest
dropped), so answering never waits for UTS.

A selected sample goes up as its kept tokens (``uts.uplink: tokens``, packed as
``uts.pack_dtype`` says; ``basis`` codes them in the token basis shared with the cloud, under
``uts.budget_bytes``) or as its frame in JPEG (``uts.uplink: image``), see
:mod:`cdcca_ros.core.uplink`.

Topics: out uts_tokens (cdcca_ros/UtsTokens; only the kept tokens and their indices, packed, or
the frame; ``uplink_bytes`` counts the CDR bytes of the content fields),
out uts_heatmap (sensor_msgs/Image), out /diagnostics. Parameters: the ``uts.*`` entries of the
device node's table.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from cdcca_ros.camera.convert import image_to_msg
from cdcca_ros.core.device_runtime import AnsweredSample
from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
from cdcca_ros.core.uplink.image import JPEG_FORMAT
from cdcca_ros.core.uplink.pipeline import BASIS, UplinkPipeline, UplinkSample
from cdcca_ros.core.uts import PACK_DTYPES, UtsConfig, variance_heatmap
from cdcca_ros.errors import CdccaError
from cdcca_ros.msg import UtsTokens
from cdcca_ros.nodes.common import OK, RELIABLE_QOS, SENSOR_QOS, WARN, Diagnostics
from cdcca_ros.nodes.device_node import DeviceNode, spin_device


def uts_config(params: dict[str, Any]) -> UtsConfig:
    """The UTS settings from the device node's ``uts.*`` parameters (a packing UTS does not
    do itself, ``basis``, is left to :class:`UplinkPipeline`: ``ecq`` here)."""
    pack = params['uts.pack_dtype'] if params['uts.pack_dtype'] in PACK_DTYPES else 'ecq'
    return UtsConfig(mc_masks=params['uts.mc_masks'], dropout_p=params['uts.dropout_p'],
                     stage1_mode=params['uts.stage1_mode'],
                     stage1_threshold=params['uts.entropy_threshold'],
                     stage1_fraction=params['uts.top_fraction'],
                     stage1_window=params['uts.window'], stage2_mode=params['uts.stage2_mode'],
                     beta=params['uts.beta'], keep_ratio=params['uts.keep_ratio'],
                     pack_dtype=pack)


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
        model_version=f'{device_id}:v{sample.version}', vision_space=space_id(space),
        question=sample.question, device_answer=sample.text,
        entropy_mean=up.entropy.mean, entropy_max=up.entropy.max,
        num_tokens=int(sample.tokens.shape[0]), token_dim=int(sample.tokens.shape[1]),
        grid_rows=rows, grid_cols=cols, has_cls=space.has_cls, dtype=up.dtype,
        basis_version=up.basis_version)
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


class UtsNode(Node):
    """Selects uncertain samples and tokens of the device node's answers and publishes them."""

    def __init__(self, device: DeviceNode, **kwargs: Any) -> None:
        super().__init__('uts_node', **kwargs)
        self.device = device
        self.cfg = uts_config(device.params)
        self._pipeline: UplinkPipeline | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._pub = self.create_publisher(UtsTokens, 'uts_tokens', RELIABLE_QOS)
        self._heatmap_pub = self.create_publisher(Image, 'uts_heatmap', SENSOR_QOS)
        self._diag = Diagnostics(self, hardware_id=device.params['device_id'])
        self.counters = {'offered': 0, 'selected': 0, 'uplink_bytes': 0, 'tokens_kept': 0,
                         'tokens_total': 0, 'dropped': 0, 'errors': 0}
        self._last_error = ''
        self._packing_note = ''
        self._stop = threading.Event()
        device.listeners.append(self._offer)
        self._thread = threading.Thread(target=self._worker, daemon=True)
        self._thread.start()
        self.create_timer(1.0, self._report)

    def _offer(self, sample: AnsweredSample, header: Header, rgb: np.ndarray) -> None:
        try:
            self._queue.put_nowait((sample, header, rgb))
        except queue.Full:
            self.counters['dropped'] += 1

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
                self._last_error = str(err)
                self.get_logger().error(f'UTS failed on a sample: {err}')

    def _make_pipeline(self) -> UplinkPipeline:
        params = self.device.params
        runtime = self.device.runtime
        space = runtime.model.vision_space()
        packing, basis = params['uts.pack_dtype'], None
        if packing == BASIS and params['uts.uplink'] == 'tokens':
            try:
                basis = device_basis(params, space)
                self._packing_note = f'basis {basis.version}'
            except CdccaError as err:
                packing = 'ecq'
                self._packing_note = f'ecq (basis packing unavailable: {err})'
                self.get_logger().warning(f'uts.pack_dtype basis: {err}; packing ecq instead')
        return UplinkPipeline(self.cfg, runtime.mc_token_features, has_cls=space.has_cls,
                              packing=packing, basis=basis,
                              budget_bytes=params['uts.budget_bytes'],
                              mode=params['uts.uplink'], jpeg_quality=params['uts.jpeg_quality'])

    def process(self, sample: AnsweredSample, header: Header, rgb: np.ndarray
                ) -> UtsTokens | None:
        """Run UTS on one sample; publish and return the uplink message if selected."""
        runtime = self.device.runtime
        if self._pipeline is None:
            self._pipeline = self._make_pipeline()
        self.counters['offered'] += 1
        up = self._pipeline.process(sample.step_probs, sample.tokens, rgb)
        if up is None:
            return None
        space = runtime.model.vision_space()
        self.counters['selected'] += 1
        sample_id = f'{runtime.device_id}-{self.counters["selected"]}'
        msg = to_msg(runtime.device_id, sample_id, sample, up, header, space)
        self._pub.publish(msg)
        self.counters['uplink_bytes'] += up.uplink_bytes
        self.counters['tokens_total'] += msg.num_tokens
        result = up.uts
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

    def _report(self) -> None:
        values = dict(self.counters)
        values['last_error'] = self._last_error
        values['uplink'] = self.device.params['uts.uplink']
        if self._packing_note:
            values['packing'] = self._packing_note
        if self.counters['tokens_total']:
            kept = self.counters['tokens_kept'] / self.counters['tokens_total']
            values['kept_fraction'] = f'{kept:.3f}'
        warn = self._last_error or 'unavailable' in self._packing_note
        self._diag.publish(WARN if warn else OK,
                           'selecting' if self.device.ready else 'waiting for the model', values)

    def destroy_node(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Start the device node with UTS in the same process (UTS needs the device model)."""
    spin_device(args, with_uts=True)


if __name__ == '__main__':
    main()
