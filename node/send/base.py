"""The outbound boundary: per destination kind, a ``Sender`` (delivers files) and a ``PeerQuery`` (asks the
destination what it holds, for ``node.send.confirm``), each made by one factory from its registry by kind."""

from __future__ import annotations

import importlib
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Protocol, TypeVar, runtime_checkable

from node.config import Destination, DestinationKind
from node.errors import ConfigError, DeliveryError

T = TypeVar("T")

# (StudyInstanceUID, SeriesInstanceUID, SOPClassUID, SOPInstanceUID) of one file sent
Ref = tuple[str, str, str, str]


class Unsupported(Exception):
    """The peer refuses the service asked for (its presentation context, or the whole association), or the
    destination's kind has no such service."""


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


@runtime_checkable
class PeerQuery(Protocol):
    """Asks one destination whether it holds instances sent to it (``node.send.confirm`` runs the state machine).

    ``offers_commitment``: whether ``request_commitment`` can be asked at all (DICOM Storage Commitment).
    ``request_commitment(transaction_uid, refs)``: ask for a commitment report on ``refs`` (it comes later, on
    another association); ``held(refs)``: the SOP Instance UIDs of ``refs``' series that the destination lists.
    Both raise Unsupported when the peer refuses to be asked that way, DeliveryError (retryable) when it cannot
    be asked now.
    """

    offers_commitment: bool

    def request_commitment(self, transaction_uid: str, refs: Sequence[Ref]) -> None: ...

    def held(self, refs: Sequence[Ref]) -> set[str]: ...


# kind -> the module whose ``create(dest)`` takes that kind's config dataclass (``node.config.DESTINATION_TYPES``)
KIND_MODULES: dict[DestinationKind, str] = {
    DestinationKind.DICOM: "node.send.dimse",
    DestinationKind.FOLDER: "node.send.folder",
    DestinationKind.ORTHANC: "node.send.orthanc",
    DestinationKind.DICOMWEB: "node.send.dicomweb",
}

# kind -> the module whose ``query(dest)`` asks that kind of peer; a folder has none (confirmed by nothing)
QUERY_MODULES: dict[DestinationKind, str] = {
    DestinationKind.DICOM: "node.send.query_dimse",
    DestinationKind.ORTHANC: "node.send.query_orthanc",
    DestinationKind.DICOMWEB: "node.send.query_dicomweb",
}


def by_series(refs: Sequence[Ref]) -> dict[tuple[str, str], set[str]]:
    """``refs``' SOP Instance UIDs by (study, series) UID."""
    series: dict[tuple[str, str], set[str]] = defaultdict(set)
    for study, ser, _, sop in refs:
        series[(study, ser)].add(sop)
    return series


def count_series(refs: Sequence[Ref], search: Callable[[str, str, str], set[str]]) -> set[str]:
    """The SOP Instance UIDs of ``refs`` a destination holds, asked with ``search(study, series, sop)`` (the UIDs
    it lists; ``sop`` "" for the whole series): once per series, then once per instance of ``refs`` that answer
    left out -- only when it listed any of them: a server answering a page of a large series (Orthanc's
    ``LimitFindInstances``, a QIDO-RS limit) lists some, one holding none of the series lists none. Raises what
    ``search`` raises."""
    found: set[str] = set()
    for (study, series), sops in by_series(refs).items():
        listed = search(study, series, "") & sops
        found |= listed
        if listed:
            for sop in sorted(sops - listed):
                found |= search(study, series, sop) & {sop}
    return found


def in_parallel(items: Sequence[T], work: Callable[[T], None], workers: int, thread_name: str) -> None:
    """``work(item)`` for every item, on up to ``workers`` threads (in order on this one when 1). The first
    DeliveryError stops the items not yet started; once the running ones end it is raised again (a non-retryable
    one before a retryable one: a permanent refusal must not be retried as if the network failed)."""
    n = max(1, min(workers, len(items)))
    if n == 1:
        for item in items:
            work(item)
        return
    stop = threading.Event()
    errors: list[DeliveryError] = []

    def one(item: T) -> None:
        if stop.is_set():
            return
        try:
            work(item)
        except DeliveryError as exc:
            errors.append(exc)
            stop.set()

    with ThreadPoolExecutor(n, thread_name_prefix=thread_name) as pool:
        list(pool.map(one, items))
    if errors:
        raise next((e for e in errors if not e.retryable), errors[0])


def _import_kind(dest: Destination, mod_name: str) -> ModuleType:
    """The module ``mod_name`` that serves ``dest``'s kind; ConfigError when it cannot be imported."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind.value!r} is not available ({exc})") from exc


def make_sender(dest: Destination) -> Sender:
    """The Sender for ``dest``; each kind's module exposes ``create(dest) -> Sender`` for its own dataclass.

    Raises ConfigError when the kind has no sender module or its module cannot be imported.
    """
    mod_name = KIND_MODULES.get(dest.kind)
    if mod_name is None:
        raise ConfigError(f"destination {dest.name!r}: kind {dest.kind.value!r} is not supported")
    sender: Sender = _import_kind(dest, mod_name).create(dest)
    return sender


def make_query(dest: Destination) -> PeerQuery:
    """The PeerQuery for ``dest``; each kind's query module exposes ``query(dest) -> PeerQuery``.

    Raises Unsupported for a kind that cannot be asked (a folder), ConfigError when its module cannot be imported.
    """
    mod_name = QUERY_MODULES.get(dest.kind)
    if mod_name is None:
        raise Unsupported(f"no query for kind {dest.kind.value!r}")
    peer: PeerQuery = _import_kind(dest, mod_name).query(dest)
    return peer
