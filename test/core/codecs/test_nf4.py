"""The nf4 codec: every array length is checked before bitsandbytes (whose kernels trust
them) sees the arrays."""
from __future__ import annotations

import pytest
import torch
from sample_deltas import lora_like

from cdcca_ros.core import codecs
from cdcca_ros.core.codecs import container
from cdcca_ros.errors import CodecError


@pytest.mark.parametrize('double_quant, key', [
    (False, 'packed'), (False, 'absmax'),
    (True, 'packed'), (True, 'absmax'), (True, 'absmax2'), (True, 'offset'),
])
def test_nf4_refuses_an_array_one_value_short(double_quant: bool, key: str) -> None:
    delta = lora_like(hidden=32, layers=1)
    codec = codecs.get_codec('nf4', double_quant=double_quant)
    payload = codec.encode(delta, self_describing=False)
    arrays = dict(container.read_payload(payload, spec=delta).arrays)
    assert set(arrays) == ({'packed', 'absmax', 'absmax2', 'offset'} if double_quant
                           else {'packed', 'absmax'})
    # Rebuilt as is, the payload decodes (with any instance: the arrays say which variant).
    entries = container.entries(delta, self_describing=False)
    same = container.write_payload('nf4', {}, entries, arrays, self_describing=False)
    ref = codec.decode(payload, spec=delta)
    out = codecs.get_codec('nf4').decode(same, spec=delta)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    arrays[key] = arrays[key][:-1]
    bad = container.write_payload('nf4', {}, entries, arrays, self_describing=False)
    with pytest.raises(CodecError, match=f"'{key}' has"):
        codecs.get_codec('nf4').decode(bad, spec=delta)
