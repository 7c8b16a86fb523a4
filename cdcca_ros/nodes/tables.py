"""Parameter tables of every node: the one place where parameters are defined.

Nodes declare their ROS parameters from these tables (with descriptions and ranges, validated,
defaults included); the launch files build their launch arguments from the same tables, and the
project's own runner (``cdcca_ros.runner``) starts the same node set with the same parameters.
This module is pure Python so launch files and tests can read it without a ROS graph.
"""
from __future__ import annotations

import math
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
    """

    name: str
    default: Any
    description: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def type(self) -> type:
        return type(self.default)

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
        if self.low is not None and value < self.low:
            raise ConfigError(f'parameter {self.name!r}: {value!r} is below {self.low}')
        if self.high is not None and value > self.high:
            raise ConfigError(f'parameter {self.name!r}: {value!r} is above {self.high}')
        return value


CAMERA = (
    Param('source', 'synthetic', 'frame source', choices=('synthetic', 'realsense', 'opencv')),
    Param('width', 640, 'image width in pixels', low=16, high=8192),
    Param('height', 480, 'image height in pixels', low=16, high=8192),
    Param('fps', 10.0, 'frames per second to publish', low=0.1, high=240.0),
    Param('frame_id', 'camera_color_optical_frame', 'frame_id of published images'),
    Param('publish_compressed', False, 'also publish sensor_msgs/CompressedImage (JPEG)'),
    Param('jpeg_quality', 90, 'JPEG quality of the compressed stream', low=1, high=100),
    Param('reconnect_period_s', 2.0, 'wait between reconnection attempts', low=0.05, high=600.0),
    Param('synthetic.schedule', 'source:60,fog:60,night:60',
          'synthetic source: domain schedule "domain:seconds,..." (cycled)'),
    Param('synthetic.seed', 0, 'synthetic source: random seed', low=0),
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
    Param('max_new_tokens', 6, 'longest answer in tokens', low=1, high=256),
    Param('frame_max_age_ms', 2000.0, 'refuse to answer about frames older than this',
          low=1.0, high=3.6e6),
    Param('annotate', True, 'publish the annotated image (answer drawn on the frame)'),
    Param('executor', 'events', 'executor of the node process (events: shortest service '
          'latency, one thread)', choices=('events', 'multi_threaded', 'single_threaded')),
    Param('state_dir', '', 'where the current adapter is persisted; empty: ~/.cdcca/<device_id>'),
    Param('cloud_public_key', '', 'Ed25519 public key (PEM) that signs deltas, pinned (no key '
          'rotation); empty: trust_root, or refuse all'),
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
    Param('probe_question', 'what color is the object?',
          'question answered on a candidate adapter before it is committed'),
    Param('probe_trace', True, 'run that probe as a torch.jit trace of the model (checked '
          'equal to eager at start; eager when it is not)'),
    Param('probe_shadow', True, 'run that probe on a copy of the model sharing its frozen '
          'weights, so answers wait only for the copy (costs the trainable set once more)'),
    Param('uts.enabled', True, 'run UTS in this process on every answered sample'),
    Param('uts.stage1_mode', 'threshold', 'stage 1 selection (Eq. 2)',
          choices=('threshold', 'top_fraction')),
    Param('uts.entropy_threshold', 0.05, 'stage 1: mean answer entropy above which a sample '
          'goes on (nats)', low=0.0, high=50.0),
    Param('uts.top_fraction', 0.2, 'stage 1: fraction of the window passed on', low=0.0, high=1.0),
    Param('uts.window', 50, 'stage 1: window of recent samples for top_fraction', low=1),
    Param('uts.mc_masks', 8, 'stage 2: Monte-Carlo dropout masks M (Eq. 3)', low=2, high=256),
    Param('uts.dropout_p', 0.1, 'stage 2: dropout probability', low=0.01, high=0.9),
    Param('uts.stage2_mode', 'keep_ratio', 'stage 2 selection (Eq. 4)',
          choices=('threshold', 'keep_ratio')),
    Param('uts.beta', 0.0, 'stage 2: variance threshold beta', low=0.0),
    Param('uts.keep_ratio', 0.5, 'stage 2: fraction of tokens kept', low=0.0, high=1.0),
    Param('uts.pack_dtype', 'ecq', 'packing of the kept tokens',
          choices=('fp16', 'int8', 'int4', 'ecq')),
    Param('uts.publish_heatmap', True, 'publish the token-uncertainty heatmap image'),
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
    Param('key_list', '', 'root-signed key list (JSON) naming signing_key, attached to every '
          'delta so devices that trust the root learn rotations; empty: none (pinned keys)'),
    Param('delta_ttl_s', 7 * 24 * 3600, 'a delta expires this long after it is signed '
          '(devices refuse it later: a held-back delta cannot be replayed)', low=60),
    Param('round.min_samples', 32, 'start a round when this many samples arrived', low=1),
    Param('round.max_wait_s', 120.0, '... or when this long passed since the first sample',
          low=0.1),
    Param('akd.steps', 40, 'optimiser steps per round', low=1),
    Param('akd.batch_size', 16, 'samples per step', low=1),
    Param('akd.lr', 2e-3, 'learning rate', low=1e-7, high=1.0),
    Param('akd.lambda_query', 1.0, 'weight of L_query (Eq. 6)', low=0.0),
    Param('akd.lambda_repr', 1.0, 'weight of L_repr (Eq. 6)', low=0.0),
    Param('akd.lambda_ce', 1.0, 'weight of L_CE (Eq. 6)', low=0.0),
    Param('akd.min_label_confidence', 0.0, 'drop teacher pseudo-labels less confident than '
          'this (geometric mean of the answer token probabilities)', low=0.0, high=0.999),
    Param('dwc.codec', 'sparse', 'delta codec', choices=('fp16', 'nf4', 'sparse')),
    Param('dwc.budget_bytes', 65536, 'per-device byte budget of one delta', low=64),
    Param('dwc.refit_steps', 150, 'steps retraining the kept coordinates through the codec '
          'when the plain payload is lossy (0: never)', low=0),
    Param('dwc.refit_min_error', 0.2, 'refit when the plain payload\'s relative L2 error '
          'exceeds this', low=0.0),
    Param('dwc.chunk_bytes', 32768, 'largest DwcDelta chunk', low=256),
)

BRIDGE = (
    Param('role', 'device', 'which end of the link this bridge is', choices=('device', 'cloud')),
    Param('device_id', 'robot1', 'device role: this robot\'s id'),
    Param('devices', 'robot1', 'cloud role: comma-separated device ids served'),
    Param('connect', 'tls/localhost:7447', 'Zenoh endpoint(s) of the router, comma-separated'),
    Param('certs_dir', '', 'folder with ca.pem and this end\'s certificate and key; empty: '
          'plain TCP (tests and trusted LANs only)'),
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


def validate(node: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into the defaults of ``node`` and check every value.

    Raises:
        ConfigError: an unknown name or a bad value (the message names both).
    """
    table = {p.name: p for p in TABLES[node]}
    values = defaults(node)
    for name, value in overrides.items():
        if name not in table:
            raise ConfigError(f'{node}: unknown parameter {name!r}')
        values[name] = table[name].check(value)
    return values


def markdown(node: str) -> str:
    """The parameter table of ``node`` as Markdown (used for the README)."""
    rows = ['| parameter | default | description |', '| --- | --- | --- |']
    for p in TABLES[node]:
        extra = f' (one of: {", ".join(p.choices)})' if p.choices else ''
        if p.low is not None or p.high is not None:
            extra += f' [{p.low if p.low is not None else ""}, ' \
                     f'{p.high if p.high is not None else ""}]'
        rows.append(f'| `{p.name}` | `{p.default!r}` | {p.description}{extra} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    for _name in TABLES:
        print(f'### {_name}\n\n{markdown(_name)}\n')
