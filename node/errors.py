"""One exception tree for the node. Foreign errors are translated once, with ``raise ... from exc``."""

from __future__ import annotations

from node.dimse import Status


class NodeError(Exception):
    """Base of every error srnode raises on purpose."""


class ConfigError(NodeError):
    """config.toml is missing, malformed, or a key has a bad value (the message names the key)."""


class IngestError(NodeError):
    """An inbound instance was refused. ``status`` is the DIMSE status to answer with (``node.dimse.Status``)."""

    def __init__(self, message: str, status: int = Status.CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


class SpoolError(NodeError):
    """The spool or its index could not be read or written."""


class VolumeError(NodeError):
    """A series cannot be assembled into a volume (the message says why, for a PACS administrator)."""


class EngineError(NodeError):
    """The super-resolution engine failed."""


class DeriveError(NodeError):
    """A derived object could not be built or failed its geometry gate."""


class DeliveryError(NodeError):
    """A destination refused or could not be reached. ``retryable`` says whether to try again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
