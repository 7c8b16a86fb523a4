"""The codec interface and the registry of codecs by name (:func:`get_codec`).

A codec turns a delta (``dict[str, Tensor]``) into the arrays of one
:mod:`~cdcca_ros.core.codecs.container` payload and back. Each codec module registers its
class when it is imported; importing :mod:`cdcca_ros.core.codecs` imports them all. Pure
logic: no rclpy, no network.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.core.codecs import container
from cdcca_ros.core.codecs.container import (
    DEFAULT_MAX_NUMEL,
    FlatDelta,
    Payload,
    Spec,
    StateDict,
)
from cdcca_ros.errors import CodecError


class Codec(abc.ABC):
    """Turns a delta into bytes and back; ``decode(encode(d))`` approximates ``d``.

    Decoding reads everything it needs from the payload (and, for a compact payload, the
    trainable spec), so any instance of a codec class decodes what any other instance (other
    knobs) encoded.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The encoder's knobs (recorded in the payload)."""

    @abc.abstractmethod
    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        """Encode a delta.

        Args:
            delta: Float tensors (keys in any order; kept when self-describing).
            importance: Optional per-tensor importance (e.g. input-activation scale, or the
                square root of the diagonal Fisher), broadcastable to each delta tensor;
                codecs that select use it, others ignore it.
            self_describing: Carry the tensor index (names, dtypes, shapes); ``False``
                writes a compact payload that only a decoder given the spec reads.

        Raises:
            CodecError: The delta cannot be encoded (non-finite, non-float, out of range).
        """

    def decode(self, payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL,
               spec: Spec | None = None) -> dict[str, Tensor]:
        """Decode a payload into tensors of the recorded names, shapes and dtypes.

        Args:
            payload: The bytes.
            max_numel: Refuse payloads (or specs) of more values.
            spec: The trainable set (name -> tensor or shape); needed for compact payloads
                (their tensors come out float32, sorted by name), unused by self-describing
                ones.

        Raises:
            CodecError: Malformed, truncated or foreign bytes, another codec's payload, or a
                compact payload without (or with another) spec.
        """
        p = self._open(payload, max_numel, spec)
        return container.unflatten(p.layout, self._values(p))

    def decode_flat(self, payload: bytes, spec: Spec, *,
                    max_numel: int = DEFAULT_MAX_NUMEL) -> FlatDelta:
        """Decode a compact payload into one float32 vector over ``spec`` (the device's path).

        The values come out in the compact layout (the spec's tensors sorted by name, each
        flattened), with no per-tensor objects on the way: what a device adds to weights it
        keeps in the same order (Eq. 8 as one add).

        Raises:
            CodecError: As :meth:`decode`; also for a self-describing payload (its index, not
                the spec, would decide names, order and dtypes).
        """
        p = self._open(payload, max_numel, spec)
        if p.self_describing:
            raise CodecError(f'{p.codec} payload is self-describing: decode_flat reads compact '
                             'payloads (decode() reads both)')
        values = torch.from_numpy(np.ascontiguousarray(self._values(p), dtype=np.float32))
        if values.numel() != p.layout.total:
            raise CodecError(f'decoded {values.numel()} values, the payload holds '
                             f'{p.layout.total}')
        return FlatDelta(p.layout, values)

    @abc.abstractmethod
    def _values(self, p: Payload) -> np.ndarray:
        """Every decoded value, flat in the payload's layout order (float32 or wider)."""

    def describe(self) -> str:
        """``name(k=v,...)`` for logs and the envelope's codec description."""
        knobs = ','.join(f'{k}={v}' for k, v in sorted(self.params().items()))
        return f'{self.name}({knobs})'

    def _open(self, payload: bytes, max_numel: int, spec: Spec | None) -> Payload:
        p = container.read_payload(payload, max_numel, spec)
        if p.codec != self.name:
            raise CodecError(f'payload was encoded by codec {p.codec!r}, not {self.name!r}')
        return p


# --- registry ----------------------------------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str, factory: Callable[..., Codec]) -> None:
    """Make a codec available by name (``factory(**params)`` builds one)."""
    if name in _REGISTRY:
        raise CodecError(f'codec {name!r} is already registered')
    _REGISTRY[name] = factory


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """Build a registered codec.

    Raises:
        CodecError: Unknown name.
        ConfigError: Invalid knobs.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise CodecError(f'unknown codec {name!r}; known: {codec_names()}') from None
    return factory(**params)


def decode_payload(payload: bytes, *, max_numel: int = DEFAULT_MAX_NUMEL,
                   spec: Spec | None = None) -> dict[str, Tensor]:
    """Decode any registered codec's payload (the codec is read from the payload).

    Raises:
        CodecError: Malformed bytes, an unknown codec, or a compact payload without its spec.
    """
    codec = get_codec(container.read_payload_codec(payload))
    return codec.decode(payload, max_numel=max_numel, spec=spec)

