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

Teacher and student that cannot load are one FATAL line and a non-zero exit. The ``round.*``,
``akd.*`` and ``dwc.*`` parameters change at runtime (``ros2 param set``) and apply from the next
round; the models, the device, the key and the folders are read-only.
"""
from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rclpy.executors import ExternalShutdownException

from cdcca_ros.core.akd import AKDConfig
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime, RoundResult
from cdcca_ros.core.refit import RefitConfig
from cdcca_ros.core.rounds.anchor import resolve_anchor
from cdcca_ros.core.rounds.config import GuardConfig
from cdcca_ros.core.uts import PackedTokens, unpack_tokens, uplink_bytes
from cdcca_ros.errors import CdccaError, ModelLoadError
from cdcca_ros.msg import AdaptationStatus, DwcDelta, UtsTokens
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    OK,
    RELIABLE_QOS,
    WARN,
    Diagnostics,
    LastError,
    NodeSpinner,
    declare_table,
    destroy_on_error,
    version_label,
)
from cdcca_ros.nodes.delta_msgs import envelope_to_msgs
from cdcca_ros.nodes.lifecycle import ManagedNode
from cdcca_ros.nodes.process import exit_code, failed, one_line, route_logging, run_node


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


def cloud_config(params: dict[str, Any]) -> CloudConfig:
    """Round, AKD and DWC settings from the node's parameters."""
    akd = AKDConfig.from_params(params)
    return CloudConfig(min_samples=params['round.min_samples'],
                       max_wait_s=params['round.max_wait_s'], akd=akd,
                       codec=params['dwc.codec'], budget_bytes=params['dwc.budget_bytes'],
                       refit=RefitConfig(steps=params['dwc.refit_steps']),
                       refit_min_error=params['dwc.refit_min_error'],
                       guard=GuardConfig.from_params(params))


def build_runtime(params: dict[str, Any]) -> CloudRuntime:
    """Load teacher and student and the signing key named by the parameters."""
    from cdcca_ros.models import bundled

    quant = None if params['quantization'] == 'none' else params['quantization']
    teacher = bundled.load(params['teacher'], quant, params['torch_device'])
    student = bundled.load(params['student'], None, params['torch_device'])
    state_dir = Path(params['state_dir'] or Path.home() / '.cdcca' / 'cloud')
    cfg = cloud_config(params)
    anchor = (resolve_anchor(params['guard.anchor'], bundled.resolve(params['student']))
              if cfg.guard.enabled else None)
    return CloudRuntime(teacher, student, signing_key(params, state_dir), cfg,
                        state_dir=state_dir, anchor=anchor)


def tokens_from_msg(msg: UtsTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the kept tokens and their indices (raises WireError on inconsistent data)."""
    k = len(msg.kept_indices)
    packed = PackedTokens(data=bytes(msg.payload), dtype=msg.dtype,
                          scale=[float(s) for s in msg.scales], shape=(k, int(msg.token_dim)))
    tokens = unpack_tokens(packed)
    indices = torch.as_tensor(list(msg.kept_indices), dtype=torch.long)
    return tokens, indices


class CloudNode(ManagedNode):
    """Thin ROS adapter over :class:`CloudRuntime`; a managed (lifecycle) node.

    Lifecycle (:mod:`cdcca_ros.nodes.lifecycle`): configure checks the torch device and loads
    teacher, student and anchor set (or takes ``runtime``), activate starts running rounds,
    deactivate stops starting them (a round in progress completes; samples keep arriving and
    wait), cleanup unloads, shutdown checkpoints every device's state and unloads. Samples
    that arrive while unconfigured are refused (counted). ``autostart`` (default) runs
    configure and activate at start.
    """

    @destroy_on_error
    def __init__(self, runtime: CloudRuntime | None = None, **kwargs: Any) -> None:
        super().__init__('cloud_node', **kwargs)
        self.params = declare_table(self, 'cloud_node', on_change=self._on_param)
        self.fatal_error: str | None = None
        self._given_runtime = runtime
        self.runtime: CloudRuntime | None = None  # set by configure, cleared by cleanup
        self._active = threading.Event()  # set by activate: rounds run
        self._lock = threading.Lock()  # samples vs rounds
        self._stop = threading.Event()
        self.counters = {'samples': 0, 'samples_rejected': 0, 'duplicates': 0, 'rounds': 0,
                         'uplink_bytes': 0, 'downlink_bytes': 0}
        self._round_bytes: dict[str, int] = {}
        self._round_samples: dict[str, int] = {}
        self.errors = LastError()
        self.results: list[RoundResult] = []
        self._delta_pub = self.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)
        self._status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status',
                                                 RELIABLE_QOS)
        self._diag = Diagnostics(self, hardware_id='cloud')
        self.create_subscription(UtsTokens, 'uts_tokens', self._on_tokens, RELIABLE_QOS)
        self.create_timer(1.0, self._report)
        self._threads = [threading.Thread(target=self._round_worker, daemon=True)]
        for t in self._threads:
            t.start()
        if self.params['autostart']:
            # Models to load: in a thread, so the node serves its services meanwhile.
            self.autostart(in_thread=runtime is None, stopping=self._stop.is_set)

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    # ---------------------------------------------------------------- lifecycle
    def _configure(self) -> None:
        """Check the torch device, load teacher and student (or take the runtime given)."""
        runtime = self._given_runtime
        if runtime is None:
            from cdcca_ros.models.registry import check_torch_device

            check_torch_device(self.params['torch_device'])
            try:
                runtime = build_runtime(self.params)
            except Exception as err:  # noqa: BLE001 - whatever stops the load, it is refused
                raise ModelLoadError(f'teacher {self.params["teacher"]!r} / student '
                                     f'{self.params["student"]!r} cannot be loaded on '
                                     f'{self.params["torch_device"]!r}: {one_line(err)}'
                                     ) from err
            if self._stop.is_set():
                raise ModelLoadError('stopped while loading')
            self.get_logger().info('teacher and student ready')
            with self._lock:
                runtime.cfg = cloud_config(self.params)  # changed while loading, maybe
        with self._lock:
            self.runtime = runtime

    def _activate(self) -> None:
        self._active.set()

    def _deactivate(self) -> None:
        self._active.clear()  # a round in progress completes

    def _unload(self) -> None:
        self._active.clear()
        with self._lock:  # after the round in progress, if any
            runtime, self.runtime = self.runtime, None
            if runtime is not None:
                runtime.save()
        gc.collect()

    def _cleanup(self) -> None:
        self._unload()

    def _shutdown(self) -> None:
        self._unload()  # every device's state checkpointed before this returns

    def _on_param(self, changes: dict[str, Any]) -> None:
        """Runtime change of round / AKD / DWC settings: checked together, applied from the next
        round (a round in progress keeps its settings)."""
        cfg = cloud_config({**self.params, **changes})  # raises ConfigError when they clash
        with self._lock:  # rounds hold it: never between two steps of one round
            if self.runtime is not None:
                self.runtime.cfg = cfg

    def _on_tokens(self, msg: UtsTokens) -> None:
        if self.runtime is None:  # unconfigured: no model to check the tokens against
            self.counters['samples_rejected'] += 1
            return
        try:
            tokens, indices = tokens_from_msg(msg)
            with self._lock:
                if self.runtime is None:  # cleaned up meanwhile
                    self.counters['samples_rejected'] += 1
                    return
                fresh = self.runtime.add_sample(msg.device_id, tokens, indices, msg.question,
                                                int(msg.num_tokens), int(msg.token_dim),
                                                msg.sample_id)
        except CdccaError as err:
            self.counters['samples_rejected'] += 1
            self.get_logger().error(self.errors.set(
                'sample', f'sample {msg.sample_id!r} from {msg.device_id!r} rejected: {err}'))
            return
        self.errors.clear('sample')
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
            runtime = self.runtime
            if runtime is None or not self._active.is_set():
                continue
            for device_id in list(runtime.devices):
                with self._lock:
                    due = self.runtime is not None and runtime.due(device_id)
                if due and self._active.is_set():
                    self.run_round(device_id)

    def run_round(self, device_id: str) -> RoundResult | None:
        """Run one round for ``device_id`` and publish its delta and status."""
        t0 = time.perf_counter()
        try:
            with self._lock:
                if self.runtime is None:
                    return None  # unloaded meanwhile (cleanup / shutdown)
                result = self.runtime.run_round(device_id)
        except (CdccaError, RuntimeError, ValueError) as err:
            self.get_logger().error(self.errors.set('round',
                                                    f'round for {device_id!r} failed: {err}'))
            return None
        self.errors.clear('round')
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
            model_version=version_label(device_id, result.envelope.new_version),
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

    def _report(self, lifecycle_state: str | None = None) -> None:
        state = lifecycle_state or self.lifecycle_state
        values: dict[str, Any] = dict(self.counters)
        values.update(self.errors.values())
        values.update(lifecycle_state=state, last_transition=self.last_transition)
        runtime = self.runtime
        if runtime is not None:
            cfg = runtime.cfg
            values['round'] = f'min_samples={cfg.min_samples} max_wait_s={cfg.max_wait_s:g}'
            values['akd'] = f'steps={cfg.akd.steps} lr={cfg.akd.lr:g}'
            values['dwc'] = f'codec={cfg.codec} budget_bytes={cfg.budget_bytes}'
            for device_id, device in list(runtime.devices.items()):
                values[f'{device_id}.version'] = device.version
                values[f'{device_id}.pending'] = device.pending()
        if self.fatal_error:
            values['last_error'] = self.fatal_error
        elif runtime is None and self.transition_error:
            values['last_error'] = values['last_error'] or self.transition_error
        level, text = ((ERROR, 'model failed to load') if self.fatal_error else
                       (WARN, 'loading') if state == 'configuring' else
                       (WARN, f'{state}: no model loaded') if runtime is None else
                       (WARN, 'see last_error') if values['last_error'] else
                       (OK, 'ready') if state == 'active' else
                       (OK, f'{state}: models loaded, no rounds'))
        self._diag.publish(level, text, values)

    def destroy_node(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30.0)  # (models still loading are not waited for: autostart's)
        super().destroy_node()


def _spin(args: list[str] | None) -> int:
    node = CloudNode()
    unroute = route_logging(node)
    spinner = NodeSpinner([node], 'multi_threaded', num_threads=2, stop_when=failed(node))
    try:
        spinner.spin()
    except ExternalShutdownException:
        pass
    finally:
        unroute()
        node.destroy_node()
    return exit_code([node])


def main(args: list[str] | None = None) -> None:
    sys.exit(run_node('cloud_node', _spin, args, table='cloud_node', doc=__doc__, quiet=True))


if __name__ == '__main__':
    main()
