"""uts_node: Uncertainty-guided Token Sampling of the device's answered samples.

Runs in the device node's process (``device_node`` starts it when ``uts.enabled``): stage 2
pushes Monte-Carlo dropout masks through a part of the device model, so it needs that model
and its current adapter; sharing the process avoids a second copy of the model and a 100s-of-KB
token tensor per sample on DDS. Samples reach it through an in-process bounded queue (oldest
dropped), so answering never waits for UTS.

Topics: out uts_tokens (cdcca_ros/UtsTokens; only the kept tokens and their indices, packed;
``uplink_bytes`` counts the CDR bytes of indices, scales and payload),
out uts_heatmap (sensor_msgs/Image), out /diagnostics. Parameters: the ``uts.*`` entries of the
device node's table.
"""
from __future__ import annotations

import queue
import threading
import uuid
from typing import Any

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from cdcca_ros.camera.convert import image_to_msg
from cdcca_ros.core.device_runtime import AnsweredSample
from cdcca_ros.core.uts import UtsConfig, UtsPipeline, UtsResult, variance_heatmap
from cdcca_ros.errors import CdccaError
from cdcca_ros.msg import UtsTokens
from cdcca_ros.nodes.common import OK, RELIABLE_QOS, SENSOR_QOS, WARN, Diagnostics
from cdcca_ros.nodes.device_node import DeviceNode, spin_device


def uts_config(params: dict[str, Any]) -> UtsConfig:
    """The UTS settings from the device node's ``uts.*`` parameters."""
    return UtsConfig(mc_masks=params['uts.mc_masks'], dropout_p=params['uts.dropout_p'],
                     stage1_mode=params['uts.stage1_mode'],
                     stage1_threshold=params['uts.entropy_threshold'],
                     stage1_fraction=params['uts.top_fraction'],
                     stage1_window=params['uts.window'], stage2_mode=params['uts.stage2_mode'],
                     beta=params['uts.beta'], keep_ratio=params['uts.keep_ratio'],
                     pack_dtype=params['uts.pack_dtype'])


def to_msg(device_id: str, sample_id: str, sample: AnsweredSample, result: UtsResult,
           header: Header, space: Any) -> UtsTokens:
    """The uplink message of one selected sample."""
    rows, cols = space.grid
    return UtsTokens(
        header=header, device_id=device_id, sample_id=sample_id,
        model_version=f'{device_id}:v{sample.version}',
        vision_space=f'{space.encoder}:d{space.dim}:n{space.num_tokens}:g{rows}x{cols}'
                     f':{"cls" if space.has_cls else "nocls"}',
        question=sample.question, device_answer=sample.text,
        entropy_mean=result.entropy.mean, entropy_max=result.entropy.max,
        num_tokens=int(sample.tokens.shape[0]), token_dim=int(sample.tokens.shape[1]),
        grid_rows=rows, grid_cols=cols, has_cls=space.has_cls,
        kept_indices=[int(i) for i in result.kept_indices],
        token_variance=[float(result.variance[i]) for i in result.kept_indices],
        dtype=result.packed.dtype, scales=[float(s) for s in result.packed.scale],
        payload=result.packed.data)


class UtsNode(Node):
    """Selects uncertain samples and tokens of the device node's answers and publishes them."""

    def __init__(self, device: DeviceNode, **kwargs: Any) -> None:
        super().__init__('uts_node', **kwargs)
        self.device = device
        self.cfg = uts_config(device.params)
        self._pipeline: UtsPipeline | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._queue_max = 0  # longest the hand-off queue got (diagnostics)
        # Sample ids must not repeat across restarts of this process: the cloud remembers the
        # ids it took and drops a repeat as a re-delivery.
        self._boot = uuid.uuid4().hex[:8]
        self._pub = self.create_publisher(UtsTokens, 'uts_tokens', RELIABLE_QOS)
        self._heatmap_pub = self.create_publisher(Image, 'uts_heatmap', SENSOR_QOS)
        self._diag = Diagnostics(self, hardware_id=device.params['device_id'])
        self.counters = {'offered': 0, 'selected': 0, 'uplink_bytes': 0, 'tokens_kept': 0,
                         'tokens_total': 0, 'dropped': 0, 'errors': 0}
        self._last_error = ''
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
                self._last_error = str(err)
                self.get_logger().error(f'UTS failed on a sample: {err}')

    def process(self, sample: AnsweredSample, header: Header, rgb: np.ndarray
                ) -> UtsTokens | None:
        """Run both stages on one sample; publish and return the uplink message if selected."""
        runtime = self.device.runtime
        if self._pipeline is None:
            space = runtime.model.vision_space()
            self._pipeline = UtsPipeline(self.cfg, runtime.mc_token_features,
                                         has_cls=space.has_cls)
        self.counters['offered'] += 1
        result = self._pipeline.process(sample.step_probs, sample.tokens)
        if result is None:
            return None
        space = runtime.model.vision_space()
        self.counters['selected'] += 1
        sample_id = f'{runtime.device_id}-{self._boot}-{self.counters["selected"]}'
        msg = to_msg(runtime.device_id, sample_id, sample, result, header, space)
        self._pub.publish(msg)
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

    def _report(self) -> None:
        values = dict(self.counters)
        values['last_error'] = self._last_error
        values['queue'], values['queue_max'] = self._queue.qsize(), self._queue_max
        values['queue_bound'] = self._queue.maxsize
        if self.counters['tokens_total']:
            kept = self.counters['tokens_kept'] / self.counters['tokens_total']
            values['kept_fraction'] = f'{kept:.3f}'
        self._diag.publish(WARN if self._last_error else OK,
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
