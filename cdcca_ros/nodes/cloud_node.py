"""cloud_node: teacher pseudo-labels, AKD on each device's student, DWC deltas (Algorithm 1).

Topics (relative names):
    in  uts_tokens (cdcca_ros/UtsTokens): uplink samples of one or many devices (kept tokens,
        ``basis``-coded ones decoded with ``uplink_basis``, or a JPEG frame the cloud encodes
        with its own vision encoder: backend local only), and the pulled rest of samples'
        tokens (``pulled``)
    in  device_status (cdcca_ros/AdaptationStatus): the devices' own reports, through the
        bridge (a rollback the device carried out moves the cloud's view of it)
    out dwc_delta (cdcca_ros/DwcDelta, chunked, reliable + transient local)
    out token_request (cdcca_ros/TokenRequest): the rest of these samples' tokens, please
    out rollback_order (cdcca_ros/RollbackOrder, signed, reliable + transient local)
    out adaptation_status (cdcca_ros/AdaptationStatus): one per round (round_done / refused,
        the gate's decision in ``detail``; a caption round's message starts ``caption round:``
        and its ``detail`` says ``task: caption``, ``metric: cider``), one per rollback order
        (rollback_ordered)
    out /diagnostics

A round for a device starts when ``round.min_samples`` samples arrived or ``round.max_wait_s``
passed since its first pending sample. Rounds run in a worker thread, one at a time; samples
keep arriving meanwhile. Between rounds the worker labels what arrived and asks the device for
the rest of the tokens of samples the teacher could not label confidently (``guard.pull_below``;
the round does not wait for them: they are labelled again from all tokens when they come). Just
before a round the live audit runs; when it orders a rollback, the order goes out and the
device's rounds wait until the device reports it carried it out (or refused it). Per-device
state (the exact adapter the device holds, the cloud's trained copy, the replay memory) is
checkpointed under ``state_dir`` and survives a restart.

Caption samples (their question a ``describe`` question) are kept apart and run caption rounds
of their own when ``captions.min_samples`` are pending or the first waited
``captions.max_wait_s`` (:mod:`cdcca_ros.core.captions.round`: the teacher's captions as
pseudo-labels, AKD, DWC, a gate on CIDEr-D, a signed delta published like any other). They
need caption heads beside teacher and student (the bundled pair has them); without, with
``captions.enabled`` false, or on ``backend:=ray``, caption samples are refused (counted,
logged).

With ``backend:=ray`` the rounds run on a Ray cluster instead (``ray_address``; a local one
when empty): student workers, a batching teacher service, device state in ``ray.store_dir``
(:mod:`cdcca_ros.core.fleet`). The node stays the same face: samples and reports go to the
fleet's store, the worker thread hands due rounds to it and publishes what comes back.

Teacher and student that cannot load are one FATAL line and a non-zero exit. The ``round.*``,
``akd.*``, ``dwc.*`` and ``captions.*`` (but ``enabled`` and ``anchor_frames``) parameters change
at runtime (``ros2 param set``) and apply from the next round; the models, the device, the key
and the folders are read-only.
"""
from __future__ import annotations

import gc
import itertools
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from rclpy.executors import ExternalShutdownException

from cdcca_ros.core.captions.describe import is_describe
from cdcca_ros.core.cloud_runtime import CloudConfig, CloudRuntime, RoundResult
from cdcca_ros.core.rounds.anchor import resolve_anchor
from cdcca_ros.core.updates import RollbackEnvelope
from cdcca_ros.core.uplink.basis import BASIS_FILE, TokenBasis, space_id
from cdcca_ros.core.uplink.image import JPEG_FORMAT, decode_jpeg
from cdcca_ros.core.uplink.pipeline import IMAGE, decode_tokens
from cdcca_ros.core.uts import SEQUENCE_HEADER_BYTES, uplink_bytes
from cdcca_ros.errors import CdccaError, ModelLoadError, WireError
from cdcca_ros.msg import (
    AdaptationStatus,
    DwcDelta,
    RollbackOrder,
    TokenRequest,
    UtsTokens,
)
from cdcca_ros.nodes.common import (
    DELTA_QOS,
    ERROR,
    OK,
    RELIABLE_QOS,
    UPLINK_QOS,
    WARN,
    Diagnostics,
    LastError,
    NodeSpinner,
    declare_table,
    destroy_on_error,
    version_label,
)
from cdcca_ros.nodes.delta_msgs import envelope_to_msgs
from cdcca_ros.nodes.guard_msgs import (
    detail_json,
    parse_detail,
    parse_version,
    rollback_to_msg,
    token_request,
)
from cdcca_ros.nodes.lifecycle import ManagedNode
from cdcca_ros.nodes.process import exit_code, failed, one_line, route_logging, run_node

# A rollback order the device never answers holds its rounds this long at most.
ROLLBACK_WAIT_S = 600.0


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
    """Round, AKD, DWC and guard settings from the node's parameters."""
    return CloudConfig.from_params(params)


def build_runtime(params: dict[str, Any]) -> CloudRuntime | Any:
    """Load teacher and student and the signing key named by the parameters (``backend``
    ray: start the fleet on Ray instead)."""
    if params['backend'] == 'ray':
        return build_fleet(params)
    from cdcca_ros.models import bundled
    from cdcca_ros.models.caption_head import has_head, load_head

    quant = None if params['quantization'] == 'none' else params['quantization']
    teacher = bundled.load(params['teacher'], quant, params['torch_device'])
    student = bundled.load(params['student'], None, params['torch_device'])
    state_dir = Path(params['state_dir'] or Path.home() / '.cdcca' / 'cloud')
    cfg = cloud_config(params)
    anchor = (resolve_anchor(params['guard.anchor'], bundled.resolve(params['student']))
              if cfg.guard.enabled else None)
    heads = [bundled.resolve(params[which]) for which in ('teacher', 'student')]
    teacher_head, student_head = (
        [load_head(d).to(params['torch_device']) for d in heads]
        if cfg.captions.enabled and all(has_head(d) for d in heads) else (None, None))
    return CloudRuntime(teacher, student, cloud_signer(params, state_dir), cfg,
                        state_dir=state_dir, anchor=anchor, teacher_head=teacher_head,
                        student_head=student_head)


def build_fleet(params: dict[str, Any]) -> Any:
    """The fleet engine on Ray (:class:`cdcca_ros.core.fleet.engine.FleetEngine`): Ray is
    imported here only."""
    from cdcca_ros.core.fleet.engine import FleetEngine, FleetOptions

    state_dir = Path(params['state_dir'] or Path.home() / '.cdcca' / 'cloud')
    quant = None if params['quantization'] == 'none' else params['quantization']
    return FleetEngine(params['teacher'], params['student'], params['torch_device'], quant,
                       cloud_signer(params, state_dir), cloud_config(params),
                       params['guard.anchor'], FleetOptions.from_params(params, state_dir))


def cloud_basis(params: dict[str, Any], space: Any) -> TokenBasis | None:
    """The token basis of basis-coded samples (``uplink_basis``, else beside the student);
    None when there is none (such samples are then refused).

    Args:
        params: The node's parameters.
        space: The student's vision space (``student.vision_space()``; the fleet's ``space``).

    Raises:
        ConfigError: A configured file that cannot be read.
        BasisMismatchError: It belongs to another vision space than the student's.
    """
    from cdcca_ros.models import bundled

    if params['uplink_basis']:
        path = Path(params['uplink_basis'])
    else:
        path = Path(bundled.resolve(params['student'])) / BASIS_FILE
        if not path.is_file():
            return None
    return TokenBasis.load(path, space_id(space))


def tokens_from_msg(msg: UtsTokens, basis: TokenBasis | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the kept tokens and their indices (raises WireError on inconsistent data,
    BasisMismatchError on a sample coded in another token basis)."""
    return decode_tokens(msg.dtype, bytes(msg.payload), [float(s) for s in msg.scales],
                         list(msg.kept_indices), int(msg.num_tokens), int(msg.token_dim),
                         msg.basis_version, basis)


def frame_tokens(msg: UtsTokens, student: Any) -> torch.Tensor:
    """Image uplink: decode the JPEG and encode it with the cloud's own vision encoder.

    Returns:
        ``[N, D]`` tokens (the student's encoder; the teacher shares it, as the cloud runtime
        checks).

    Raises:
        WireError: Not a JPEG frame, or one that does not decode.
    """
    if msg.image.format.lower() not in (JPEG_FORMAT, 'jpg'):
        raise WireError(f'image uplink: format {msg.image.format!r}, expected jpeg')
    rgb = decode_jpeg(bytes(msg.image.data))
    with torch.no_grad():
        return student.vision_tokens([rgb])[0].float().cpu()


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
        self._fleet_busy = threading.Lock()  # backend ray: held by the worker between polls
        self.counters = {'samples': 0, 'samples_rejected': 0, 'duplicates': 0, 'rounds': 0,
                         'uplink_bytes': 0, 'downlink_bytes': 0, 'refused': 0,
                         'audit_samples': 0, 'token_requests': 0, 'pulls_requested': 0,
                         'pulled': 0, 'pulls_unavailable': 0, 'pulls_ignored': 0,
                         'pull_bytes': 0, 'rollbacks_ordered': 0, 'rollbacks_confirmed': 0,
                         'rollbacks_refused': 0, 'device_reports': 0, 'caption_samples': 0,
                         'caption_rounds': 0, 'caption_refused': 0}
        # Device -> (order, when sent): its rounds wait for the device's report.
        self._awaiting: dict[str, tuple[RollbackOrder, float]] = {}
        self._requests = itertools.count(1)
        self._figures: dict[str, Any] = {}  # the last per-device figures on /diagnostics
        self._request_prefix = uuid.uuid4().hex[:8]
        # Uplink since the last round, per (device, task): 'vqa' or 'caption'.
        self._round_bytes: dict[tuple[str, str], int] = {}
        self._round_samples: dict[tuple[str, str], int] = {}
        self.errors = LastError()
        self._token_basis: TokenBasis | bool | None = None  # False: looked, there is none
        self.results: list[RoundResult] = []
        self._delta_pub = self.create_publisher(DwcDelta, 'dwc_delta', DELTA_QOS)
        self._request_pub = self.create_publisher(TokenRequest, 'token_request', RELIABLE_QOS)
        self._order_pub = self.create_publisher(RollbackOrder, 'rollback_order', DELTA_QOS)
        self._status_pub = self.create_publisher(AdaptationStatus, 'adaptation_status',
                                                 RELIABLE_QOS)
        self._diag = Diagnostics(self, hardware_id='cloud')
        self._subscriptions_up: list[Any] = []  # uplink subscriptions while configured
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
            resumed = runtime.resume()  # rounds whose samples arrived before a restart
            self.get_logger().info(f'teacher and student ready; resumed devices {resumed}')
            with self._lock:
                runtime.cfg = cloud_config(self.params)  # changed while loading, maybe
        with self._lock:
            self.runtime = runtime
        self._subscribe()

    def _activate(self) -> None:
        self._active.set()

    def _subscribe(self) -> None:
        """Take samples and device reports while the models are loaded (configured: kept,
        inactive or active; rounds run only when active). Without a model the node does not
        subscribe, and the cloud bridge keeps the uplink in its inbox: published to nobody,
        samples that arrive while the cloud starts, restarts or is unloaded would be lost."""
        if self._subscriptions_up:
            return
        self._subscriptions_up = [
            self.create_subscription(UtsTokens, 'uts_tokens', self._on_tokens, UPLINK_QOS),
            self.create_subscription(AdaptationStatus, 'device_status', self._on_device_status,
                                     RELIABLE_QOS)]

    def _unsubscribe(self) -> None:
        subs, self._subscriptions_up = self._subscriptions_up, []
        for sub in subs:
            self.destroy_subscription(sub)

    def _deactivate(self) -> None:
        self._active.clear()  # a round in progress completes

    def _unload(self) -> None:
        self._active.clear()
        self._unsubscribe()  # from now on the bridge keeps what arrives
        fleet = self.runtime if hasattr(self.runtime, 'poll') else None
        with self._fleet_busy:  # backend ray: the worker thread between two polls
            if fleet is not None:
                self._drain_fleet(fleet)
            with self._lock:  # after the round in progress, if any
                runtime, self.runtime = self.runtime, None
                self._token_basis = None  # the next student's, looked up again
                if runtime is not None:
                    runtime.save()
        if fleet is not None:
            fleet.close()  # actors and (a local) Ray stop; committed state stays in the store
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

    def _basis(self) -> TokenBasis | None:
        """The cloud's token basis, loaded on first use (None: there is none)."""
        runtime = self.runtime
        if self._token_basis is None and runtime is not None:
            student = getattr(runtime, 'student', None)  # backend ray: the fleet's space
            space = student.vision_space() if student is not None else runtime.space
            self._token_basis = cloud_basis(self.params, space) or False
        return self._token_basis or None

    def _on_tokens(self, msg: UtsTokens) -> None:
        if self.runtime is None:  # unconfigured: no model to check the tokens against
            self.counters['samples_rejected'] += 1
            return
        if msg.pulled:
            self._on_pulled(msg)
            return
        try:
            with self._lock:
                if self.runtime is None:  # cleaned up meanwhile
                    self.counters['samples_rejected'] += 1
                    return
                if msg.dtype == IMAGE:
                    student = getattr(self.runtime, 'student', None)
                    if student is None:
                        raise WireError('an image uplink sample needs the cloud\'s student to '
                                        'encode the frame: backend local (the fleet takes '
                                        'tokens only)')
                    tokens, indices = frame_tokens(msg, student), None
                else:
                    tokens, indices = tokens_from_msg(
                        msg, self._basis() if msg.basis_version else None)
                fresh = self.runtime.add_sample(msg.device_id, tokens, indices, msg.question,
                                                int(msg.num_tokens), int(msg.token_dim),
                                                msg.sample_id, device_answer=msg.device_answer,
                                                device_version=parse_version(msg.model_version),
                                                audit=bool(msg.audit))
        except Exception as err:  # noqa: BLE001 - a sample must never take the cloud down
            self.counters['samples_rejected'] += 1
            self.get_logger().error(self.errors.set(
                'sample', f'sample {msg.sample_id[:64]!r} from {msg.device_id[:64]!r} rejected: '
                          f'{type(err).__name__}: {err}'[:500]))
            return
        self.errors.clear('sample')
        if not fresh:
            self.counters['duplicates'] += 1
            return
        size = (SEQUENCE_HEADER_BYTES + len(msg.image.data) if msg.dtype == IMAGE else
                uplink_bytes(len(msg.payload), len(msg.scales), len(msg.kept_indices)))
        self.counters['samples'] += 1
        self.counters['uplink_bytes'] += size
        key = (msg.device_id, 'caption' if is_describe(msg.question) else 'vqa')
        self._round_bytes[key] = self._round_bytes.get(key, 0) + size
        self._round_samples[key] = self._round_samples.get(key, 0) + 1
        if key[1] == 'caption':
            self.counters['caption_samples'] += 1
        if msg.audit:
            self.counters['audit_samples'] += 1

    def _on_pulled(self, msg: UtsTokens) -> None:
        """The rest of a sample's tokens (or word that the device no longer holds it)."""
        try:
            if not len(msg.kept_indices):
                with self._lock:
                    if self.runtime is None:  # unloaded meanwhile (cleanup)
                        return
                    self.runtime.pull_unavailable(msg.device_id, msg.sample_id)
                self.counters['pulls_unavailable'] += 1
                return
            with self._lock:
                if self.runtime is None:  # unloaded meanwhile (cleanup)
                    return
                tokens, indices = tokens_from_msg(
                    msg, self._basis() if msg.basis_version else None)
                merged = self.runtime.add_pulled(msg.device_id, msg.sample_id, tokens, indices)
        except CdccaError as err:
            self.counters['samples_rejected'] += 1
            self.get_logger().error(self.errors.set(
                'pull', f'pulled tokens of {msg.sample_id!r} from {msg.device_id!r} rejected: '
                        f'{err}'))
            return
        self.errors.clear('pull')
        if not merged:  # not asked for, or asked and already answered (a re-delivery)
            self.counters['pulls_ignored'] += 1
            return
        self.counters['pulled'] += 1
        self.counters['pull_bytes'] += uplink_bytes(len(msg.payload), len(msg.scales),
                                                    len(msg.kept_indices))

    def _on_device_status(self, msg: AdaptationStatus) -> None:
        """A device's report: mirror the rollbacks it carried out; release held rounds."""
        if self.runtime is None or msg.device_id not in self.runtime.devices:
            return
        self.counters['device_reports'] += 1
        try:
            detail = parse_detail(msg.detail)
        except CdccaError:
            detail = {}
        if msg.state == AdaptationStatus.STATE_ROLLED_BACK:
            version = parse_version(msg.model_version)
            with self._lock:
                mirrored = version >= 0 and bool(msg.model_hash) and self.runtime.rolled_back(
                    msg.device_id, version, msg.model_hash)
                self._awaiting.pop(msg.device_id, None)
            if mirrored:
                self.counters['rollbacks_confirmed'] += 1
                self.errors.clear('rollback')
                self.get_logger().warning(
                    f'{msg.device_id!r} rolled back to v{version} ({detail.get("kind", "?")}): '
                    f'{msg.message}')
            else:
                self.get_logger().error(self.errors.set(
                    'rollback', f'{msg.device_id!r} reports a rollback to '
                                f'{msg.model_version!r} {msg.model_hash[:12]} this cloud cannot '
                                'mirror (unknown adapter or older version)'))
        elif (msg.state == AdaptationStatus.STATE_REJECTED
              and detail.get('kind') == 'rollback_order'):
            with self._lock:
                held = self._awaiting.pop(msg.device_id, None)
            if held is not None:
                self.counters['rollbacks_refused'] += 1
                self.get_logger().error(self.errors.set(
                    'rollback', f'{msg.device_id!r} refused the rollback order: {msg.message}'))

    def _round_worker(self) -> None:
        while not self._stop.wait(0.5):
            runtime = self.runtime
            if runtime is None or not self._active.is_set():
                continue
            if hasattr(runtime, 'poll'):  # backend ray: the fleet runs the rounds
                self._fleet_loop(runtime)
                continue
            for device_id in list(runtime.devices):
                if not self._active.is_set():
                    break  # deactivated: no further round starts
                self.step(device_id)

    # ---------------------------------------------------------------- backend ray
    def _fleet_loop(self, fleet: Any) -> None:
        """Hand due rounds to the fleet (devices awaiting a rollback report held) and publish
        what comes back, until the node stops or the fleet is unloaded. While inactive no
        round starts; the rounds in flight complete and are published."""
        while not self._stop.is_set():
            with self._fleet_busy:
                if self.runtime is not fleet:
                    return  # unloaded (cleanup / shutdown)
                now = time.monotonic()
                for device_id, (order, sent) in list(self._awaiting.items()):
                    if now - sent > ROLLBACK_WAIT_S:
                        self.get_logger().error(f'{device_id!r} never answered the rollback '
                                                f'order of v{order.from_version}: rounds resume')
                        self._awaiting.pop(device_id, None)
                try:
                    events = fleet.poll(held=set(self._awaiting), timeout=0.25,
                                        dispatch=self._active.is_set())
                except Exception as err:  # noqa: BLE001 - a cluster error: reported, node alive
                    self.get_logger().error(self.errors.set('round', f'fleet: {one_line(err)}'))
                    events = None
                for event in events or ():
                    self._on_fleet_event(event)
            if events is None:
                self._stop.wait(1.0)

    def _drain_fleet(self, fleet: Any, timeout: float = 120.0) -> None:
        """Publish the rounds in flight (none starts) before the fleet is unloaded; a round
        still running after ``timeout`` is left to the store (its device is due again on the
        next load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not fleet.in_flight():
                    return
                events = fleet.poll(held=set(self._awaiting), timeout=0.25, dispatch=False)
            except Exception as err:  # noqa: BLE001 - a cluster error: reported, unload goes on
                self.get_logger().error(self.errors.set('round', f'fleet: {one_line(err)}'))
                return
            for event in events:
                self._on_fleet_event(event)

    def _on_fleet_event(self, event: Any) -> None:
        from cdcca_ros.core.fleet import engine as fleet

        if isinstance(event, fleet.RoundDone):
            self.errors.clear('round')
            self.publish_result(event.device_id, event.result, event.done_t - event.dispatch_t)
        elif isinstance(event, fleet.NoRound):
            self.get_logger().warning(f'round for {event.device_id!r}: no usable pseudo-label')
        elif isinstance(event, fleet.PullsWanted):
            self._request_tokens(event.device_id, event.sample_ids)
        elif isinstance(event, fleet.RollbackOrdered):
            self.order_rollback(event.order, event.figures)
        elif isinstance(event, fleet.Mirrored) and not event.ok:
            self.get_logger().error(self.errors.set(
                'rollback', f'{event.device_id!r} reports a rollback to v{event.version} '
                            f'{event.hash[:12]} this cloud cannot mirror (unknown adapter or '
                            'older version)'))
        elif isinstance(event, fleet.TaskFailed):
            self.get_logger().error(self.errors.set(
                'round', f'round for {event.device_id!r} failed: {event.message}'))
        elif isinstance(event, fleet.WorkerChanged):
            self.get_logger().warning(event.message)

    def step(self, device_id: str) -> RoundResult | None:
        """One pass of the worker for ``device_id``: label what arrived (and ask for pulls);
        when a round is due (answers, captions or both), audit first, then run it (the
        answers' first). Returns the last round's result."""
        try:
            with self._lock:
                if self.runtime is None:
                    return None  # unloaded meanwhile (cleanup / shutdown)
                pulls = self.runtime.label(device_id)
        except (CdccaError, RuntimeError, ValueError) as err:
            self.get_logger().error(self.errors.set('label',
                                                    f'labelling for {device_id!r} failed: {err}'))
            return None
        self.errors.clear('label')
        self._request_tokens(device_id, pulls)
        with self._lock:
            held = self._awaiting.get(device_id)
            if held is not None and time.monotonic() - held[1] > ROLLBACK_WAIT_S:
                self.get_logger().error(f'{device_id!r} never answered the rollback order of '
                                        f'v{held[0].from_version}: rounds resume')
                self._awaiting.pop(device_id)
                held = None
            runtime = self.runtime
            due = held is None and runtime is not None and runtime.due(device_id)
            captions = (held is None and runtime is not None
                        and runtime.caption_due(device_id))
        if not (due or captions) or self.audit(device_id):
            return None
        result = self.run_round(device_id) if due else None
        if captions:
            result = self.run_round(device_id, captions=True) or result
        return result

    def _request_tokens(self, device_id: str, sample_ids: list[str]) -> None:
        if not sample_ids:
            return
        request = token_request(device_id, f'{self._request_prefix}-{next(self._requests)}',
                                sample_ids, stamp=self.get_clock().now().to_msg())
        self._request_pub.publish(request)
        self.counters['token_requests'] += 1
        self.counters['pulls_requested'] += len(sample_ids)

    def audit(self, device_id: str) -> bool:
        """The live audit of the version ``device_id`` runs; True when it ordered a rollback
        (the device's rounds then wait for its report)."""
        try:
            with self._lock:
                if self.runtime is None:
                    return False
                audit = self.runtime.audit(device_id)
        except (CdccaError, RuntimeError, ValueError) as err:
            self.get_logger().error(self.errors.set('audit',
                                                    f'audit for {device_id!r} failed: {err}'))
            return False
        self.errors.clear('audit')
        if audit is None or audit.rollback is None:
            return False
        self.order_rollback(audit.rollback, audit.to_dict())
        return True

    def order_rollback(self, order: RollbackEnvelope, figures: dict[str, Any]) -> None:
        """Send a signed rollback order to its device, report it (``rollback_ordered``, the
        audit's ``figures`` in ``detail``) and hold the device's rounds until it answers."""
        stamp = self.get_clock().now().to_msg()
        msg = rollback_to_msg(order, stamp)
        with self._lock:
            self._awaiting[order.device_id] = (msg, time.monotonic())
            round_ = self.runtime.device(order.device_id).round
        self._order_pub.publish(msg)
        self.counters['rollbacks_ordered'] += 1
        status = AdaptationStatus(
            device_id=order.device_id, node='cloud', round=round_,
            state=AdaptationStatus.STATE_ROLLBACK_ORDERED, message=order.reason[:500],
            model_version=version_label(order.device_id, order.new_version),
            model_hash=order.to_hash,
            accuracy_before=float('nan'), accuracy_after=float('nan'),
            detail=detail_json(figures))
        status.header.stamp = stamp
        self._status_pub.publish(status)
        self.get_logger().warning(f'rollback of {order.device_id!r} v{order.from_version} '
                                  f'ordered: {order.reason}')

    def run_round(self, device_id: str, captions: bool = False) -> RoundResult | None:
        """Run one round for ``device_id`` (``captions``: a caption round on its caption
        samples) and publish its delta (when the gate lets it ship) and its status."""
        t0 = time.perf_counter()
        what = 'caption round' if captions else 'round'
        try:
            with self._lock:
                if self.runtime is None:
                    return None  # unloaded meanwhile (cleanup / shutdown)
                result = (self.runtime.run_caption_round(device_id) if captions
                          else self.runtime.run_round(device_id))
        except (CdccaError, RuntimeError, ValueError) as err:
            self.get_logger().error(self.errors.set('round',
                                                    f'{what} for {device_id!r} failed: {err}'))
            return None
        self.errors.clear('round')
        if result is None:
            self.get_logger().warning(f'{what} for {device_id!r}: no usable pseudo-label')
            return None
        self._request_tokens(device_id, result.pulls)
        return self.publish_result(device_id, result, time.perf_counter() - t0)

    def publish_result(self, device_id: str, result: RoundResult, elapsed_s: float
                       ) -> RoundResult:
        """Publish a round's delta (when the gate let it ship) and its status."""
        self.results.append(result)
        if result.envelope is None:
            return self._refused(device_id, result, elapsed_s)
        stamp = self.get_clock().now().to_msg()
        for chunk in envelope_to_msgs(result.envelope, self.params['dwc.chunk_bytes'],
                                      num_params=result.stats.num_params,
                                      codec_params={'codec': result.stats.codec}, stamp=stamp):
            self._delta_pub.publish(chunk)
        self.counters['rounds'] += 1
        self.counters['downlink_bytes'] += result.stats.nbytes
        caption = getattr(result, 'task', 'vqa') == 'caption'
        self.counters['caption_rounds'] += int(caption)
        status = AdaptationStatus(
            device_id=device_id, node='cloud', round=result.round,
            state=AdaptationStatus.STATE_ROUND_DONE,
            model_version=version_label(device_id, result.envelope.new_version),
            downlink_bytes=result.stats.nbytes, bits_per_param=result.stats.bits_per_param,
            model_hash=result.envelope.new_hash,
            **self._round_fields(device_id, result, f', {elapsed_s:.1f} s'))
        status.header.stamp = stamp
        self._status_pub.publish(status)
        first = result.losses[0] if result.losses else {}
        last = result.losses[-1] if result.losses else {}
        agreement = (f'CIDEr-D vs the teacher {result.agreement_before:.1f} -> '
                     f'{result.agreement_after:.1f}' if caption else
                     f'teacher agreement {result.agreement_before:.2f} -> '
                     f'{result.agreement_after:.2f}')
        self.get_logger().info(
            f'{"caption " if caption else ""}round {result.round} for {device_id!r}: L_total '
            f'{first.get("total", 0):.3f} -> {last.get("total", 0):.3f} (query '
            f'{last.get("query", 0):.3f}, repr {last.get("repr", 0):.3f}, ce '
            f'{last.get("ce", 0):.3f}) over {len(result.losses)} steps; {result.samples} '
            f'samples, {agreement}, delta {result.stats.nbytes} B '
            f'({result.stats.bits_per_param:.2f} bit/param)')
        return result

    def _round_fields(self, device_id: str, result: RoundResult, suffix: str
                      ) -> dict[str, Any]:
        """The AdaptationStatus fields a shipped and a refused round share: the uplink since
        the task's last round, the final losses, the agreement (answers; NaN for a caption
        round, whose CIDEr-D figures are in ``detail``), the summary (``detail``)."""
        task = getattr(result, 'task', 'vqa')
        last = result.losses[-1] if result.losses else {}
        what = 'caption round: ' if task == 'caption' else ''
        nan = float('nan')
        return {
            'message': f'{what}{result.samples} samples{suffix}'[:500],
            'uplink_samples': self._round_samples.pop((device_id, task), 0),
            'uplink_bytes': self._round_bytes.pop((device_id, task), 0),
            'losses': [float(last.get(k, nan)) for k in ('total', 'query', 'repr', 'ce')],
            'accuracy_before': nan if task == 'caption' else result.agreement_before,
            'accuracy_after': nan if task == 'caption' else result.agreement_after,
            'detail': detail_json(result.summary())}

    def _refused(self, device_id: str, result: RoundResult, elapsed_s: float) -> RoundResult:
        """Publish a round whose candidate the gate refused (nothing goes to the device)."""
        self.counters['rounds'] += 1
        self.counters['refused'] += 1
        caption = getattr(result, 'task', 'vqa') == 'caption'
        self.counters['caption_rounds'] += int(caption)
        self.counters['caption_refused'] += int(caption)
        reason = result.decision.reason if result.decision is not None else 'refused'
        state = self.runtime.device(device_id)
        status = AdaptationStatus(
            device_id=device_id, node='cloud', round=result.round,
            state=AdaptationStatus.STATE_REFUSED,
            model_version=version_label(device_id, state.version), model_hash=state.hash,
            **self._round_fields(device_id, result, f', {elapsed_s:.1f} s: {reason}'))
        status.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(status)
        self.get_logger().warning(f'{"caption " if caption else ""}round {result.round} for '
                                  f'{device_id!r} refused by the gate: {reason}')
        return result

    def _device_figures(self) -> dict[str, Any]:
        """Per-device gate, audit and memory figures; while a round holds the runtime, the
        last ones read (diagnostics never wait for a round)."""
        if self.runtime is None or not self._lock.acquire(blocking=False):
            return {**self._figures, 'busy': self.runtime is not None}
        try:
            figures: dict[str, Any] = {}
            for device_id in list(self.runtime.devices):
                state = self.runtime.device(device_id)
                for key, value in self.runtime.status(device_id).items():
                    figures[f'{device_id}.{key}'] = value
                if state.last_gate:
                    figures[f'{device_id}.gate'] = state.last_gate.get('reason', '')
                if getattr(state, 'last_caption_gate', None):
                    figures[f'{device_id}.caption_gate'] = state.last_caption_gate.get(
                        'reason', '')
                if state.last_audit:
                    figures[f'{device_id}.audit'] = state.last_audit.get('reason', '')
        finally:
            self._lock.release()
        self._figures = figures
        return {**figures, 'busy': False}

    def _report(self, lifecycle_state: str | None = None) -> None:
        state = lifecycle_state or self.lifecycle_state
        values: dict[str, Any] = dict(self.counters)
        values.update(self.errors.values())
        values.update(lifecycle_state=state, last_transition=self.last_transition)
        values['awaiting_rollback'] = ','.join(sorted(self._awaiting))
        runtime = self.runtime
        if runtime is not None:
            cfg = runtime.cfg
            values['round'] = f'min_samples={cfg.min_samples} max_wait_s={cfg.max_wait_s:g}'
            values['akd'] = f'steps={cfg.akd.steps} lr={cfg.akd.lr:g}'
            values['dwc'] = f'codec={cfg.codec} budget_bytes={cfg.budget_bytes}'
        values.update(self._device_figures())
        if hasattr(self.runtime, 'figures'):  # backend ray: workers, queue, retries
            values.update(self.runtime.figures())
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
        close = getattr(self.runtime, 'close', None)  # backend ray: actors and Ray stop
        if close is not None:
            close()
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
