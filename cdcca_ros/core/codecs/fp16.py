"""``fp16``: every value as IEEE float16 (the reference: ~exact, 16 bits per parameter).

Its one array: ``values`` f16, all tensors flattened and concatenated (in payload order).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor

from cdcca_ros.core.codecs import container
from cdcca_ros.core.codecs.base import Codec, register_codec
from cdcca_ros.core.codecs.container import Payload, StateDict
from cdcca_ros.errors import CodecError

_FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(Codec):
    """Every value as IEEE float16: the reference (relative error ~3e-4, 16 bits/param)."""

    name = 'fp16'

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        entries = container.entries(delta, self_describing)
        flats = [container.flat_f32(e.name, delta[e.name]) for e in entries]
        for e, f in zip(entries, flats, strict=True):
            if f.size and float(np.abs(f).max()) > _FP16_MAX:
                raise CodecError(f'delta[{e.name!r}] exceeds the float16 range '
                                 f'(max |x| = {float(np.abs(f).max()):.3g})')
        values = np.concatenate(flats).astype(np.float16) if flats else np.zeros(0, np.float16)
        return container.write_payload(self.name, self.params(), entries, {'values': values},
                                       self_describing=self_describing)

    def _values(self, p: Payload) -> np.ndarray:
        return container.array(p, 'values', np.float16, p.layout.total).astype(np.float32)



register_codec(Fp16Codec.name, Fp16Codec)
