"""One exception hierarchy for the whole package.

Every error raised on purpose by cdcca_ros derives from :class:`CdccaError`, so a node can
catch the package's errors without catching programming errors. Messages name the object
and the bad value; translate lower-level errors with ``raise ... from err``.
"""


class CdccaError(Exception):
    """Base class of every error cdcca_ros raises on purpose."""


class ConfigError(CdccaError, ValueError):
    """A configuration or parameter value is invalid."""


# --- models -------------------------------------------------------------------------------
class ModelError(CdccaError):
    """A model could not do what was asked."""


class GenerationCancelled(CdccaError):
    """A per-step callback stopped generation (e.g. a canceled ``Ask`` action goal)."""


class ModelLoadError(ModelError):
    """Weights or a config could not be loaded from a directory or hub id."""


class PromptTooLongError(ModelError, ValueError):
    """A question (with its choices) does not fit the language model's context."""


class VisionSpaceMismatchError(ModelError):
    """Teacher and student do not share the vision-token space."""


# --- wire formats, codecs, signing ------------------------------------------------------
class WireError(CdccaError, ValueError):
    """Bytes received from the network do not decode (truncated, corrupt, wrong version)."""


class ChecksumError(WireError):
    """A checksum over received bytes does not match."""


class SignatureError(WireError):
    """A signature does not verify."""


class CodecError(CdccaError, ValueError):
    """A tensor codec cannot encode or decode the given data."""


class SpecMismatchError(CodecError):
    """A compact payload was encoded for another trainable set (its spec digest differs)."""


class BasisMismatchError(WireError):
    """An uplink payload was coded with another token basis than the one held here (its
    version differs), or a basis belongs to another vision-token space."""


class DeltaRejectedError(CdccaError):
    """A weight delta is refused (wrong device, wrong base, replayed, non-finite...)."""


# --- link ----------------------------------------------------------------------------------
class LinkError(CdccaError):
    """The device-cloud link failed (connection, authentication, transport)."""


class ChunkError(WireError):
    """A chunked payload is inconsistent, incomplete or timed out."""


class PayloadTooLargeError(WireError):
    """A payload is larger than the configured limit."""


class SpoolError(CdccaError):
    """The on-disk spool could not store or replay a message."""


# --- cameras ---------------------------------------------------------------------------
class CameraError(CdccaError):
    """A camera source failed."""


class DeviceNotConnectedError(CameraError, ConnectionError):
    """The camera is not connected (missing, unplugged, or never opened)."""


class ImageConversionError(CdccaError, ValueError):
    """An image message cannot be converted (unknown encoding, wrong size)."""


class CameraTimeoutError(CameraError, TimeoutError):
    """No frame (or no fresh enough frame) arrived from a camera in time."""


class EndOfStreamError(CameraError):
    """A finite camera source (a video file) has no more frames."""


# --- downlink deltas (core/dwc.py, core/codecs/, core/updates.py) --------------------------
class DeltaMismatchError(CdccaError, ValueError):
    """A delta does not fit a state dict (keys, shapes or dtypes differ)."""


class DeltaGateRejection(DeltaRejectedError):
    """The device gate refused a delta; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f'{reason}: {message}')
        self.reason = reason


class TrustError(SignatureError):
    """A key list or a signed record is refused by the device's trust store (unknown or
    revoked key, wrong role, expired, forged or older key list); ``reason`` is a short
    machine-readable code (:class:`cdcca_ros.core.trust.TrustReason`), ``detail`` the
    message without it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f'{reason}: {message}')
        self.reason = reason
        self.detail = message
