"""One exception tree for the node. Foreign errors are translated once, with ``raise ... from exc``."""

from __future__ import annotations

import errno
import re

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


class SpoolInUse(SpoolError):
    """Another process holds the spool's lock (``node.store.Spool.lock``): a node serves it. Not raised when the
    lock could not be opened or taken for another reason (permissions, a file system without locks): those are
    plain SpoolError, so that nobody is told to stop a node that does not run."""


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


def listen_problem(what: str, section: str, host: str, port: int, exc: OSError) -> str:
    """Why ``what`` cannot listen on host:port (config keys ``[section]`` host, port), in words."""
    where = f"{what} {host}:{port} ([{section}] host, port)"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: in use by another program (is another srnode running?)"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges; use a higher port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: this machine has no such address"
    return f"{where}: cannot listen: {exc.strerror or exc}"


# what ``node.dicom_read.read_dicom`` adds to pydicom's "no 'DICM'" error when the bytes, read without the preamble,
# are no DICOM data set either
NOT_A_RAW_DATA_SET = "and read without it the bytes are no DICOM data set (no SOP Class / Instance UID)"

_FORCE_ADVICE = re.compile(r"\s*[^.]*\bforce\s*=\s*True\b[^.]*\.?")


def dicom_read_problem(exc: BaseException) -> str:
    """pydicom's reason a file could not be read, in words for a user (never its "Use force=True" advice)."""
    text = " ".join(str(exc).split())
    if "DICM" in text or "File Meta Information" in text:
        return "no DICOM header: the 'DICM' marker after the 128-byte preamble is missing" + (
            f", {NOT_A_RAW_DATA_SET}" if NOT_A_RAW_DATA_SET in text else "")
    text = _FORCE_ADVICE.sub("", text).strip()
    return text or type(exc).__name__


def http_status_text(status: int) -> str:
    """``HTTP <status>`` for a peer's refusal; a 401 / 403 says the credentials are the cause (the config keys to
    check), so a wrong password never reads like a passing hiccup. Never names a credential's value."""
    if status == 401:
        return "HTTP 401: the credentials were refused (check username / password or token of this entry)"
    if status == 403:
        return "HTTP 403: these credentials may not do this (check username / password or token of this entry)"
    return f"HTTP {status}"
