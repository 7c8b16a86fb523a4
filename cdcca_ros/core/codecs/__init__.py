"""DWC payloads: the container format and the codecs (fp16, nf4, sparse) by name.

:mod:`~cdcca_ros.core.codecs.container` is the wire format, :mod:`~cdcca_ros.core.codecs.base`
the codec interface and registry, one module per codec. Importing this package registers
every codec. The DWC itself (Eq. 7-8, byte budget, error feedback) is
:mod:`cdcca_ros.core.dwc`.
"""
from cdcca_ros.core.codecs.base import (
    Codec,
    codec_names,
    decode_payload,
    get_codec,
    register_codec,
)
from cdcca_ros.core.codecs.container import (
    DEFAULT_MAX_NUMEL,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAGIC,
    FlatDelta,
    Spec,
    StateDict,
    flatten_delta,
    is_self_describing,
    read_payload_codec,
    read_payload_kind,
)
from cdcca_ros.core.codecs.fp16 import Fp16Codec
from cdcca_ros.core.codecs.nf4 import Nf4Codec
from cdcca_ros.core.codecs.sparse import SPARSE_SCOPES, SparseCodec

__all__ = [
    'DEFAULT_MAX_NUMEL', 'FORMAT_NAME', 'FORMAT_VERSION', 'MAGIC', 'SPARSE_SCOPES', 'Codec',
    'FlatDelta', 'Fp16Codec', 'Nf4Codec', 'SparseCodec', 'Spec', 'StateDict', 'codec_names',
    'decode_payload', 'flatten_delta', 'get_codec', 'is_self_describing', 'read_payload_codec',
    'read_payload_kind', 'register_codec',
]
