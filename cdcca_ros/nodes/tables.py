"""Parameter tables of every node: the one place where parameters are defined.

Nodes declare their ROS parameters from these tables (with descriptions and ranges, validated,
defaults included); the launch files build their launch arguments from the same tables, and the
project's own runner (``cdcca_ros.runner``) starts the same node set with the same parameters.
This module is pure Python so launch files and tests can read it without a ROS graph.

A parameter marked ``runtime`` can be changed while the node runs (``ros2 param set``, or any
client of the standard parameter services): the node validates the value and applies it. Every
other parameter is declared read-only: it is fixed when the node starts (a model, an id, a key,
a folder) and a set is refused with the reason. ``python -m cdcca_ros.nodes.tables`` prints the
README's parameter tables.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cdcca_ros.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One node parameter.

    Attributes:
        name: parameter name (dots allowed for grouping, e.g. ``uts.keep_ratio``).
        default: default value; its Python type is the parameter's type.
        description: one line for ``ros2 param describe`` and launch-argument help.
        choices: allowed values for string parameters, or None.
        low: inclusive lower bound for numbers, or None.
        high: inclusive upper bound for numbers, or None.
        runtime: the node applies a change while it runs; False: read-only once started.
    """

    name: str
    default: Any
    description: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    runtime: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def range_text(self) -> str:
        """The allowed range as ``[low, high]`` (an open end left empty), or ''."""
        if self.low is None and self.high is None:
            return ''
        low = '' if self.low is None else f'{self.low:g}'
        high = '' if self.high is None else f'{self.high:g}'
        return f'[{low}, {high}]'

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ConfigError."""
        kind = self.type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f'parameter {self.name!r}: expected a bool, got {value!r}')
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f'parameter {self.name!r}: expected {kind.__name__}, got {value!r}')
        if kind is float and not math.isfinite(value):
            raise ConfigError(f'parameter {self.name!r}: {value!r} is not finite')
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f'parameter {self.name!r}: {value!r} is not one of {", ".join(self.choices)}')
        if ((self.low is not None and value < self.low)
                or (self.high is not None and value > self.high)):
            raise ConfigError(f'parameter {self.name!r}: {value!r} is out of range '
                              f'{self.range_text}')
        return value


CAMERA = (
    Param('source', 'synthetic', 'frame source', choices=('synthetic', 'realsense', 'opencv')),
    Param('width', 640, 'image width in pixels', low=16, high=8192),
    Param('height', 480, 'image height in pixels', low=16, high=8192),
    Param('fps', 10.0, 'frames per second to publish (a change reopens the source)',
          low=0.1, high=240.0, runtime=True),
    Param('frame_id', 'camera_color_optical_frame', 'frame_id of published images',
          runtime=True),
    Param('publish_compressed', False, 'also publish sensor_msgs/CompressedImage (JPEG)',
          runtime=True),
    Param('jpeg_quality', 90, 'JPEG quality of the compressed stream', low=1, high=100,
          runtime=True),
    Param('reconnect_period_s', 2.0, 'wait between reconnection attempts', low=0.05,
          high=600.0, runtime=True),
    Param('synthetic.schedule', 'source:60,fog:60,night:60',
          'synthetic source: domain schedule "domain:seconds,..." (cycled)', runtime=True),
    Param('synthetic.seed', 0, 'synthetic source: random seed', low=0, runtime=True),
    Param('realsense.serial', '', 'RealSense serial number; empty: the first device'),
    Param('realsense.enable_depth', False, 'RealSense: also publish depth aligned to colour'),
    Param('opencv.device', '0', 'OpenCV source: device index, file path or stream URL'),
)

DEVICE = (
    Param('device_id', 'robot1', 'this robot\'s id (link key expressions, deltas, samples)'),
    Param('model', 'bundled:student', 'model: a local directory, a hub id, or bundled:student'),
    Param('quantization', 'none', 'load quantized through bitsandbytes (GPU)',
          choices=('none', '4bit', '8bit')),
    Param('torch_device', 'cpu', 'torch device for the model, e.g. cpu or cuda:0'),
    Param('max_new_tokens', 6, 'longest answer in tokens', low=1, high=256, runtime=True),
    Param('frame_max_age_ms', 2000.0, 'refuse to answer about frames older than this',
          low=1.0, high=3.6e6, runtime=True),
    Param('annotate', True, 'publish the annotated image (answer drawn on the frame)',
          runtime=True),
    Param('caption_rate_hz', 0.0, 'publish a caption of the latest frame on `caption` this '
          'often (needs a model with a caption head; 0: off)', low=0.0, high=30.0,
          runtime=True),
    Param('autostart', True, 'configure and activate this lifecycle node at start (false: '
          'wait for lifecycle_msgs transitions, e.g. from a lifecycle manager)'),
    Param('executor', 'events', 'executor of the node process (events: shortest service '
          'latency, one thread)', choices=('events', 'multi_threaded', 'single_threaded')),
    Param('state_dir', '', 'where the current adapter is persisted; empty: ~/.cdcca/<device_id>'),
    Param('cloud_public_key', '', 'Ed25519 public key (PEM) that signs deltas, pinned (no key '
          'rotation); empty: trust_root, or refuse all (warned at start)'),
    Param('trust_root', '', 'Ed25519 root public key (PEM): deltas must be signed by a key of a '
          'key list this root signed (rotation and revocation without re-flashing)'),
    Param('key_list', '', 'initial root-signed key list (JSON) installed with trust_root; newer '
          'ones arrive with the deltas and are kept in state_dir'),
    Param('max_clock_skew_s', 300.0, 'tolerance of the delta and key-list expiry checks for a '
          'device clock behind the cloud\'s', low=0.0, high=86400.0),
    Param('max_delta_bytes', 16 * 1024 * 1024, 'largest delta payload accepted; incomplete '
          'chunked deltas are held in at most twice this', low=1024),
    Param('max_update_ratio', 0.35, 'refuse a delta whose L2 norm exceeds this fraction of the '
          'adapter\'s (bundled cloud rounds: 0.09-0.16; random deltas that break answers: '
          '0.5 and up); 0: no bound', low=0.0),
    Param('max_probe_tv', 1.0, 'refuse a delta that moves the probe\'s first answer-step '
          'distribution by more than this total variation (bundled cloud rounds move it by up '
          'to 0.95); 1: no bound', low=0.01, high=1.0),
    Param('probe_question', 'is there a red square?',
          'question answered on a candidate adapter before it is committed (about a blank '
          'grey image: the bundled model answers it "no")'),
    Param('probe_trace', True, 'run that probe as a torch.jit trace of the model (checked '
          'equal to eager at start; eager when it is not)'),
    Param('probe_shadow', True, 'run that probe on a copy of the model sharing its frozen '
          'weights, so answers wait only for the copy (costs the trainable set once more)'),
    Param('uts.enabled', True, 'run UTS in this process on every answered sample'),
    Param('uts.stage1_mode', 'threshold', 'stage 1 selection (Eq. 2)',
          choices=('threshold', 'top_fraction'), runtime=True),
    Param('uts.entropy_threshold', 0.05, 'stage 1: mean answer entropy above which a sample '
          'goes on (nats)', low=0.0, high=50.0, runtime=True),
    Param('uts.top_fraction', 0.2, 'stage 1: fraction of the window passed on', low=0.0,
          high=1.0, runtime=True),
    Param('uts.captions', True, 'offer captions (describe, the caption topic) to UTS like '
          'answers: selected ones go up for the cloud\'s caption rounds', runtime=True),
    Param('uts.caption_entropy_threshold', 0.3, 'stage 1 for captions: mean entropy over every '
          'step of the caption above which it goes on (nats; bundled student: source ~0.2, '
          'fog ~0.44, night ~0.54); top_fraction ranks captions in a window of their own',
          low=0.0, high=50.0, runtime=True),
    Param('uts.window', 50, 'stage 1: window of recent samples for top_fraction', low=1,
          runtime=True),
    Param('uts.mc_masks', 8, 'stage 2: Monte-Carlo dropout masks M (Eq. 3)', low=2, high=256,
          runtime=True),
    Param('uts.dropout_p', 0.1, 'stage 2: dropout probability', low=0.01, high=0.9,
          runtime=True),
    Param('uts.stage2_mode', 'keep_ratio', 'stage 2 selection (Eq. 4)',
          choices=('threshold', 'keep_ratio'), runtime=True),
    Param('uts.beta', 0.0, 'stage 2: variance threshold beta', low=0.0, runtime=True),
    Param('uts.keep_ratio', 0.5, 'stage 2: fraction of tokens kept', low=0.0, high=1.0,
          runtime=True),
    Param('uts.pack_dtype', 'basis', 'packing of the kept tokens (basis: transform-coded in '
          'the token basis shared with the cloud, under uts.budget_bytes; a model without a '
          'basis file packs ecq and says so)',
          choices=('fp16', 'int8', 'int4', 'ecq', 'basis'), runtime=True),
    Param('uts.basis_keep_ratio', 1.0, 'basis packing: stage-2 keep ratio (uts.keep_ratio '
          'is that of the other packings and of the ecq fallback); the byte budget bounds the '
          'bytes, and at 1.0 every token shares it', low=0.0, high=1.0, runtime=True),
    Param('uts.budget_bytes', 352, 'basis packing: largest payload of one selected sample '
          '(the finest step that fits is used)', low=16, runtime=True),
    Param('uts.basis_max_error', 0.1, 'basis packing: code each sample only as finely as '
          'this relative error of its tokens needs, up to uts.budget_bytes (0: always the '
          'budget); the basis is fitted on source frames, and a shift unlike them coded '
          'under a fixed budget gives the teacher worse tokens to label', low=0.0,
          high=0.999, runtime=True),
    Param('uts.audit_packing', 'basis', 'basis packing: how audit samples (every token) '
          'travel: ecq, or basis (the budget and uts.basis_max_error, as the selected ones)',
          choices=('ecq', 'basis'), runtime=True),
    Param('uts.basis', '', 'basis packing: token basis file; empty: uplink_basis.safetensors '
          'in the model directory (without one the node packs ecq and says so)'),
    Param('uts.uplink', 'tokens', 'what a selected sample sends: its kept tokens, or the frame '
          'as JPEG (image: for a teacher with its own vision encoder)',
          choices=('tokens', 'image')),
    Param('uts.jpeg_quality', 90, 'image uplink: JPEG quality', low=1, high=100, runtime=True),
    Param('uts.publish_heatmap', True, 'publish the token-uncertainty heatmap image',
          runtime=True),
    Param('uts.audit_fraction', 0.2, 'share of all answered samples sent whole, whatever '
          'their uncertainty (the cloud\'s unbiased audit of this device)', low=0.0, high=1.0,
          runtime=True),
    Param('uts.ring_samples', 256, 'recent uplinked samples whose full tokens are kept for '
          'the cloud\'s token pulls', low=1, high=100000),
    Param('guard.entropy_window', 50, 'answers of a new adapter version compared with its '
          'predecessor\'s last answers', low=1, high=100000),
    Param('guard.entropy_ratio', 3.0, 'roll an update back when its mean answer entropy '
          'exceeds the predecessor\'s this many times ...', low=1.0, high=1000.0),
    Param('guard.entropy_min_rise', 1.0, '... and by at least this many nats', low=0.0,
          high=100.0),
    Param('guard.coverage', True, 'answer with the adapter only on frames like those the '
          'update was trained on (uplinked scenes), with the shipped model elsewhere'),
    Param('guard.coverage_margin', 1.25, 'coverage radius: the features\' 99th-percentile '
          'nearest-neighbour distance times this', low=0.1, high=100.0),
    Param('guard.coverage_anchor_base', True, 'a frame nearer an anchor-set sample than any '
          'uplinked one is answered by the shipped model (the anchor is where it is right)'),
    Param('guard.local_rollback', True, 'roll an update back on the device\'s own when its '
          'answers turn unsure (guard.entropy_*); false: only the cloud\'s orders'),
)

CLOUD = (
    Param('teacher', 'bundled:teacher', 'teacher model: directory, hub id or bundled:teacher'),
    Param('student', 'bundled:student', 'base of the devices\' student: directory, hub id, '
          'or bundled:student'),
    Param('torch_device', 'cpu', 'torch device for teacher and students'),
    Param('quantization', 'none', 'load the teacher quantized (GPU)',
          choices=('none', '4bit', '8bit')),
    Param('state_dir', '', 'per-device checkpoints; empty: ~/.cdcca/cloud'),
    Param('signing_key', '', 'Ed25519 private key (PEM) to sign deltas; empty: generate one '
          'in state_dir'),
    Param('autostart', True, 'configure and activate this lifecycle node at start (false: '
          'wait for lifecycle_msgs transitions, e.g. from a lifecycle manager)'),
    Param('key_list', '', 'root-signed key list (JSON) naming signing_key, attached to every '
          'delta so devices that trust the root learn rotations; empty: none (pinned keys)'),
    Param('delta_ttl_s', 7 * 24 * 3600, 'a delta expires this long after it is signed '
          '(devices refuse it later: a held-back delta cannot be replayed)', low=60),
    Param('round.min_samples', 64, 'start a round when this many samples arrived (the '
          'questions the cloud derives from them not counted)', low=1,
          runtime=True),
    Param('round.max_wait_s', 120.0, '... or when this long passed since the first sample',
          low=0.1, runtime=True),
    Param('akd.steps', 40, 'optimiser steps per round', low=1, runtime=True),
    Param('akd.batch_size', 16, 'samples per step', low=1, runtime=True),
    Param('akd.lr', 2e-3, 'learning rate', low=1e-7, high=1.0, runtime=True),
    Param('akd.lambda_query', 1.0, 'weight of L_query (Eq. 6)', low=0.0, runtime=True),
    Param('akd.lambda_repr', 1.0, 'weight of L_repr (Eq. 6)', low=0.0, runtime=True),
    Param('akd.lambda_ce', 1.0, 'weight of L_CE (Eq. 6)', low=0.0, runtime=True),
    Param('akd.min_label_confidence', 0.0, 'drop teacher pseudo-labels less confident than '
          'this (geometric mean of the answer token probabilities)', low=0.0, high=0.999,
          runtime=True),
    Param('dwc.codec', 'sparse', 'delta codec', choices=('fp16', 'nf4', 'sparse'),
          runtime=True),
    Param('dwc.budget_bytes', 65536, 'per-device byte budget of one delta', low=64,
          runtime=True),
    Param('dwc.refit_steps', 150, 'steps retraining the kept coordinates through the codec '
          'when the plain payload is lossy (0: never)', low=0, runtime=True),
    Param('dwc.refit_min_error', 0.2, 'refit when the plain payload\'s relative L2 error '
          'exceeds this', low=0.0, runtime=True),
    Param('dwc.chunk_bytes', 32768, 'largest DwcDelta chunk', low=256, runtime=True),
    Param('uplink_basis', '', 'token basis of basis-coded samples; empty: '
          'uplink_basis.safetensors in the student directory (none: such samples are refused)'),
    Param('guard.enabled', True, 'guarded rounds (replay, anchor, gate, audit); false: the '
          'paper\'s round (train on the round\'s samples, ship every result)'),
    Param('guard.max_steps', 300, 'most optimiser steps of a round (early stopping on '
          'held-out samples ends it sooner)', low=1),
    Param('guard.min_steps', 120, 'fewest steps before early stopping may end a round', low=0),
    Param('guard.data_epochs', 8.0, 'times each labelled sample (new or replayed) is drawn in '
          'a round: sets its length within [min_steps, max_steps]', low=0.1, high=1000.0),
    Param('guard.mix_new', 0.4, 'share of each batch from the round\'s new samples (the rest: '
          'replay and anchor)', low=0.0, high=1.0),
    Param('guard.mix_anchor', 0.3, 'share of each batch from the anchor set', low=0.0,
          high=1.0),
    Param('guard.anchor_loss', 'kd', 'anchor samples train on the KL divergence from the base '
          'student\'s own answer distributions (kd), on L_CE of its answers (ce) or on the '
          'full Eq. 6 (akd)', choices=('kd', 'ce', 'akd')),
    Param('guard.l2sp', 0.01, 'weight of the pull of the trainable set toward the weights the '
          'student shipped with (L2-SP)', low=0.0, high=1e6),
    Param('guard.memory_mb', 64.0, 'replay memory bound per device (MiB)', low=0.01),
    Param('guard.val_fraction', 0.1, 'share of samples held out for early stopping', low=0.0,
          high=0.5),
    Param('guard.gate_fraction', 0.25, 'share of samples held out for the update gate', low=0.0,
          high=0.5),
    Param('guard.audit_gate_fraction', 1.0, 'share of the audit stream\'s samples held out for '
          'the gate and the live audit (the rest train)', low=0.0, high=1.0),
    Param('guard.extra_questions', 4, 'questions the cloud derives from each uplinked '
          'training sample and has the teacher answer on its tokens (no uplink cost)', low=0,
          high=16),
    Param('guard.gate_questions', 4, 'questions the cloud derives from each of the gate\'s '
          'held-out frames; the gate then judges frame by frame (sign test over frames)',
          low=0, high=16),
    Param('guard.question_source', 'templates', 'who writes them: templates (the bundled '
          'world\'s; inert on other questions), none, or module:function'),
    Param('guard.anchor', '', 'anchor set: empty = the student\'s own anchor.safetensors, '
          '"none", or a file'),
    Param('guard.gate', True, 'gate every candidate on held-out new data, replay and anchor'),
    Param('guard.alpha', 0.1, 'gate: significance of the gain on new data (one-sided exact '
          'McNemar)', low=1e-6, high=0.5),
    Param('guard.min_gain', 1.0, 'gate: smallest gain on new data worth an update (points)',
          low=0.0, high=100.0),
    Param('guard.tolerance', 2.0, 'gate: largest fall of a replay slice (points)', low=0.0,
          high=100.0),
    Param('guard.anchor_tolerance', 1.0, 'gate: largest fall of the anchor slice (points)',
          low=0.0, high=100.0),
    Param('guard.anchor_min_broken', 2, 'gate: ... and the anchor falls only when it loses '
          'more than this many samples net', low=0, high=1_000_000),
    Param('guard.harm_alpha', 0.2, 'gate: a replay or new-data cluster slice falls only when '
          'its loss is significant at this level (one-sided exact McNemar)', low=1e-6,
          high=1.0),
    Param('guard.harm_correction', 'holm', 'gate: holm = guard.harm_alpha holds for all those '
          'slices together (Holm step-down), none = for each alone', choices=('holm', 'none')),
    Param('guard.big_fall', 5.0, 'gate: a slice falling by more than this (points) is tested '
          'at guard.harm_alpha alone, outside the correction (0: never)', low=0.0, high=100.0),
    Param('guard.anchor_budget', 3.0, 'gate: largest fall of the anchor slice below the base '
          'student, all updates together (points)', low=0.0, high=100.0),
    Param('guard.gain_on', 'new', 'gate: the slice whose significant gain ships an update: '
          'device (every held-out sample the device sent) or new (those since the last '
          'update)', choices=('device', 'new')),
    Param('guard.gate_new_clusters', True, 'gate: also judge the new data per memory '
          'cluster (a scene of it may not fall, whatever the whole gains; the devices\' audit '
          'samples, uts.audit_fraction, hold its sure frames)'),
    Param('guard.gate_routed', True, 'gate: judge each held-out sample as a device with '
          'guard.coverage answers a fresh frame like it (the candidate where covered, the '
          'shipped student elsewhere); false: the candidate everywhere (devices without '
          'coverage)'),
    Param('guard.gate_coverage_margin', 1.25, 'gate: the devices\' guard.coverage_margin',
          low=0.1, high=100.0),
    Param('guard.derived_min_confidence', 0.98, 'drop teacher labels of derived questions '
          '(guard.extra_questions) less confident than this', low=0.0, high=0.999),
    Param('guard.derived_student_below', 0.99, 'a derived training question keeps its label '
          'only when the device\'s student answers it less confidently than this (0: always)',
          low=0.0, high=0.999),
    Param('guard.min_label_confidence', 0.0, 'drop teacher labels less confident than this',
          low=0.0, high=0.999),
    Param('guard.pull_below', 0.98, 'ask the device for the rest of a sample\'s tokens when '
          'the teacher\'s label from the kept ones is less confident than this (0: never)',
          low=0.0, high=0.999),
    Param('guard.reset_after_refusals', 4, 'after this many candidates in a row refused for '
          'harm, training restarts from the adapter the device holds', low=1, high=1000),
    Param('guard.pull_fraction', 0.25, 'largest share of a round\'s partial samples whose '
          'remaining tokens are pulled (the least confident first)', low=0.0, high=1.0),
    Param('guard.audit', True, 'watch audit samples and order signed rollbacks of versions '
          'that answer worse than their predecessor'),
    Param('guard.audit_alpha', 0.01, 'audit: significance of "worse"', low=1e-6, high=0.5),
    Param('guard.audit_min_drop', 3.0, 'audit: smallest fall that orders a rollback (points)',
          low=0.0, high=100.0),
    Param('captions.enabled', True, 'caption rounds on the caption samples the devices send '
          '(describe questions; needs a caption_head beside teacher and student, else such '
          'samples are refused); false: caption samples are refused'),
    Param('captions.min_samples', 48, 'start a caption round when this many caption samples '
          'arrived', low=1, runtime=True),
    Param('captions.max_wait_s', 300.0, '... or when this long passed since the first',
          low=0.1, runtime=True),
    Param('captions.steps', 100, 'optimiser steps of a caption round (AKD on the teacher\'s '
          'captions, the akd.* loss weights and batch size)', low=1, runtime=True),
    Param('captions.lr', 1e-3, 'learning rate of a caption round', low=1e-7, high=1.0,
          runtime=True),
    Param('captions.min_gain', 5.0, 'caption gate: smallest gain on new caption samples worth '
          'an update (CIDEr-D points, per sample against the teacher\'s caption; sign test at '
          'guard.alpha)', low=0.0, high=1000.0, runtime=True),
    Param('captions.anchor_frames', 128, 'frames of the anchor set captioned by the shipped '
          'student (its own words): trained on and held out for the gate (0: none)', low=0,
          high=100000),
    Param('backend', 'local', 'where rounds run: local (in this process, one after another; '
          'Ray is never imported) or ray (a pool of student workers and a batching teacher '
          'service on a Ray cluster, device state in ray.store_dir)',
          choices=('local', 'ray')),
    Param('ray_address', '', 'backend ray: the cluster to join (a ray.init address: auto, '
          'HOST:6379, ray://HOST:10001); empty: start a local one on this machine'),
    Param('ray.workers', 2, 'backend ray: student workers (each holds one student base and '
          'swaps the devices\' adapters in per round)', low=1, high=4096),
    Param('ray.teachers', 1, 'backend ray: teacher replicas (one per GPU); requests of all '
          'workers are batched on them', low=1, high=1024),
    Param('ray.worker_cpus', 1.0, 'backend ray: CPUs of one worker\'s placement bundle',
          low=0.0, high=1024.0),
    Param('ray.worker_gpus', 0.0, 'backend ray: GPUs of one worker\'s placement bundle '
          '(fractions share a GPU)', low=0.0, high=64.0),
    Param('ray.teacher_cpus', 1.0, 'backend ray: CPUs of one teacher\'s placement bundle',
          low=0.0, high=1024.0),
    Param('ray.teacher_gpus', 0.0, 'backend ray: GPUs of one teacher\'s placement bundle',
          low=0.0, high=64.0),
    Param('ray.store_dir', '', 'backend ray: device state every worker reaches (the same path '
          'on every node: shared storage); empty: <state_dir>/fleet'),
    Param('ray.max_batch', 64, 'backend ray: most samples in one teacher forward', low=1,
          high=65536),
    Param('ray.batch_wait_ms', 5.0, 'backend ray: how long a teacher request waits for others '
          'to share its forward', low=0.0, high=10000.0),
    Param('ray.group_max', 4, 'backend ray: due devices of one uplink group (same kept-token '
          'count) served by one task, their teacher requests batched together (1: one device '
          'per task)', low=1, high=256),
    Param('ray.fairness_floor', 0.75, 'backend ray: smallest share of an equal share of rounds '
          'a due device gets (gate refusals in a row and a small estimated gain lower its '
          'share down to this)', low=0.05, high=1.0),
)

BRIDGE = (
    Param('role', 'device', 'which end of the link this bridge is', choices=('device', 'cloud')),
    Param('device_id', 'robot1', 'device role: this robot\'s id'),
    Param('devices', 'robot1', 'cloud role: comma-separated device ids served'),
    Param('connect', 'tcp/localhost:7447', 'Zenoh endpoint(s) of the router, comma-separated: '
          'tls/HOST:PORT needs certs_dir; tcp/ is plain TCP (one machine, trusted LANs)'),
    Param('certs_dir', '', 'folder with ca.crt and this end\'s <name>.crt and <name>.key '
          '(python -m cdcca_ros.transport.certs writes them); empty: no TLS, tcp/ endpoints '
          'only'),
    Param('spool_dir', '', 'device role: uplink spool; empty: ~/.cdcca/<device_id>/spool'),
    Param('spool_max_bytes', 256 * 1024 * 1024, 'device role: spool size bound (oldest dropped)',
          low=1024),
    Param('store_dir', '', 'cloud role: where received uplink is stored and deduplicated'),
    Param('record_mcap', '', 'cloud role: record everything received to this MCAP file'),
    Param('max_payload_bytes', 64 * 1024 * 1024, 'reject payloads larger than this', low=1024),
)

TABLES: dict[str, tuple[Param, ...]] = {
    'camera_node': CAMERA,
    'device_node': DEVICE,
    'cloud_node': CLOUD,
    'cloud_bridge_node': BRIDGE,
}


def defaults(node: str) -> dict[str, Any]:
    """The default parameter values of ``node``."""
    return {p.name: p.default for p in TABLES[node]}


def unknown_parameters(node: str, names: Iterable[str]) -> ConfigError:
    """The error for parameter names ``node`` does not declare: each with its likely meaning
    (a close known name) and the list of known names."""
    known = [p.name for p in TABLES[node]]
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f'{name!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
    plural = 's' if len(parts) > 1 else ''
    return ConfigError(f'{node}: unknown parameter{plural} {", ".join(parts)}; known: '
                       f'{", ".join(known)}')


def validate(node: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into the defaults of ``node`` and check every value.

    Raises:
        ConfigError: an unknown name or a bad value (the message names both).
    """
    table = {p.name: p for p in TABLES[node]}
    values = defaults(node)
    for name, value in overrides.items():
        if name not in table:
            raise unknown_parameters(node, [name])
        values[name] = table[name].check(value)
    return values


def markdown(node: str) -> str:
    """The parameter table of ``node`` as Markdown (used for the README)."""
    rows = ['| parameter | default | at runtime | description |', '| --- | --- | --- | --- |']
    for p in TABLES[node]:
        extra = f' (one of: {", ".join(p.choices)})' if p.choices else ''
        if p.range_text:
            extra += f' {p.range_text}'
        rows.append(f'| `{p.name}` | `{p.default!r}` | {"yes" if p.runtime else "read-only"} '
                    f'| {p.description}{extra} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    for _name in TABLES:
        print(f'### {_name}\n\n{markdown(_name)}\n')
