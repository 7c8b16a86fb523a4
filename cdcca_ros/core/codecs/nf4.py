"""``nf4``: bitsandbytes NF4, blocksize 64 (the paper's choice via QLoRA).

4 bits per parameter plus a float32 absmax per block (4.5 bits), or with ``double_quant`` an
8-bit absmax re-quantized per 256 blocks (~4.13 bits).

Its arrays, in the order of the elements they describe: ``packed`` u8 (two 4-bit codes per
byte, per tensor ``ceil(n/2)`` bytes), ``absmax`` f32 per 64-block; with double quantization
``absmax`` is u8 and ``absmax2`` f32 (per 256 absmax values) and ``offset`` f32 (per tensor)
come along.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdcca_ros.core.codecs import container
from cdcca_ros.core.codecs.base import Codec, register_codec
from cdcca_ros.core.codecs.container import Payload, StateDict
from cdcca_ros.errors import CodecError

_NF4_BLOCK = 64
_DQ_BLOCK = 256


class Nf4Codec(Codec):
    """bitsandbytes NF4 per tensor, blocksize 64: the paper's quantizer (QLoRA) and baseline.

    Args:
        double_quant: Quantize the per-block absmax to 8 bits (QLoRA's double quantization):
            ~4.13 instead of 4.5 bits per parameter, slightly higher error.
    """

    name = 'nf4'

    def __init__(self, double_quant: bool = False) -> None:
        self.double_quant = bool(double_quant)

    def params(self) -> dict[str, Any]:
        return {'double_quant': self.double_quant}

    def encode(self, delta: StateDict, *, importance: Mapping[str, Tensor] | None = None,
               self_describing: bool = True) -> bytes:
        from bitsandbytes import functional as bnbf

        entries = container.entries(delta, self_describing)
        packed, absmax, absmax2, offsets = [], [], [], []
        nf4 = bnbf.get_4bit_type('nf4', device='cpu')
        for e in entries:
            flat = container.flat_f32(e.name, delta[e.name])
            if flat.size == 0:
                offsets.append(0.0)
                continue
            q, st = bnbf.quantize_4bit(torch.from_numpy(flat), blocksize=_NF4_BLOCK,
                                       quant_type='nf4', compress_statistics=self.double_quant)
            if not torch.equal(st.code, nf4):
                raise CodecError('bitsandbytes returned an unexpected NF4 code book')
            packed.append(q.reshape(-1).numpy())
            if self.double_quant:
                absmax.append(st.absmax.numpy().astype(np.uint8))
                absmax2.append(st.state2.absmax.numpy().astype(np.float32))
                offsets.append(float(st.offset))
            else:
                absmax.append(st.absmax.numpy().astype(np.float32))
        arrays = {
            'packed': np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            'absmax': (np.concatenate(absmax) if absmax
                       else np.zeros(0, np.uint8 if self.double_quant else np.float32)),
        }
        if self.double_quant:
            arrays['absmax2'] = (np.concatenate(absmax2) if absmax2
                                 else np.zeros(0, np.float32))
            arrays['offset'] = np.asarray(offsets, dtype=np.float32)
        return container.write_payload(self.name, self.params(), entries, arrays,
                                       self_describing=self_describing)

    def _values(self, p: Payload) -> np.ndarray:
        from bitsandbytes import functional as bnbf

        double = 'absmax2' in p.arrays
        sizes = [e.numel for e in p.entries]
        n_bytes = [(n + 1) // 2 for n in sizes]
        n_blocks = [-(-n // _NF4_BLOCK) for n in sizes]
        n_blocks2 = [-(-b // _DQ_BLOCK) for b in n_blocks]
        # Every length is checked before bitsandbytes sees the arrays: its kernels trust them.
        packed = container.array(p, 'packed', np.uint8, sum(n_bytes))
        absmax = container.array(p, 'absmax', np.uint8 if double else np.float32, sum(n_blocks))
        if double:
            absmax2 = container.array(p, 'absmax2', np.float32, sum(n_blocks2))
            offsets = container.array(p, 'offset', np.float32, len(sizes))
            dyn = bnbf.create_dynamic_map(signed=True)
        nf4 = bnbf.get_4bit_type('nf4', device='cpu')
        flats: list[np.ndarray] = []
        pos = blk = blk2 = 0
        for i, n in enumerate(sizes):
            if n == 0:
                flats.append(np.zeros(0, np.float32))
                continue
            q = torch.from_numpy(packed[pos:pos + n_bytes[i]].copy()).reshape(-1, 1)
            if double:
                am = bnbf.dequantize_blockwise(
                    torch.from_numpy(absmax[blk:blk + n_blocks[i]].copy()),
                    absmax=torch.from_numpy(absmax2[blk2:blk2 + n_blocks2[i]].copy()),
                    code=dyn, blocksize=_DQ_BLOCK) + float(offsets[i])
            else:
                am = torch.from_numpy(absmax[blk:blk + n_blocks[i]].copy())
            state = bnbf.QuantState(absmax=am.float(), shape=torch.Size([n]), code=nf4,
                                    blocksize=_NF4_BLOCK, quant_type='nf4',
                                    dtype=torch.float32)
            flats.append(bnbf.dequantize_4bit(q, state).reshape(-1).numpy())
            pos += n_bytes[i]
            blk += n_blocks[i]
            blk2 += n_blocks2[i]
        return np.concatenate(flats) if flats else np.zeros(0, np.float32)



register_codec(Nf4Codec.name, Nf4Codec)
