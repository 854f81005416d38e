"""The outbound boundary: one ``Sender`` protocol, one factory by destination kind."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from node.config import Destination, DestinationKind
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


# kind -> the module whose ``create(dest)`` takes that kind's config dataclass (``node.config.DESTINATION_TYPES``)
KIND_MODULES: dict[DestinationKind, str] = {
    DestinationKind.DICOM: "node.send.dimse",
    DestinationKind.FOLDER: "node.send.folder",
    DestinationKind.ORTHANC: "node.send.orthanc",
    DestinationKind.DICOMWEB: "node.send.dicomweb",
}


def make_sender(dest: Destination) -> Sender:
    """The Sender for ``dest``; each kind's module exposes ``create(dest) -> Sender`` for its own dataclass.

    Raises ConfigError when the kind has no sender module or its module cannot be imported.
    """
    mod_name = KIND_MODULES.get(dest.kind)
    if mod_name is None:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind.value!r} is not supported")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind.value!r} is not available ({exc})") from exc
    sender: Sender = mod.create(dest)
    return sender
