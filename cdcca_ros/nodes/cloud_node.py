"""cloud_node: teacher pseudo-labels, AKD on each device's student, DWC deltas (Algorithm 1).

Topics (relative names):
    in  uts_tokens (cdcca_ros/UtsTokens): uplink samples of one or many devices
    out dwc_delta (cdcca_ros/DwcDelta, chunked, reliable + transient local)
    out adaptation_status (cdcca_ros/AdaptationStatus): one per finished round
    out /diagnostics

A round for a device starts when ``round.min_samples`` samples arrived or ``round.max_wait_s``
passed since its first pending sample. Rounds run in a worker thread, one at a time; samples
keep arriving meanwhile. Per-device state (the exact adapter the device holds, the cloud's
trained copy, pending samples) is checkpointed under ``state_dir`` and survives a restart.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import rclpy
import torch
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from cdcca_ros.core.akd import AKDConfig
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime, RoundResult
from cdcca_ros.core.refit import RefitConfig
from cdcca_ros.core.uts import PackedTokens, unpack_tokens, uplink_bytes
from cdcca_ros.errors import CdccaError
from cdcca_ros.msg import AdaptationStatus, DwcDelta, UtsTokens
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    OK,
    RELIABLE_QOS,
    WARN,
    Diagnostics,
    declare_table,
    use_dds_profile,
)
from cdcca_ros.nodes.delta_msgs import envelope_to_msgs


def signing_key(params: dict[str, Any], state_dir: Path):
    """The Ed25519 key that signs deltas: the configured one, or one kept in ``state_dir``.

    A generated key's public half is written next to it (``cloud_public.pem``): copy it to
    the robots (device_node's ``cloud_public_key``).
    """
    from cdcca_ros.core import wire

    if params['signing_key']:
        return wire.load_private_key(params['signing_key'])
    path = state_dir / 'cloud_signing_key.pem'
    if not path.is_file():
        state_dir.mkdir(parents=True, exist_ok=True)
        private, public = wire.generate_keypair()
        wire.save_private_key(private, path)
        wire.save_public_key(public, state_dir / 'cloud_public.pem', overwrite=True)
    return wire.load_private_key(path)


def cloud_signer(params: dict[str, Any], state_dir: Path):
    """The :class:`~cdcca_ros.core.trust.Signer` of deltas: the signing key, the deltas' time to
    live, and the root-signed key list to attach (``key_list``), which must name the key.

    Raises:
        ConfigError: The key list cannot be read or does not list the signing key for deltas.
    """
    from cdcca_ros.core.trust import ROLE_DELTA, KeyList, Signer
    from cdcca_ros.errors import ConfigError, TrustError

    signer = Signer(signing_key(params, state_dir), ttl_s=params['delta_ttl_s'])
    if not params['key_list']:
        return signer
    try:
        data = Path(params['key_list']).read_bytes()
        keys = KeyList.decode(data)
    except (OSError, TrustError) as err:
        raise ConfigError(f'cannot use key list {params["key_list"]}: {err}') from err
    entry = keys.keys.get(signer.key_id)
    if entry is None or ROLE_DELTA not in entry.roles:
        raise ConfigError(f'key list {params["key_list"]} (v{keys.version}) does not let the '
                          f'signing key {signer.key_id} sign deltas: devices would refuse them')
    return Signer(signer.private_key, ttl_s=signer.ttl_s, key_list=data)


def cloud_config(params: dict[str, Any]) -> CloudConfig:
    """Round, AKD and DWC settings from the node's parameters."""
    akd = AKDConfig.from_params(params)
    return CloudConfig(min_samples=params['round.min_samples'],
                       max_wait_s=params['round.max_wait_s'], akd=akd,
                       codec=params['dwc.codec'], budget_bytes=params['dwc.budget_bytes'],
                       refit=RefitConfig(steps=params['dwc.refit_steps']),
                       refit_min_error=params['dwc.refit_min_error'])


def build_runtime(params: dict[str, Any]) -> CloudRuntime:
    """Load teacher and student and the signing key named by the parameters."""
    from cdcca_ros.models import bundled

    quant = None if params['quantization'] == 'none' else params['quantization']
    teacher = bundled.load(params['teacher'], quant, params['torch_device'])
    student = bundled.load(params['student'], None, params['torch_device'])
    state_dir = Path(params['state_dir'] or Path.home() / '.cdcca' / 'cloud')
    return CloudRuntime(teacher, student, cloud_signer(params, state_dir),
                        cloud_config(params), state_dir=state_dir)


def tokens_from_msg(msg: UtsTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the kept tokens and their indices (raises WireError on inconsistent data)."""
    k = len(msg.kept_indices)
    packed = PackedTokens(data=bytes(msg.payload), dtype=msg.dtype,
                          scale=[float(s) for s in msg.scales], shape=(k, int(msg.token_dim)))
    tokens = unpack_tokens(packed)
    indices = torch.as_tensor(list(msg.kept_indices), dtype=torch.long)
    return tokens, indices


class CloudNode(Node):
    """Thin ROS adapter over :class:`CloudRuntime`."""

    def __init__(self, runtime: CloudRuntime | None = None, **kwargs: Any) -> None:
        super().__init__('cloud_node', **kwargs)
        self.params = declare_table(self, 'cloud_node')
        self.runtime = runtime
        self._lock = threading.Lock()  # samples vs rounds
        self._stop = threading.Event()
        self.counters = {'samples': 0, 'samples_rejected': 0, 'duplicates': 0, 'rounds': 0,
                         'uplink_bytes': 0, 'downlink_bytes': 0}
        self._round_bytes: dict[str, int] = {}
        self._round_samples: dict[str, int] = {}
        self._last_error = ''
        self.results: list[RoundResult] = []
        self._delta_pub = self.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)
        self._status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status',
                                                 RELIABLE_QOS)
        self._diag = Diagnostics(self, hardware_id='cloud')
        self.create_timer(1.0, self._report)
        self._threads = [threading.Thread(target=self._round_worker, daemon=True)]
        if runtime is None:
            self._threads.append(threading.Thread(target=self._load, daemon=True))
        else:
            self._subscribe()
        for t in self._threads:
            t.start()

    def _subscribe(self) -> None:
        # Only once the models are loaded: the bridge holds samples until this subscription
        # exists, so none arrives while nothing could take it.
        self.create_subscription(UtsTokens, 'uts_tokens', self._on_tokens, RELIABLE_QOS)

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def _load(self) -> None:
        try:
            runtime = build_runtime(self.params)
            resumed = runtime.resume()  # rounds whose samples arrived before a restart
            self.runtime = runtime
            self._subscribe()
            self.get_logger().info(f'teacher and student ready; resumed devices {resumed}')
        except (CdccaError, OSError, ValueError) as err:
            self._last_error = f'model load failed: {err}'
            self.get_logger().error(self._last_error)

    def _on_tokens(self, msg: UtsTokens) -> None:
        if self.runtime is None:
            self.counters['samples_rejected'] += 1
            return
        try:
            tokens, indices = tokens_from_msg(msg)
            with self._lock:
                fresh = self.runtime.add_sample(msg.device_id, tokens, indices, msg.question,
                                                int(msg.num_tokens), int(msg.token_dim),
                                                msg.sample_id)
        except Exception as err:  # noqa: BLE001 - a sample must never take the cloud down
            self.counters['samples_rejected'] += 1
            self._last_error = (f'sample {msg.sample_id[:64]!r} from {msg.device_id[:64]!r} '
                                f'rejected: {type(err).__name__}: {err}'[:500])
            self.get_logger().error(self._last_error)
            return
        if not fresh:
            self.counters['duplicates'] += 1
            return
        size = uplink_bytes(len(msg.payload), len(msg.scales), len(msg.kept_indices))
        self.counters['samples'] += 1
        self.counters['uplink_bytes'] += size
        self._round_bytes[msg.device_id] = self._round_bytes.get(msg.device_id, 0) + size
        self._round_samples[msg.device_id] = self._round_samples.get(msg.device_id, 0) + 1

    def _round_worker(self) -> None:
        while not self._stop.wait(0.5):
            if self.runtime is None:
                continue
            for device_id in list(self.runtime.devices):
                with self._lock:
                    due = self.runtime.due(device_id)
                if due:
                    self.run_round(device_id)

    def run_round(self, device_id: str) -> RoundResult | None:
        """Run one round for ``device_id`` and publish its delta and status."""
        t0 = time.perf_counter()
        try:
            with self._lock:
                result = self.runtime.run_round(device_id)
        except (CdccaError, RuntimeError, ValueError) as err:
            self._last_error = f'round for {device_id!r} failed: {err}'
            self.get_logger().error(self._last_error)
            return None
        if result is None:
            self.get_logger().warning(f'round for {device_id!r}: no usable pseudo-label')
            return None
        stamp = self.get_clock().now().to_msg()
        for chunk in envelope_to_msgs(result.envelope, self.params['dwc.chunk_bytes'],
                                      num_params=result.stats.num_params,
                                      codec_params={'codec': result.stats.codec}, stamp=stamp):
            self._delta_pub.publish(chunk)
        self.results.append(result)
        self.counters['rounds'] += 1
        self.counters['downlink_bytes'] += result.stats.nbytes
        last = result.losses[-1] if result.losses else {}
        status = AdaptationStatus(
            device_id=device_id, node='cloud', round=result.round,
            state=AdaptationStatus.STATE_ROUND_DONE,
            message=f'{result.samples} samples, {time.perf_counter() - t0:.1f} s',
            model_version=f'v{result.envelope.new_version}',
            uplink_samples=self._round_samples.pop(device_id, 0),
            uplink_bytes=self._round_bytes.pop(device_id, 0),
            downlink_bytes=result.stats.nbytes, bits_per_param=result.stats.bits_per_param,
            losses=[float(last.get(k, float('nan'))) for k in ('total', 'query', 'repr', 'ce')],
            accuracy_before=result.agreement_before, accuracy_after=result.agreement_after)
        status.header.stamp = stamp
        self._status_pub.publish(status)
        first = result.losses[0] if result.losses else {}
        self.get_logger().info(
            f'round {result.round} for {device_id!r}: L_total {first.get("total", 0):.3f} -> '
            f'{last.get("total", 0):.3f} (query {last.get("query", 0):.3f}, repr '
            f'{last.get("repr", 0):.3f}, ce {last.get("ce", 0):.3f}) over {len(result.losses)} '
            f'steps; {result.samples} samples, teacher '
            f'agreement {result.agreement_before:.2f} -> {result.agreement_after:.2f}, delta '
            f'{result.stats.nbytes} B ({result.stats.bits_per_param:.2f} bit/param)')
        return result

    def _report(self) -> None:
        values: dict[str, Any] = dict(self.counters)
        values['last_error'] = self._last_error
        if self.runtime is not None:
            for device_id, state in self.runtime.devices.items():
                values[f'{device_id}.version'] = state.version
                values[f'{device_id}.pending'] = len(state.pending)
        level, text = ((ERROR, 'model failed to load') if self.runtime is None and
                       self._last_error else (WARN, 'loading') if self.runtime is None else
                       (WARN, 'see last_error') if self._last_error else (OK, 'ready'))
        self._diag.publish(level, text, values)

    def destroy_node(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    use_dds_profile()
    try:
        with rclpy.init(args=args):
            node = CloudNode()
            executor = MultiThreadedExecutor(num_threads=2)
            executor.add_node(node)
            try:
                executor.spin()
            finally:
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


if __name__ == '__main__':
    main()
