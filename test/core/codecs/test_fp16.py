"""The fp16 codec: its range, and a values array that does not fit the spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cdcca_ros.core import codecs
from cdcca_ros.core.codecs import container
from cdcca_ros.errors import CodecError


def test_fp16_refuses_overflow() -> None:
    with pytest.raises(CodecError, match='float16 range'):
        codecs.get_codec('fp16').encode({'a': torch.tensor([1e6])})


def test_fp16_decodes_its_values_array_and_refuses_one_of_another_length_or_type() -> None:
    spec = {'a': torch.zeros(3), 'b': torch.zeros(2, 2)}
    entries = container.entries(spec, self_describing=False)
    codec = codecs.get_codec('fp16')

    def payload(values: np.ndarray) -> bytes:
        return container.write_payload('fp16', {}, entries, {'values': values},
                                       self_describing=False)

    out = codec.decode(payload(np.arange(7, dtype=np.float16)), spec=spec)
    assert torch.equal(out['a'], torch.arange(3.0))
    assert torch.equal(out['b'], torch.arange(3.0, 7.0).reshape(2, 2))
    for bad in (np.ones(6, np.float16), np.ones(8, np.float16), np.ones(7, np.float32)):
        with pytest.raises(CodecError, match="'values'"):
            codec.decode(payload(bad), spec=spec)
