"""pynetdicom's association threads without their millisecond polling (ingest CPU under many associations).

pynetdicom 3.0 runs two threads per association, each polling: the DUL reactor sleeps ``_run_loop_delay``
(1 ms) whenever it had nothing to do, then polls its socket with ``select(..., 0)``; the association reactor
sleeps 1 ms per loop before it looks for a complete DIMSE message. With 16 open associations that is ~32,000
Python wake-ups a second, each taking the GIL: profiled (py-spy, ``srnode bench ingest``, 16 senders) as about
half of the node's CPU samples while it ingests, more than admission and the group commit together.

Here the waits end on the event itself instead, and otherwise poll every ``IDLE_S``:

- :class:`QuietDUL`: where the reactor would sleep, it waits in ``poll`` on its socket and on a wake-up
  socket pair written by ``send_pdu`` / ``kill_dul`` (a primitive to send, e.g. the C-STORE response): data
  from the peer and primitives from the association thread are handled as soon as they come, timers (ARTIM)
  at most ``IDLE_S`` late. Its loop (:meth:`QuietDUL._run`) is pynetdicom's with this wait where pynetdicom
  sleeps ``_run_loop_delay``, and a PDU the wait saw arrive read without polling again.
- ``QuietAssociation`` (``node.ingest.association``, the association half): its reactor loop is pynetdicom's
  without the 1 ms sleep per loop; its
  ``_reactor_checkpoint`` (an Event the reactor waits on in every loop) first waits until a DIMSE message is
  queued (``DIMSEServiceProvider.msg_queue``), it is poked, or ``ASSOC_IDLE_S`` passed. It is poked by what it
  acts on: a primitive for it from the DUL (release or abort requests: ``_PokingQueue``), the DUL thread
  ending, the checkpoint set (``kill``, :meth:`QuietDUL._fail`); only the network timeout is noticed up to
  ``ASSOC_IDLE_S`` late. It waited ``IDLE_S`` before: 16 idle association threads woke 800 times a second,
  each taking the GIL, while the lean path received their C-STOREs on the DUL threads.

They also close three holes a hostile peer found in pynetdicom's acceptor, on both receive paths: every
P-DATA-TF's items are checked before pynetdicom decodes them (``node.ingest.lean.pdata_item_problem``: A-ABORT
and one line instead of a reader thread dying on a KeyError / IndexError); any other exception that ends the
reader is one line, an A-ABORT and EVT_ABORTED (:meth:`QuietDUL._fail`: the SCP counts the association closed
and removes its partial file); a request the node does not serve on its presentation context (a C-FIND on a
storage context) is answered 0x0122 and the association goes on (``QuietAssociation._serve_request``).

Only the SCP's accepted associations use them (``node.ingest.association.QuietRequestHandler``); pynetdicom's
protocol code is unchanged. Tested against pynetdicom 3.0.x (``SUPPORTED``); with another version the stock
classes are used.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_EVENT_REPORT
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.service_class_n import StorageCommitmentServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.ingest.fdwait import wait_ready
from node.ingest.lean import LeanAbort, LeanReceiver, pdata_item_problem

log = logging.getLogger(__name__)

IDLE_S = 0.02  # longest wait before the DUL reactor looks at its timers and flags again (seconds)
SUPPORTED = pynetdicom.__version__.startswith("3.0.")
MIN_PDU_CAP = 1 << 20  # bytes: the largest PDU body read from a peer is at least this
UNLIMITED_PDU_CAP = 64 << 20  # bytes: the cap when our maximum PDU length is 0 (unlimited)
PDU_TIMEOUT_S = 30.0  # seconds a PDU may take to arrive once its first byte came, plus 1 s per PDU_MIN_RATE bytes
PDU_MIN_RATE = 64 << 10  # bytes/s: slower than this (beyond PDU_TIMEOUT_S) is a trickle, not a network
PDU_FIRST_BUFFER = 64 << 10  # bytes: a PDU's receive buffer starts at most this large, then doubles when full


# pynetdicom's "standard" notification handlers: they only log, at INFO and DEBUG (pynetdicom._handlers), and run
# for every PDU and DIMSE message in and out, even when nothing would be logged
LOG_ONLY_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def pynetdicom_logs_info() -> bool:
    """Whether pynetdicom's INFO records would be emitted (the node sets its logger to WARNING)."""
    return logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)


class PduTimeout(Exception):
    """A PDU (header or body) did not arrive within its deadline: a peer trickling bytes to hold a slot."""


def pdu_cap(pdu_type: int, max_length: int) -> int:
    """The largest PDU body (bytes after the 6-byte header) taken from a peer before it is aborted: for a
    P-DATA-TF four times the maximum length we announced (peers must not exceed it at all), for the others 1 MiB.
    pynetdicom reads a whole PDU into memory whatever length its header announces."""
    if pdu_type != 0x04:
        return MIN_PDU_CAP
    return max(4 * max_length, MIN_PDU_CAP) if max_length else UNLIMITED_PDU_CAP


# the DIMSE requests the node serves on a presentation context, by the service class of its abstract syntax (the
# node's SCP accepts only these: Verification, every storage SOP class, Storage Commitment for the reports)
SERVED: dict[type, tuple[type, ...]] = {
    VerificationServiceClass: (C_ECHO,),
    StorageServiceClass: (C_STORE,),
    StorageCommitmentServiceClass: (N_EVENT_REPORT,),
}


def served_on(msg: Any, abstract_syntax: str) -> bool:
    """Whether the node serves the DIMSE request ``msg`` (a pynetdicom primitive) on a presentation context of
    ``abstract_syntax``: its type is one the context's service class serves (``SERVED``) and the SOP class it
    names (Affected, else Requested SOP Class UID) belongs to that same service class. A C-STORE naming another
    storage SOP class than its context's is served (the data set check answers it, 0xA900)."""
    service = uid_to_service_class(abstract_syntax)
    if not isinstance(msg, SERVED.get(service, ())):
        return False
    named = getattr(msg, "AffectedSOPClassUID", None) or getattr(msg, "RequestedSOPClassUID", None)
    return named is not None and uid_to_service_class(str(named)) is service


def refusal(msg: Any, status: int) -> Any:
    """The response primitive to the request ``msg`` (same type) with ``status``: Message ID Being Responded
    To, and the Affected SOP Class / Instance UIDs the request named (Affected, else Requested) when valid."""
    rsp = type(msg)()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    for name in ("SOPClassUID", "SOPInstanceUID"):
        value = getattr(msg, f"Affected{name}", None) or getattr(msg, f"Requested{name}", None)
        if value is not None and hasattr(rsp, f"Affected{name}"):
            try:
                setattr(rsp, f"Affected{name}", value)
            except (ValueError, TypeError):  # not a valid UID: left out (conditional in every response)
                pass
    rsp.Status = status
    return rsp


_ENDED = object()  # QuietDUL._receive: the read ended the association (already reported)
_PDATA_STATES = ("Sta6", "Sta7")  # where pynetdicom decodes a P-DATA-TF and hands it to DIMSE (DT-2, AR-6)


class QuietDUL(DULServiceProvider):
    """A DUL reactor that waits for socket data or a queued primitive instead of sleeping 1 ms per loop."""

    def __init__(self, assoc: Association) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.pdu_buffer_bytes = 0  # size of the receive buffer of the PDU being read (0: none), for tests
        self.lean: LeanReceiver | None = None  # the lean C-STORE path (node.ingest.lean), when the SCP uses it
        self.failure: str | None = None  # why this reader failed (an exception ended it), once it did
        self._readable = False  # the last idle wait saw the socket readable (not yet read)
        self.ended: Callable[[], None] | None = None  # called once the reader ends (the association pokes itself)
        self.message_timeout_s = 0.0  # [node] message_timeout_s (0: no deadline), set by the association's maker
        self._message: tuple[float, int, bool] | None = None  # the fragmented message read: (since, bytes, data set)
        self.request_problem: str | None = None  # why the peer's A-ASSOCIATE-RQ could not be read, once it could not
        super().__init__(assoc)

    def _idle_wait(self) -> None:
        self._readable = False
        if self._kill_thread or not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        wrapper = self.socket
        raw = getattr(wrapper, "socket", None)
        if raw is None or not getattr(wrapper, "_is_connected", False):
            time.sleep(0.001)  # not connected (yet, or any more): as pynetdicom does
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        try:
            ready = wait_ready([raw, self._wake_r], IDLE_S)  # poll: no limit on descriptor numbers (fdwait)
        except (OSError, ValueError):  # closed under us: the reactor's own check reports it
            return
        if self._wake_r in ready:
            self._drain()
        self._readable = raw in ready and not isinstance(raw, ssl.SSLSocket)

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def _is_transport_event(self) -> bool:
        """As pynetdicom 3.0's, except in Sta13 (we aborted or released; awaiting the close): pynetdicom reads and
        ignores whatever still arrives and closes only once nothing does, so a peer that keeps streaming after we
        aborted its oversized or trickled PDU held the association, and the node's shutdown, forever. Nothing it
        sends then matters (PS3.8 9.2, AA-6 ignores it): the transport is closed at once. An exception while
        reading or decoding ends the reader through :meth:`_fail` (pynetdicom would log a traceback and leave
        the association counted open)."""
        if self.state_machine.current_state == "Sta13":
            if self.socket:
                self.socket.close()
            return True
        if self._readable and self.socket is not None:  # the idle wait just saw data: no second poll
            self._readable = False
            try:
                self._read_pdu_data()
            except Exception as exc:  # noqa: BLE001 - whatever pynetdicom raises on a peer's bytes
                self._fail(exc)
                return False
            return True
        try:
            return bool(super()._is_transport_event())
        except Exception as exc:  # noqa: BLE001 - whatever pynetdicom raises on a peer's bytes
            self._fail(exc)
            return False

    def _process_recv_primitive(self) -> bool:
        """As pynetdicom 3.0's (a primitive of the association thread to send); an exception (e.g. a PDU that
        cannot be encoded) ends the reader through :meth:`_fail`."""
        try:
            return bool(super()._process_recv_primitive())
        except Exception as exc:  # noqa: BLE001 - whatever pynetdicom raises
            self._fail(exc)
            return False

    def _fail(self, exc: BaseException) -> None:
        """This reader cannot go on (an exception in pynetdicom's state machine, PDU decoding or encoding): one
        WARNING line naming the exception (its type and text: pynetdicom's texts name tags and context IDs, not
        patient values), an A-ABORT written straight to the peer (the state machine is in an unknown state, as
        pynetdicom's own handler does), and both threads told to stop. ``QuietAssociation`` then reports
        the association aborted (EVT_ABORTED: the SCP counts it closed and removes its partial file)."""
        self.failure = f"{type(exc).__name__}: {exc}"[:200]
        log.warning("association from %s: the DICOM upper layer failed (%s): aborted",
                    self.assoc.requestor.address, self.failure)
        try:
            abort = A_ABORT_RQ()
            abort.source = 0x02  # service provider
            abort.reason_diagnostic = 0x00  # reason not specified
            if self.socket is not None:
                self.socket.send(abort.encode())
                self.socket.close()
        except Exception:  # noqa: BLE001 - the connection may be gone already
            pass
        while not self.event_queue.empty():  # nothing more is acted on
            try:
                self.event_queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                break
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self._kill_thread = True
        self.assoc._kill = True
        self.assoc._reactor_checkpoint.set()

    def _receive(self, read: Callable[[], Any]) -> Any:
        """``read()``'s result, or ``_ENDED`` once the failure is reported: the transport failed or closed
        (Evt17), or the PDU trickled past its deadline (``_trickled``)."""
        try:
            return read()
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
        except PduTimeout:
            self._trickled()
        return _ENDED

    def _read_pdu_data(self) -> None:
        """As pynetdicom 3.0's ``_read_pdu_data``, refusing (Evt19: A-ABORT) a PDU whose announced length is above
        :func:`pdu_cap` before reading its body: pynetdicom buffers the whole announced body in memory, so one
        peer announcing 4 GB and streaming grew the node's memory without bound. The body is read by
        :meth:`_recv_body`: memory in proportion to the bytes that came, not to the length announced."""
        deadline = time.monotonic() + PDU_TIMEOUT_S
        head = bytearray(6)
        got = self._receive(lambda: self._recv_into(head, 0, deadline))
        if got is None or got is _ENDED:  # the association is being killed, or the read ended it
            return
        if got < 6:  # the peer closed the connection
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self.event_queue.put("Evt19")
            return
        cap = pdu_cap(pdu_type, int(self.assoc.acceptor.maximum_length or 0))
        if pdu_length > cap:
            log.warning("association from %s: PDU type 0x%02X announces %d bytes, above the %d accepted: aborted",
                        self.assoc.requestor.address, pdu_type, pdu_length, cap)
            self.event_queue.put("Evt19")
            return
        try:
            pdu_bytes = self._receive(lambda: self._recv_body(head, 6 + pdu_length,
                                                              deadline + pdu_length / PDU_MIN_RATE))
        finally:
            self.pdu_buffer_bytes = 0
        if pdu_bytes is None or pdu_bytes is _ENDED:
            return
        if len(pdu_bytes) != 6 + pdu_length:
            self.event_queue.put("Evt17")
            return
        state = self.state_machine.current_state
        if pdu_type == 0x04 and self._message_overdue(pdu_bytes):
            return
        if pdu_type == 0x04 and self.lean is not None and state == "Sta6":
            self._lean_feed(self.lean, pdu_bytes)  # checks the items first (the same check, the same line)
            return
        if pdu_type == 0x04 and state in _PDATA_STATES:
            problem = pdata_item_problem(pdu_bytes, self.assoc._accepted_cx)
            if problem is not None:  # pynetdicom's state machine would die on it (KeyError / IndexError)
                log.warning("association from %s: %s: aborted", self.assoc.requestor.address, problem)
                self._drop_lean_partial()
                self.event_queue.put("Evt19")
                return
        try:
            pdu, event = self._decode_pdu(pdu_bytes)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            if pdu_type == 0x01:  # the type only: pynetdicom's texts quote the peer's bytes (AE titles)
                self.request_problem = f"its A-ASSOCIATE-RQ ({pdu_length} bytes) cannot be decoded ({type(exc).__name__})"
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _lean_feed(self, lean: LeanReceiver, pdu_bytes: bytearray) -> None:
        """A whole P-DATA-TF in an established association: to the lean path (``node.ingest.lean``), which
        stores and answers a plain C-STORE itself and gives back what pynetdicom is to decode (as it came: Evt10
        each). The hooks' ``received`` (else EVT_DATA_RECV, as pynetdicom) is called first: the SCP's disk
        watermark check, which may abort the association. A LeanAbort is an invalid PDU (Evt19: A-ABORT), its partial file removed."""
        received = lean.hooks.received
        if received is not None or self.assoc.get_handlers(evt.EVT_DATA_RECV):
            if received is not None:
                received(self.assoc, len(pdu_bytes))
            else:
                evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": pdu_bytes})
            if self.assoc._sent_abort or self._kill_thread:  # the watermark check aborted the transfer
                self._drop_lean_partial()
                return
        try:
            passed = lean.feed(pdu_bytes, self._lean_send)
        except LeanAbort as exc:
            log.warning("association from %s: %s: aborted", self.assoc.requestor.address, exc)
            self._drop_lean_partial()
            self.event_queue.put("Evt19")
            return
        for raw in passed:
            try:
                pdu = P_DATA_TF()
                pdu.decode(bytes(raw))
            except Exception:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
                self.event_queue.put("Evt19")
                return
            self.event_queue.put("Evt10")
            self._recv_pdu.put(pdu)

    def _lean_send(self, data: bytes) -> None:
        """Write a response of the lean path to the peer (this thread is the only writer: pynetdicom's queued
        primitives are sent by it too); Evt17 when the connection is gone."""
        if self.socket is not None:
            self.socket.send(data)

    def _drop_lean_partial(self) -> None:
        if self.lean is not None:
            path = self.lean.drop_partial()
            if path is not None:
                path.unlink(missing_ok=True)

    def _recv_body(self, head: bytearray, total: int, deadline: float) -> bytearray | None:
        """The whole PDU (``total`` bytes, ``head`` its first 6) once its body came before ``deadline`` (monotonic
        seconds); shorter when the peer closed first, None when the association is being killed meanwhile.
        Raises as :meth:`_recv_into`.

        The buffer starts at ``min(total, PDU_FIRST_BUFFER)`` bytes and doubles (never beyond ``total``) only
        once it is full: at most max(PDU_FIRST_BUFFER, twice what the peer sent). Allocating the announced
        length up front let 400 connections, each sending a header announcing 1 MiB and then a byte every 1.5 s,
        grow the node by 400 MB without sending it. A PDU of at most PDU_FIRST_BUFFER bytes is received in
        place, a larger one (a 256 KiB P-DATA-TF at ``max_pdu`` = 262144: two doublings) is copied once per
        doubling, what came so far each time: less than its size in all."""
        buf = bytearray(min(total, PDU_FIRST_BUFFER))
        buf[:6] = head
        got = 6
        while True:
            self.pdu_buffer_bytes = len(buf)
            filled = self._recv_into(buf, got, deadline)
            if filled is None:
                return None
            got = filled
            if got < len(buf) or len(buf) == total:  # the peer closed, or the PDU is complete
                break
            grown = bytearray(min(total, 2 * len(buf)))
            grown[:got] = buf
            buf = grown
        if got < len(buf):
            del buf[got:]
        return buf

    def _recv_into(self, buf: bytearray, start: int, deadline: float) -> int | None:
        """Fill ``buf`` from offset ``start`` with bytes from the peer, read as they come, until ``deadline``
        (monotonic seconds); returns how far it is filled (less than ``len(buf)`` when the peer closed), None
        when the association is being killed meanwhile. On a plain socket each read is a non-blocking
        ``recv_into`` straight into ``buf`` (no chunk copies, no ``poll`` while data is waiting); ``poll``
        (at most 0.5 s, then the kill flag and the deadline are checked again) only when nothing is. Raises
        PduTimeout past the deadline (a trickle: ``association_timeout_s`` covers only the A-ASSOCIATE-RQ,
        pynetdicom's network timeout only silence), OSError/TimeoutError from the socket."""
        raw = getattr(self.socket, "socket", None)
        if raw is None:
            raise OSError("not connected")
        tls = isinstance(raw, ssl.SSLSocket)
        direct = not tls and not raw.gettimeout()  # with a timeout Python would wait for data before a recv
        view = memoryview(buf)
        got, n = start, len(buf)
        while got < n:
            if self._kill_thread:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise PduTimeout
            if direct:
                try:
                    k = raw.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    k = -1
                if k == 0:
                    return got
                if k > 0:
                    got += k
                    continue
            if not (tls and raw.pending()):
                ready = wait_ready([raw], min(left, 0.5))
                if not ready or direct:
                    continue
            try:
                k = raw.recv_into(view[got:], min(n - got, 1 << 16))
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            if not k:
                return got
            got += k
        return got

    def _message_overdue(self, pdu_bytes: bytearray) -> bool:
        """Follow the fragments of the message being received (a P-DATA-TF's PDV headers: PS3.8 E.2) and abort
        (one line, the lean path's partial file removed, Evt19: A-ABORT; pynetdicom's is removed on EVT_ABORTED)
        when its command set, or its data set, took longer than ``message_timeout_s`` from its first fragment,
        plus 1 s per ``PDU_MIN_RATE`` bytes of it: each PDU of a trickle arrives inside the idle timeout and its
        own deadline, so the association slot and the partial file were held as long as the peer liked. A
        fragment with the 'last' bit ends the command set or data set (a data set then starts a clock of its own).
        True when aborted. Malformed items are left to the checks that follow (``pdata_item_problem``)."""
        if not self.message_timeout_s:
            return False
        now, at, end = time.monotonic(), 6, len(pdu_bytes)
        while at + 6 <= end:
            length = int.from_bytes(pdu_bytes[at:at + 4], "big")
            if length < 2:
                break
            control = pdu_bytes[at + 5]
            since, got, _kind = self._message if self._message is not None else (now, 0, False)
            self._message = None if control & 0x02 else (since, got + length - 2, not control & 0x01)
            at += 4 + length
        if self._message is None:
            return False
        since, got, data_set = self._message
        if now - since <= self.message_timeout_s + got / PDU_MIN_RATE:
            return False
        what = "data set" if data_set else "command set"
        log.warning("association from %s: a %s took over %.0f s (node.message_timeout_s %g s, +1 s per %d KiB; %d "
                    "bytes of it came, never its last fragment): aborted", self.assoc.requestor.address, what,
                    now - since, self.message_timeout_s, PDU_MIN_RATE >> 10, got)
        self._message = None
        self._drop_lean_partial()
        self.event_queue.put("Evt19")
        return True

    def _message_checked(self) -> None:
        """A message still unfinished with no PDU coming: :meth:`_message_overdue` on nothing new (its deadline
        passes between PDUs too, up to ``idle_timeout_s`` before the network timeout would end it)."""
        if self._message is not None and self.message_timeout_s:
            self._message_overdue(bytearray(6))

    def _trickled(self) -> None:
        log.warning("association from %s: a PDU did not arrive within %.0f s (+1 s per %d KiB): aborted",
                    self.assoc.requestor.address, PDU_TIMEOUT_S, PDU_MIN_RATE >> 10)
        self.event_queue.put("Evt19")

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _run(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` loop (ARTIM, one primitive to send or one PDU
        read, then one state-machine event), where its ``time.sleep(self._run_loop_delay)`` after an idle loop is
        :meth:`_idle_wait` itself: no ``sleep(0)`` system call per PDU (each released the GIL, to be waited for
        again under many associations), and a PDU the wait saw arrive is read without a second poll."""
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._idle_wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            if self._message is not None:
                self._message_checked()
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: an A-ABORT straight to the peer, both ended
                self._fail(exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    def run_reactor(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - the state machine's actions (P-DATA to DIMSE, ...) raised
            self._fail(exc)
        finally:
            self._drop_lean_partial()
            self._wake_r.close()
            self._wake_w.close()
            if self.ended is not None:
                self.ended()  # the association thread sees the reader gone at once (``dul.is_alive()``)
