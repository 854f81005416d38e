"""The association half of the SCP's quiet threads (``node.ingest.reactor`` is the DUL half).

:class:`QuietAssociation`: pynetdicom's acceptor association whose reactor loop is pynetdicom's without the 1 ms
sleep per loop; its ``_reactor_checkpoint`` (:class:`_Checkpoint`, an Event the reactor waits on in every loop)
first waits until a DIMSE message is queued (``DIMSEServiceProvider.msg_queue``), it is poked (:func:`poke`), or
``ASSOC_IDLE_S`` passed. It is poked by what it acts on: a primitive for it from the DUL (release or abort
requests: :class:`_PokingQueue`), the DUL thread ending (``QuietDUL.ended``), the checkpoint set (``kill``,
``QuietDUL._fail``); only the network timeout is noticed up to ``ASSOC_IDLE_S`` late. A request the node does
not serve on its presentation context is answered 0x0122 and the association goes on
(:meth:`QuietAssociation._serve_request`).

:class:`QuietRequestHandler` makes them (with :class:`PolledAssociationSocket` and the contexts copied by
:func:`copy_contexts`) for the SCP's server (``node.ingest.server``). The module docstring of
``node.ingest.reactor`` gives the measurements behind both halves. Split from ``reactor`` unchanged.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import ssl
import threading
from datetime import datetime
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import LOGGER as ASSOC_LOG
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.dimse import Status
from node.ingest.fdwait import wait_ready
from node.ingest.lean import LeanHooks, LeanReceiver
from node.ingest.reactor import (
    LOG_ONLY_HANDLERS,
    SUPPORTED,
    QuietDUL,
    pynetdicom_logs_info,
    refusal,
    served_on,
)

log = logging.getLogger(__name__)

MAX_LOGGED_NOT_SERVED = 10  # lines naming a request refused 0x0122 (not served on its context), per association
ASSOC_IDLE_S = 0.5  # longest wait of the association reactor when nothing pokes it (its network timeout check)


def poke(assoc: Association) -> None:
    """Wake ``assoc``'s reactor thread if it waits in :meth:`_Checkpoint.wait` (it then looks at its queues and
    flags at once)."""
    q = assoc.dimse.msg_queue
    with q.not_empty:
        q.not_empty.notify_all()


class _PokingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's ``to_user_queue`` (primitives for the association thread: A-RELEASE, A-ABORT, ...), poking
    the association's reactor (:func:`poke`) on every put."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        poke(self._assoc)


class _Checkpoint(threading.Event):
    """The association reactor's checkpoint: ``wait()`` without a timeout first waits (at most ASSOC_IDLE_S)
    for a DIMSE message to be queued or a :func:`poke`, then behaves as ``threading.Event.wait``; ``set()``
    pokes."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def set(self) -> None:
        super().set()
        poke(self._assoc)

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None and threading.current_thread() is self._assoc:
            q = self._assoc.dimse.msg_queue
            with q.not_empty:
                if not q._qsize() and not self._assoc._kill:  # the mutex is held: qsize() would deadlock
                    q.not_empty.wait(ASSOC_IDLE_S)
        return super().wait(timeout)


class QuietAssociation(Association):
    """An acceptor association with :class:`QuietDUL` and a reactor that waits for DIMSE messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dul = QuietDUL(self)
        # the timers of the DUL pynetdicom made took the AE's timeouts (the setters write them there); this one has
        # pynetdicom's defaults (60 s, 30 s): [node] idle_timeout_s was never applied (hostile18)
        self.network_timeout = self.network_timeout
        self.acse_timeout = self.acse_timeout
        self.dul.ended = self._reader_ended
        self.not_served = 0  # requests answered 0x0122 on this association (the first MAX_LOGGED_NOT_SERVED logged)
        self.dul.to_user_queue = _PokingQueue(self)
        dul = self.dul
        receive = self.dimse.receive_primitive

        def received(primitive: Any) -> None:
            """pynetdicom's DIMSE receive (run by the reader's state machine, action DT-2): an exception in it
            ends the reader through :meth:`QuietDUL._fail` (one line) rather than through the state machine,
            which would log it with a traceback and leave the association counted open."""
            try:
                receive(primitive)
            except Exception as exc:  # noqa: BLE001 - whatever a peer's P-DATA makes pynetdicom raise
                dul._fail(exc)

        self.dimse.receive_primitive = received  # type: ignore[method-assign]
        checkpoint = _Checkpoint(self)
        checkpoint.set()
        self._reactor_checkpoint = checkpoint
        if not pynetdicom_logs_info():  # LOG_ONLY_HANDLERS would log nothing: not run per PDU and message
            for event, handler in LOG_ONLY_HANDLERS:
                bound: Any = self.get_handlers(event)  # notification event: [(handler, args), ...]
                if any(h[0] is handler for h in bound):
                    self.unbind(event, handler)

    def _reader_ended(self) -> None:
        """The DUL reader thread ended: poke the reactor (it sees the reader gone at once). When no A-ASSOCIATE-RQ
        was handed to this association (the DUL refused or could not decode the one the peer sent: a calling AE
        title of non-ASCII bytes or with a backslash, an even presentation context ID, another protocol version, a
        PDU of another type first; or the peer closed before it was whole), pynetdicom's ``run_reactor`` still
        waited ``acse_timeout`` (``[node] association_timeout_s``) for one, the association counted toward
        ``max_associations`` all that time and past the per-caller and per-address limits (never asked: no
        EVT_REQUESTED), nothing logged by the node: one 100-byte request per slot every 10 s locked every modality
        out. Now its wait ends at once (``None``: pynetdicom's "no request", the thread ends and the slot is free)
        and the connection is logged and audited as dropped (``connection-dropped``) with why."""
        waiting = self.requestor.primitive is None and not any(
            isinstance(p, A_ASSOCIATE) for p in list(self.dul.to_user_queue.queue))
        if waiting:
            self.dul.to_user_queue.put(None)  # run_reactor: "timed out waiting for the A-ASSOCIATE-RQ": ends
            failure = getattr(self.dul, "failure", None)
            problem = getattr(self.dul, "request_problem", None) or (
                f"the DICOM upper layer failed on its A-ASSOCIATE-RQ ({failure.split(':')[0]})" if failure else None) or (
                "its A-ASSOCIATE-RQ was refused by the DICOM upper layer (another protocol version, a PDU of another "
                "type first) or the connection closed before the request was whole")
            refused = getattr(self._server, "_refused", None)
            if callable(refused):
                refused(str(self.requestor.address), False, problem, "A-ASSOCIATE-RQ")
            else:
                log.warning("DICOM connection from %s closed before an association: %s", self.requestor.address,
                            problem)
        poke(self)

    def kill(self) -> None:
        """As pynetdicom's, with the kill flag set before the checkpoint's ``set()`` pokes the reactor (else it
        could look before the flag is set, then wait ASSOC_IDLE_S)."""
        self._kill = True
        super().kill()

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """As pynetdicom 3.0's, except for a request the node does not serve on its presentation context
        (:func:`served_on`: a C-FIND, C-GET, C-MOVE or N-* on a storage context, a C-STORE on the Verification
        context, a SOP class of another service): answered with the response of its type, Status 0x0122
        (Refused: SOP Class not supported, PS3.7 C.5.3 / PS3.4 C.4.1.1.4, B.2.3) and one WARNING line, the
        association kept for the next request. pynetdicom ran the service class of the SOP class the request
        names: a C-FIND naming a storage class raised in the Storage SCP (a traceback, then A-ABORT), one naming
        a class it has no SCP for aborted the association."""
        context = self._accepted_cx.get(context_id)
        if (self._sent_release or context is None or not getattr(msg, "is_valid_request", False)
                or served_on(msg, str(context.abstract_syntax))):
            super()._serve_request(msg, context_id)
            return
        if isinstance(msg, C_STORE):
            _remove_dataset_file(msg)
        named = getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", None)
        self.not_served += 1
        if self.not_served <= MAX_LOGGED_NOT_SERVED:
            log.warning("association from %s@%s: %s naming SOP class %s on presentation context %d (%s) refused "
                        "(%s): not served there", str(self.requestor.ae_title).strip(), self.requestor.address,
                        _request_name(msg), str(named)[:64], context_id, context.abstract_syntax,
                        Status.SOP_CLASS_NOT_SUPPORTED)
        elif self.not_served == MAX_LOGGED_NOT_SERVED + 1:
            log.warning("association from %s@%s: more than %d requests refused (0x0122) as not served on their "
                        "presentation context: the next ones are answered so, not logged one by one",
                        str(self.requestor.ae_title).strip(), self.requestor.address, MAX_LOGGED_NOT_SERVED)
        try:
            self.dimse.send_msg(refusal(msg, Status.SOP_CLASS_NOT_SUPPORTED), context_id)
        except Exception as exc:  # noqa: BLE001 - a response pynetdicom cannot encode: end it cleanly
            log.warning("association from %s: the 0x0122 response could not be sent (%s: %s): aborted",
                        self.requestor.address, type(exc).__name__, exc)
            self.abort()

    def _run_reactor(self) -> None:
        """As pynetdicom 3.0.4's ``Association._run_reactor`` (acceptor loop: serve DIMSE messages, then the
        release, abort, DUL-alive and network-timeout checks), without its ``time.sleep(0.001)`` at the top of
        every loop: the checkpoint (:class:`_Checkpoint`) already waits until a DIMSE message is queued, it is
        poked or ASSOC_IDLE_S passed. That sleep made every C-STORE wait ~1 ms (often more: a sleep is rounded
        up to the scheduler's tick) after its dataset was complete, on every association.

        When the reader thread failed (:meth:`QuietDUL._fail`) the association is reported aborted
        (EVT_ABORTED) as it ends: pynetdicom ended it without any event, so the SCP's open-association count
        never went back and the partial file of the transfer stayed in incoming/."""
        try:
            self._serve()
        finally:
            failure = getattr(self.dul, "failure", None)
            if failure is not None and not self._sent_abort:
                self._sent_abort = True  # reported once (abort() would neither send nor report again)
                evt.trigger(self, evt.EVT_ABORTED, {})

    def _serve(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                ASSOC_LOG.info("Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers, as in pynetdicom
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _request_name(msg: Any) -> str:
    return str(getattr(msg, "msg_type", type(msg).__name__)).replace("_", "-")


def _remove_dataset_file(msg: Any) -> None:
    """Remove the file pynetdicom wrote for a C-STORE's data set (chunked receive) that no handler takes."""
    path = getattr(msg, "_dataset_path", None)
    fh = getattr(msg, "_dataset_file", None)
    try:
        if fh is not None:
            fh.close()
    except OSError:
        pass
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Each association's own copy of the supported presentation contexts, as pynetdicom's ``deepcopy`` gives it,
    without copying the UIDs: they are immutable ``str`` s, and pydicom re-validates each one (a regex) as
    ``deepcopy`` rebuilds it. With every storage SOP class times every transfer syntax (170 contexts, 7,650 UIDs)
    that deepcopy took ~50 ms of CPU per association on an idle core, this copy 0.7 ms (py-spy --gil of 16
    storescu associations of 100 instances: the deepcopy was the largest single item). pynetdicom 3.0's
    negotiation (``negotiate_as_acceptor``) only reads them."""
    out = []
    for cx in contexts:
        c = copy.copy(cx)
        c._transfer_syntax = list(cx._transfer_syntax)
        out.append(c)
    return out


class PolledAssociationSocket(AssociationSocket):
    """pynetdicom's AssociationSocket whose ``ready`` (is there data to read?) asks ``poll`` instead of
    ``select.select``: pynetdicom 3.0 takes select's ValueError on a descriptor >= 1024 for a closed connection
    (Evt17), so once a few hundred connections were open every new association was aborted at once ("Peer
    aborted Association") without a line in the log."""

    @property
    def ready(self) -> bool:
        """As pynetdicom 3.0.4's ``AssociationSocket.ready``: whether data can be read now (also a TLS record
        already buffered); False and Evt17 when the socket is closed."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            ready = bool(wait_ready([sock], 0))
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")
            return False
        if isinstance(sock, ssl.SSLSocket):
            return ready or bool(sock.pending())
        return ready


class QuietRequestHandler(RequestHandler):
    """pynetdicom's request handler, making :class:`QuietAssociation` s (stock ones when not ``SUPPORTED``)."""

    def _create_association(self) -> Association:
        """As ``RequestHandler._create_association`` of pynetdicom 3.0.4, with our association and socket
        (:class:`PolledAssociationSocket`) classes, the contexts copied by :func:`copy_contexts`, and without
        pynetdicom's log-only handlers (LOG_ONLY_HANDLERS) while its logger is above INFO."""
        if not SUPPORTED:
            return super()._create_association()
        assoc = QuietAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(PolledAssociationSocket(assoc, client_socket=self.request))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote
        hooks = getattr(self.server, "lean_hooks", None)
        cast(QuietDUL, assoc.dul).message_timeout_s = float(getattr(self.server, "message_timeout_s", 0.0) or 0.0)
        skip = {handler for _, handler in LOG_ONLY_HANDLERS} if not pynetdicom_logs_info() else set()
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    h: Any = handler
                    if h[0] not in skip:
                        assoc.bind(event, h[0], h[1])
        if isinstance(hooks, LeanHooks) and not any(assoc.get_handlers(e) for e, _ in LOG_ONLY_HANDLERS):
            cast(QuietDUL, assoc.dul).lean = LeanReceiver(assoc, hooks)  # nobody watches PDUs or DIMSE messages one by one
        return assoc
