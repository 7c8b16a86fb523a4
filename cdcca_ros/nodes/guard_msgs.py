"""Messages of the guarded round: RollbackOrder <-> RollbackEnvelope, token requests, versions.

Stateless converters (as ``delta_msgs`` is for deltas): the nodes and the bridges only move
these messages; verifying an order is :func:`cdcca_ros.core.updates.check_rollback`'s job on
the device.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cdcca_ros.core.updates import RollbackEnvelope
from cdcca_ros.errors import WireError
from cdcca_ros.msg import RollbackOrder, TokenRequest

# ``<device>:v<N>`` (answers, uplink samples), ``v<N>`` (statuses), ``<N>`` (delta fields);
# main's model_version topic also appends ``:<hash prefix>``.
_VERSION = re.compile(r'^(?:(?P<device>[^:]*):)?v?(?P<n>\d+)(?::[0-9a-fA-F]*)?$')


def parse_version(text: str) -> int:
    """The integer adapter version in a version string; -1 when there is none.

    The one parser of version strings: ``'robot1:v3'``, ``'v3'``, ``'3'`` and
    ``'robot1:v3:abcdef01'`` all give 3; an empty or foreign string gives -1 (the cloud then
    does not attribute the sample's answer to a version).
    """
    match = _VERSION.match(text.strip()) if isinstance(text, str) else None
    return int(match['n']) if match else -1


def rollback_to_msg(order: RollbackEnvelope, stamp: Any = None) -> RollbackOrder:
    """The message carrying a signed rollback order (every signed field, unchanged)."""
    msg = RollbackOrder(device_id=order.device_id, from_version=order.from_version,
                        from_hash=order.from_hash, to_hash=order.to_hash,
                        new_version=order.new_version, reason=order.reason,
                        signature=order.signature, key_id=order.key_id,
                        expires=order.expires)
    if stamp is not None:
        msg.header.stamp = stamp
    return msg


def msg_to_rollback(msg: RollbackOrder) -> RollbackEnvelope:
    """The envelope of a received order (the signature is checked by the device, not here).

    Raises:
        WireError: a field does not fit an envelope.
    """
    return RollbackEnvelope(device_id=msg.device_id, from_version=int(msg.from_version),
                            from_hash=msg.from_hash, to_hash=msg.to_hash,
                            new_version=int(msg.new_version), reason=msg.reason,
                            signature=bytes(msg.signature), key_id=msg.key_id,
                            expires=int(msg.expires))


def token_request(device_id: str, request_id: str, sample_ids: Iterable[str],
                  stamp: Any = None) -> TokenRequest:
    """A request for the rest of ``sample_ids``' tokens."""
    msg = TokenRequest(device_id=device_id, request_id=request_id,
                       sample_ids=[str(s) for s in sample_ids])
    if stamp is not None:
        msg.header.stamp = stamp
    return msg


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars, tuples and non-finite floats made JSON-safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def detail_json(figures: Mapping[str, Any]) -> str:
    """Figures for ``AdaptationStatus.detail``: JSON, numbers plain, NaN/Inf as null."""
    return json.dumps(_plain(figures), separators=(',', ':'))


def parse_detail(text: str) -> dict[str, Any]:
    """``AdaptationStatus.detail`` back to a dict ({} when empty).

    Raises:
        WireError: it is not a JSON object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise WireError(f'status detail is not JSON: {err}') from err
    if not isinstance(value, dict):
        raise WireError(f'status detail is a {type(value).__name__}, not an object')
    return value
