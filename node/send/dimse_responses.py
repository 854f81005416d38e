"""C-STORE responses of one requestor association matched to its requests (``node.send.dimse``): a response
counts only when it answers the request in flight and names its instance; anything else is a problem that leaves
the association's outcome unknown.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

MAX_MESSAGE_ID = 0xFFFF  # MessageID is a US (PS3.7 Table 9.3-1); after it the next request is 1 again


class _Responses:
    """Matches the C-STORE responses of one requestor association to its requests (installed by :meth:`attach`).

    Each request gets its own MessageID (1, 2, ... per association, :meth:`next_id`). pynetdicom 3.0's
    ``send_c_store`` takes the next message on the association as its response without looking at it; here the
    message it takes (``dimse.get_msg(block=True)``) is checked: a response counts only when it is a C-STORE
    response, its MessageIDBeingRespondedTo is the request in flight and its AffectedSOPInstanceUID (optional in a
    C-STORE-RSP, PS3.7 Table 9.1-1) is absent or the instance sent. Anything else (a second answer to a request,
    a late or stale one, another instance's UID, a request from the peer) is a *problem*: the association's
    outcome is unknown, and the sender aborts it and fails the attempt (retryable; the delivery is sent again).

    It also keeps pynetdicom's reactor from losing responses: the requestor reactor pauses for ``send_c_store``
    through a checkpoint that has a window, and under heavy CPU load it can take the response off the DIMSE queue
    itself, log "Received unexpected C-STORE service message" and drop it; ``send_c_store`` then waits until the
    peer gives up (Orthanc closes the association after its 30 s DicomScpTimeout). Seen 2-5 times per 558-instance
    delivery with 4 associations at load average 20 on 2 cores (pydicom/pynetdicom#875 reports it for C-FIND).
    The reactor's ``_serve_request`` (pynetdicom's private hook) puts a response to the request in flight back on
    the queue for the waiting call; a response it sees with no request waiting for it (a duplicate arriving
    between two requests, or during the release) is recorded as a problem; requests from the peer are served as
    before."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.lock = threading.Lock()
        self.last_id = 0
        self.in_flight: tuple[int, str] | None = None  # (MessageID, SOPInstanceUID) awaiting its response
        self.answered: set[int] = set()  # MessageIDs whose response came (a second one is a duplicate)
        self.problem = ""  # the first unexpected message, in words

    @classmethod
    def attach(cls, assoc: Any) -> _Responses:
        self = cls(assoc)
        serve, send, get_msg = assoc._serve_request, assoc.dimse.send_msg, assoc.dimse.get_msg

        def serve_or_keep(msg: Any, context_id: int) -> None:
            if msg.is_valid_request:  # the peer's request: pynetdicom's as before
                serve(msg, context_id)
                return
            with self.lock:
                waiting = self.in_flight is not None and _responding_to(msg) == self.in_flight[0]
                if not waiting:
                    self._note(self._unexpected(msg))
            if waiting:  # send_c_store is waiting for it: back on the queue (the reactor pauses very soon)
                assoc.dimse.msg_queue.put((context_id, msg))

        def send_msg(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None:
                with self.lock:
                    self.in_flight = (int(primitive.MessageID or 0), str(primitive.AffectedSOPInstanceUID))
            send(primitive, context_id)

        def checked_get_msg(block: bool = False) -> Any:
            item = get_msg(block)
            if block:  # send_c_store's wait for its response (the reactor's polls are non-blocking)
                self._check(item[1])
            return item

        assoc._serve_request = serve_or_keep
        assoc.dimse.send_msg = send_msg
        assoc.dimse.get_msg = checked_get_msg
        return self

    def next_id(self) -> int:
        """The MessageID for the next request."""
        with self.lock:
            self.last_id = self.last_id % MAX_MESSAGE_ID + 1
            self.answered.discard(self.last_id)  # only after 65,535 requests on one association
            return self.last_id

    def leftover(self, timeout_s: float) -> str:
        """After the release: the problem, including a message the peer sent before its A-RELEASE-RP that nobody
        took (pynetdicom queues P-DATA received while it waits for the release response). Waits up to
        ``timeout_s`` for the association's reactor to end (its last look at the queue)."""
        self.assoc.join(timeout_s)
        while True:
            try:
                _, msg = self.assoc.dimse.msg_queue.get_nowait()
            except queue.Empty:
                break
            if msg is not None:
                with self.lock:
                    self._note(self._unexpected(msg))
        return self.problem

    def done(self) -> None:
        """No request in flight any more (its response came, or ``send_c_store`` failed before sending)."""
        with self.lock:
            self.in_flight = None

    def _note(self, problem: str) -> None:
        if not self.problem:
            self.problem = problem

    def _unexpected(self, msg: Any) -> str:
        """``msg`` (a message that came with no request waiting for it), in words. Lock held."""
        what, name = _responding_to(msg), msg.__class__.__name__.replace("_", "-")
        if what is None:
            return f"an unexpected {name} message"
        if name != "C-STORE":
            return f"an unexpected {name} response"
        if what in self.answered:
            return f"a second response to message {what}"
        return f"a response to message {what}, which was not in flight"

    def _check(self, msg: Any) -> None:
        """``msg`` is what ``send_c_store`` took as the response to the request in flight (None: nothing came)."""
        with self.lock:
            if self.in_flight is None or msg is None:
                self.in_flight = None
                return
            expected, instance = self.in_flight
            self.in_flight = None
            what = _responding_to(msg)
            if what == expected and msg.__class__.__name__ == "C_STORE":
                uid = msg.AffectedSOPInstanceUID
                if not msg.is_valid_response:
                    self._note(f"the response to message {expected} is not a valid C-STORE response")
                elif uid is not None and str(uid) != instance:
                    self._note(f"the response to message {expected} names another SOP instance")
                else:
                    self.answered.add(expected)
                return
            self._note(f"{self._unexpected(msg)} came while message {expected} was awaited")


def _responding_to(msg: Any) -> int | None:
    """The MessageIDBeingRespondedTo of a DIMSE message (None when it has none)."""
    value = getattr(msg, "MessageIDBeingRespondedTo", None)
    return None if value is None else int(value)
