"""pynetdicom's records about the node's own outgoing associations (C-STORE, Storage Commitment, C-FIND, the
readiness probe), translated once: kept off the log and handed to the node's sender, which says the outcome in
one line of its own per attempt (``node.send.outbox``: "attempt 2/8 failed, next in 4 s: ... connection
refused").

Before ops19 a PACS outage wrote, per attempt and per association, pynetdicom's ERROR pair "Association request
failed: unable to connect to remote" / "TCP Initialisation Error: [Errno 111] Connection refused" (8 lines an
attempt with 4 associations, ~80 ERROR lines for a 4-minute outage, more from each /readyz probe) and, for a PACS
that stopped mid-delivery, a ConnectionResetError traceback from ``pynetdicom.dul`` per association; the node's
own WARNING, the line that matters, was lost among them, and it said "association aborted (peer not reachable or it
dropped the connection)" for a plain refused connection.

How: a filter on every pynetdicom logger drops a record logged from the thread of an association the node
*requested* (pynetdicom's ``Association`` thread or its ``DULServiceProvider`` thread, whose association is the
requestor), or from a thread of the node's inside :func:`outgoing` (the caller's thread, where pynetdicom
negotiates the association and sends the messages), and keeps its first line (:func:`problems`, the list
:func:`outgoing` yields), where ``node.send.dimse`` and ``node.send.query_dimse`` read the reason. Records of
associations the node *accepts* (its SCP) are untouched.
"""

from __future__ import annotations

import logging
import pkgutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pynetdicom

ATTR = "srnode_problems"  # the list of pynetdicom messages kept on an outgoing Association
MAX_KEPT = 8


def _outgoing(thread: threading.Thread) -> Any:
    """The requestor Association whose thread (or DUL thread) ``thread`` is, else None."""
    assoc = getattr(thread, "assoc", None) if not hasattr(thread, "is_requestor") else thread
    try:
        return assoc if assoc is not None and bool(assoc.is_requestor) else None
    except Exception:  # noqa: BLE001 - not a pynetdicom association after all
        return None


_local = threading.local()


@contextmanager
def outgoing() -> Iterator[list[str]]:
    """While inside, pynetdicom's records logged by this thread are the node's outgoing associations': dropped,
    their messages (WARNING and above) appended to the list yielded (nested: the outer one's list)."""
    prev: list[str] | None = getattr(_local, "said", None)
    said = prev if prev is not None else []
    _local.said = said
    try:
        yield said
    finally:
        _local.said = prev


def _keep(kept: list[str], record: logging.LogRecord) -> None:
    if record.levelno < logging.WARNING or len(kept) >= MAX_KEPT:
        return
    msg = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        msg = f"{type(exc).__name__}: {exc}" if msg == str(exc) else f"{msg} ({type(exc).__name__})"
    kept.append(msg)


class OutgoingAssociations(logging.Filter):
    """Drops pynetdicom records (any level) logged by the threads of an association the node requested, or by a
    thread inside :func:`outgoing`, keeping each one's message (a traceback's exception line, not the traceback)
    on the association (:func:`problems`) or in :func:`outgoing`'s list."""

    def filter(self, record: logging.LogRecord) -> bool:
        said: list[str] | None = getattr(_local, "said", None)
        if said is not None:
            _keep(said, record)
            return False
        assoc = _outgoing(threading.current_thread())
        if assoc is None:
            return True
        kept: list[str] = getattr(assoc, ATTR, None) or []
        _keep(kept, record)
        setattr(assoc, ATTR, kept)
        return False


FILTER = OutgoingAssociations()
_installed = threading.Lock()


def install() -> None:
    """Put :data:`FILTER` on pynetdicom's logger and every one of its modules' (a logger's filter does not see
    its children's records); idempotent."""
    with _installed:
        names = ["pynetdicom"] + [f"pynetdicom.{m.name}" for m in pkgutil.iter_modules(pynetdicom.__path__)]
        for name in names:
            logger = logging.getLogger(name)
            if FILTER not in logger.filters:
                logger.addFilter(FILTER)


def problems(assoc: Any) -> list[str]:
    """What pynetdicom said about the outgoing association ``assoc`` (WARNING and above, first lines), oldest
    first."""
    return list(getattr(assoc, ATTR, None) or [])


def reason(assoc: Any, default: str, also: list[str] | None = None) -> str:
    """Why ``assoc`` (requested, not established or lost) failed, in the node's words: "connection refused",
    "cannot connect: <error>", or ``default`` followed by pynetdicom's last message (of those kept on ``assoc``
    and in ``also``, :func:`outgoing`'s list)."""
    said = problems(assoc) + list(also or [])
    for m in said:
        if m.startswith("TCP Initialisation Error:"):
            err = m.split(":", 1)[1].strip()
            if "Connection refused" in err or "Errno 111" in err:
                return "cannot connect: connection refused (nothing listens at that address and port: is the PACS up?)"
            return f"cannot connect: {err}"
    useful = [m for m in said if not m.startswith("Association request failed")]
    return f"{default}: {useful[-1]}" if useful else default
