"""The outbound boundary: one ``Sender`` protocol, one factory by destination kind."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from node.config import DestinationConfig
from node.errors import ConfigError


@runtime_checkable
class Sender(Protocol):
    """Delivers DICOM files to one destination.

    ``send`` raises ``DeliveryError`` (``retryable`` set) and returns only when every file was accepted;
    a resend of the same files must be harmless (deterministic UIDs: the peer overwrites or ignores).
    """

    name: str

    def send(self, paths: Sequence[Path]) -> None: ...

    def check(self) -> None:
        """Raise DeliveryError if the destination cannot be reached now (used by /readyz)."""
        ...


_KIND_MODULES = {
    "dicom": "node.send.dimse",
    "folder": "node.send.folder",
    "orthanc": "node.send.orthanc",
    "dicomweb": "node.send.dicomweb",
}


def make_sender(dest: DestinationConfig) -> Sender:
    """The Sender for ``dest``; each kind's module exposes ``create(dest) -> Sender``."""
    mod_name = _KIND_MODULES.get(dest.kind)
    if mod_name is None:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind!r} is not supported")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind!r} is not available ({exc})") from exc
    sender: Sender = mod.create(dest)
    return sender
