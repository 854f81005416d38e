"""C-STORE SCU destination (kind "dicom").

Up to ``dest.associations`` (N) associations per ``send``, in parallel threads, each taking the next file from one
shared list (:class:`_Work`) until none is left; an association the PACS does not open while another one works (a
limit of associations per caller, or a PACS that takes one at a time) leaves its share to the others: a PACS answers one C-STORE at a time per association, so one association is bound
by the round trip and the peer's per-instance latency (measured: dcmtk ``storescu`` to Orthanc 1.10.1 on
localhost 15 instances/s with one association, 55/s with four; docs/benchmarks.md "Delivery"). Each association
proposes, for every SOP class among the files, the files' own transfer syntax and, in a second context,
Explicit/Implicit VR Little Endian. A file whose own syntax was accepted is streamed from disk as it is (no
decoding); one whose compressed syntax the peer refused is decompressed (pylibjpeg) and sent uncompressed. On a
plain TCP connection such a file's C-STORE-RQ is written by ``node.send.dimse_lean`` (its P-DATA-TF PDUs framed with
``struct`` and written by the sending thread), the rest of pynetdicom's ``send_c_store`` unchanged. TLS when
``dest.tls``. Each request of an association has its own MessageID (1, 2, ...) and a response counts only when
it answers the request in flight and names its instance (``node.send.dimse_responses``); a second, late or mismatched
response leaves the association's outcome unknown: aborted, a retryable failure. The first failure stops the other
associations; ``send`` then raises it (a non-retryable one before a retryable one) and the outbox resends the
whole delivery later (harmless: deterministic UIDs). An association lost with a file in hand (the peer aborted it,
no response) is no such failure while others work: the file goes back to the shared list for them
(:meth:`_Work.give_back`); only when every association is lost does the attempt fail.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import DicomDestination
from node.dimse import (
    Status,
    assoc_no_delay,
    label,
    max_pdu_problem,
    store_retryable,
    stored,
)
from node.errors import DeliveryError
from node.send.dimse_lean import _lean_requests
from node.send.dimse_responses import _Responses
from node.send.peer_log import install as quiet_outgoing
from node.send.peer_log import outgoing
from node.send.peer_log import reason as peer_reason

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128
NO_RESPONSE_RETRIES = 3  # per association and send: C-STOREs without a response sent again on a new association


class _Work:
    """The files of one delivery, handed out in order to the associations that send them (thread-safe).

    Each file taken is in flight until the association that took it says it was stored (:meth:`done`) or hands it
    back (:meth:`give_back`: its association was lost, aborted by the peer or without a response), which puts it
    first in line for the associations still working. :meth:`take` waits while the list is empty and a file is
    still in flight (it may come back), so that a file handed back at the end is not left unsent."""

    WAIT_S = 1.0  # longest wait between two looks at ``stop`` (a file done or handed back wakes a waiter at once)

    def __init__(self, items: list[tuple[Path, str, str]]) -> None:
        self._items: deque[tuple[Path, str, str]] = deque(items)
        self._in_flight = 0
        self._cond = threading.Condition()
        self._lost: set[Path] = set()  # files whose response was lost once already (said once: ops19)

    def take(self, stop: threading.Event | None = None) -> tuple[Path, str, str] | None:
        """The next file (path, SOP class, transfer syntax), or None when every file was sent (none left, none in
        flight) or ``stop`` is set."""
        with self._cond:
            while True:
                if stop is not None and stop.is_set():
                    return None
                if self._items:
                    self._in_flight += 1
                    return self._items.popleft()
                if self._in_flight == 0:
                    return None
                self._cond.wait(self.WAIT_S)

    def done(self) -> None:
        """The file last taken by the caller was stored."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def give_back(self, item: tuple[Path, str, str]) -> None:
        """The file ``item`` the caller took was not stored (its association lost): first in line again."""
        with self._cond:
            self._in_flight -= 1
            self._items.appendleft(item)
            self._cond.notify_all()

    def first_loss(self, path: Path) -> bool:
        """Whether this is the first time a response for ``path`` was lost in this delivery (before ops19 one
        file that every association took in turn from a PACS that had gone was logged once per association)."""
        with self._cond:
            first = path not in self._lost
            self._lost.add(path)
            return first

    def wake(self) -> None:
        """Wake every waiting :meth:`take` (``stop`` was set)."""
        with self._cond:
            self._cond.notify_all()

    def left(self) -> int:
        """How many files were not handed out yet (or were handed back)."""
        with self._cond:
            return len(self._items)


class _NoResponse(DeliveryError):
    """A C-STORE got no response (timeout, connection lost, or pynetdicom's reactor took it); retryable."""


def client_ssl_context(dest: DicomDestination) -> ssl.SSLContext:
    """The TLS client context of ``dest`` (``tls_ca``, ``tls_cert``, ``tls_key``); raises OSError/SSLError on bad files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca or None)
    if dest.tls_cert:
        ctx.load_cert_chain(certfile=dest.tls_cert, keyfile=dest.tls_key or None)
    return ctx


class DimseSender:
    """C-STORE SCU sender for one ``DicomDestination`` (``dest.associations`` associations at once per ``send``)."""

    def __init__(self, dest: DicomDestination) -> None:
        self.name = dest.name
        self.dest = dest
        # pynetdicom's process-wide switch: ``send_c_store(path)`` streams the file's data set from disk in PDU-
        # sized reads instead of decoding the whole file and encoding it again (dcmread + encode was most of a
        # sender thread's time: py-spy, 512² CT to Orthanc). A path is passed only when the file's own syntax
        # was accepted (``_send_one``), which is what the switch requires; this module is the node's only
        # caller of ``send_c_store`` with a path (the SCP side uses STORE_RECV_CHUNKED_DATASET, not this).
        _config.STORE_SEND_CHUNKED_DATASET = True
        quiet_outgoing()  # pynetdicom's records about these associations: kept off the log, read as the reason

    def _ae(self) -> AE:
        d = self.dest
        ae = AE(ae_title=d.calling_ae_title or "SRNODE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_s
        # the TCP connection and, with TLS, its handshake (pynetdicom wraps the socket before connecting): without
        # it a peer that accepts the connection but never answers the handshake held send() for ever
        ae.connection_timeout = d.timeout_s
        return ae

    def _where(self) -> str:
        d = self.dest
        return f"{d.name} ({d.address}{', TLS' if d.tls else ''})"

    def _associate(self, ae: AE) -> Any:
        d = self.dest
        kwargs: dict[str, Any] = {"ae_title": d.ae_title}
        if d.tls:
            kwargs["tls_args"] = (client_ssl_context(d), d.host)
        with outgoing() as said:
            try:
                assoc = ae.associate(d.host, d.port, **kwargs)
            except (OSError, ssl.SSLError) as exc:
                raise DeliveryError(f"destination {self._where()}: cannot connect: {exc}") from exc
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected
                   else peer_reason(assoc, "association aborted (the peer dropped the connection)", said)
                   if assoc.is_aborted else peer_reason(assoc, "association not established", said))
            raise DeliveryError(f"destination {self._where()}: {why}")
        too_small = max_pdu_problem(assoc.acceptor.maximum_length)
        if too_small is not None:  # nothing could be sent within it (pynetdicom would divide by zero)
            assoc.abort()
            raise DeliveryError(f"destination {self._where()}: association aborted: {too_small}", retryable=False)
        assoc_no_delay(assoc)
        return assoc

    def send(self, paths: Sequence[Path]) -> None:
        if not paths:
            return
        headers: list[tuple[Path, str, str]] = []
        for p in paths:
            try:  # the file meta only (group 2, ~0.07 ms against 0.35 for a header dcmread of a 512² CT)
                meta = read_file_meta_info(p)
                sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
                if not sop_class:
                    sop_class = str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                                    .get("SOPClassUID", ""))
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
                raise DeliveryError(f"{p}: not a readable DICOM file: {exc}", retryable=False) from exc
            headers.append((Path(p), sop_class, str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))))
        contexts: list[tuple[str, list[str]]] = []
        for sop_class in sorted({h[1] for h in headers}):
            own = sorted({h[2] for h in headers if h[1] == sop_class and h[2] not in UNCOMPRESSED})
            contexts += [(sop_class, [ts]) for ts in own]
            contexts.append((sop_class, list(UNCOMPRESSED)))
        if len(contexts) > MAX_CONTEXTS:  # pragma: no cover - > 60 SOP classes in one job
            raise DeliveryError(f"destination {self._where()}: too many SOP classes for one association",
                                retryable=False)
        n = max(1, min(self.dest.associations, len(headers)))
        work = _Work(headers)
        if n == 1:
            with outgoing():  # pynetdicom's records of this thread: this delivery's, said by the node's error
                self._send_on_one(contexts, work, threading.Event())
            return
        stop = threading.Event()
        errors: list[DeliveryError] = []
        lost: list[DeliveryError] = []

        def run() -> None:
            try:
                with outgoing():
                    self._send_on_one(contexts, work, stop, lost)
            except DeliveryError as exc:
                errors.append(exc)
                stop.set()
                work.wake()
            except Exception as exc:  # noqa: BLE001 - a thread must not die silently; translated once here
                errors.append(DeliveryError(f"destination {self._where()}: sending failed: {exc}"))
                stop.set()
                work.wake()

        threads = [threading.Thread(target=run, name=f"srnode-send-{self.name}-{i}", daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not e.retryable), errors[0])
        if lost:
            if work.left():  # no association could be opened, or every one was lost: failed as with one
                raise next((e for e in lost if not e.retryable), lost[0])
            log.warning("destination %s: %d of %d associations not opened or lost (%s); the others sent every file",
                        self._where(), len(lost), n, lost[0])

    def _open(self, ae: AE) -> tuple[Any, _Responses]:
        """A new association to the destination, its requests streamed by :func:`_lean_requests` and its
        responses matched to them by :class:`_Responses`."""
        assoc = _lean_requests(self._associate(ae), self.dest.timeout_s)
        return assoc, _Responses.attach(assoc)

    def _send_on_one(self, contexts: list[tuple[str, list[str]]], work: _Work, stop: threading.Event,
                     lost: list[DeliveryError] | None = None) -> None:
        """Send the files ``work`` hands out (path, SOP class, transfer syntax), in order, on one new association,
        until none is left; returns early when ``stop`` is set (another association failed).

        An association lost with a file in hand (no C-STORE response: the peer aborted it, the connection dropped,
        a timeout) is opened again, up to ``NO_RESPONSE_RETRIES`` times per call: under heavy CPU load pynetdicom
        3.0's association reactor can take a response meant for ``send_c_store`` ("Received unexpected C-STORE
        service message", pydicom/pynetdicom#875). With ``lost`` (several associations share ``work``) the file
        goes back to ``work`` first, for whichever association is working (a PACS that accepts more associations
        than it serves and aborts the others: the healthy ones finish the delivery), and an association that
        cannot be opened, or is lost once more after its retries, is added to ``lost`` and the call returns: the
        others take its share. Alone (no ``lost``), the same file is sent again on the new association, and the
        last loss raises. A response that does not match its request (``node.send.dimse_responses``), before or
        during the release, fails the call. Raises DeliveryError."""
        ae = self._ae()
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        retries = NO_RESPONSE_RETRIES
        opened = self._open_or_leave(ae, lost)
        if opened is None:
            return
        assoc, responses = opened
        try:
            accepted = _accepted(assoc)
            current, last = work.take(stop), ""
            while current is not None and not stop.is_set():
                path, sop_class, ts = current
                try:
                    self._send_one(assoc, responses, accepted, path, sop_class, ts)
                except _NoResponse as exc:
                    if assoc.is_established:  # pynetdicom may not have noticed the abort yet
                        assoc.abort()
                    if lost is not None:  # first in line again, for the associations still working
                        work.give_back(current)
                        current = None
                    if retries <= 0:
                        if lost is None:
                            raise
                        log.log(logging.WARNING if work.first_loss(path) else logging.DEBUG,
                                "destination %s: %s; %s handed back to the other associations", self._where(), exc,
                                path.name)
                        lost.append(exc)
                        return
                    retries -= 1
                    log.log(logging.WARNING if work.first_loss(path) else logging.DEBUG,
                            "destination %s: no C-STORE response for %s; %s", self._where(), path.name,
                            "handed back to the other associations, this one opened again" if lost is not None
                            else "again on a new association")
                    opened = self._open_or_leave(ae, lost)
                    if opened is None:
                        return
                    assoc, responses = opened
                    accepted = _accepted(assoc)
                    if current is None:
                        current = work.take(stop)
                    continue
                work.done()
                last, current = path.name, work.take(stop)
            if assoc.is_established:
                assoc.release()
                problem = responses.leftover(self.dest.timeout_s)
                if problem:  # a second answer to the last request, or a late one: which one was meant is unknown
                    raise self._unknown(f"after the last C-STORE{f' ({last})' if last else ''}: {problem}",
                                        "released")
        finally:
            if assoc.is_established and responses.problem:
                assoc.abort()
            elif assoc.is_established:
                assoc.release()

    def _open_or_leave(self, ae: AE, lost: list[DeliveryError] | None) -> tuple[Any, _Responses] | None:
        """An association (and its response tracker) of ``ae``; when it cannot be opened: raised alone (``lost``
        None), else recorded in ``lost`` and None (this association leaves its share to the others)."""
        try:
            return self._open(ae)
        except DeliveryError as exc:
            if lost is None:
                raise
            lost.append(exc)
            return None

    def _unknown(self, problem: str, ended: str = "aborted") -> DeliveryError:
        """The retryable failure of an association whose responses did not match its requests (``ended``: how
        the association ended)."""
        log.warning("destination %s: %s; the association's outcome is unknown (%s); the delivery is sent again",
                    self._where(), problem, ended)
        return DeliveryError(f"destination {self._where()}: {problem}: the association's outcome unknown ({ended}; "
                             "the delivery is sent again)")

    def _send_one(self, assoc: Any, responses: _Responses, accepted: set[tuple[str, str]], path: Path,
                  sop_class: str, ts: str) -> None:
        if responses.problem:  # seen by the reactor between two requests
            assoc.abort()
            raise self._unknown(f"before the C-STORE of {path.name}: {responses.problem}")
        if not any(a[0] == sop_class for a in accepted):
            raise DeliveryError(f"destination {self._where()}: refused SOP class {UID(sop_class).name} "
                                f"({path.name})", retryable=False)
        what: Dataset | Path = path  # accepted as it is on disk: pynetdicom streams the file's own encoding
        if (sop_class, ts) not in accepted:
            try:
                what = dcmread(path)
                if ts not in UNCOMPRESSED:
                    what.decompress()  # the peer refused the compressed syntax: send it uncompressed
            except Exception as exc:  # noqa: BLE001 - pydicom/pylibjpeg errors
                raise DeliveryError(f"{path}: cannot be read or transcoded for {self._where()}: {exc}",
                                    retryable=False) from exc
            missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not what.get(k)]
            if missing:  # only the file meta names it: pynetdicom finds no context for '' (a retry cannot help)
                raise DeliveryError(f"{path}: cannot be transcoded for {self._where()}: the data set has no "
                                    f"{' / '.join(missing)}", retryable=False)
        if not assoc.is_established:  # the peer aborted it after the last response (or the connection dropped)
            raise _NoResponse(f"destination {self._where()}: no C-STORE response for {path.name} (the association "
                              "ended before it was sent)")
        message_id = responses.next_id()
        try:
            rsp = assoc.send_c_store(what, msg_id=message_id)
        except RuntimeError as exc:  # pynetdicom's "not established": the peer aborted it just now
            if assoc.is_established:
                raise DeliveryError(f"destination {self._where()}: C-STORE of {path.name} failed: {exc}") from exc
            raise _NoResponse(f"destination {self._where()}: no C-STORE response for {path.name} (the association "
                              "ended before it was sent)") from exc
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises on encoding/context problems
            # the connection broke while we wrote (the peer aborted it): unanswered, the file goes to another
            # association; a peer that stopped reading (TimeoutError) fails the attempt as before
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise _NoResponse(f"destination {self._where()}: no C-STORE response for {path.name} (the "
                                  f"connection ended while it was sent: {exc})") from exc
            raise DeliveryError(f"destination {self._where()}: C-STORE of {path.name} failed: {exc}") from exc
        finally:
            responses.done()
        if responses.problem:  # never a stale status for this instance: the association's outcome is unknown
            assoc.abort()
            raise self._unknown(f"C-STORE of {path.name} (message {message_id}): {responses.problem}")
        status = int(rsp.get("Status", -1)) if rsp is not None and len(rsp) else -1
        if status == -1:
            damaged = _damaged(path)  # a file the peer could not parse never gets an answer: do not resend it
            if damaged:
                raise DeliveryError(f"{path}: {damaged}; not sent to {self._where()}", retryable=False)
            raise _NoResponse(f"destination {self._where()}: no C-STORE response for {path.name} "
                                "(connection lost or timed out)")
        if not stored(status):
            raise DeliveryError(f"destination {self._where()}: C-STORE of {path.name} answered {label(status)}",
                                retryable=store_retryable(status))

    def check(self) -> None:
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc = self._associate(ae)
        try:
            rsp = assoc.send_c_echo()
            if rsp is None or int(rsp.get("Status", -1)) != Status.SUCCESS:
                raise DeliveryError(f"destination {self._where()}: C-ECHO failed")
        finally:
            if assoc.is_established:
                assoc.release()


def _accepted(assoc: Any) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) of each presentation context ``assoc``'s peer accepted."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}


def _damaged(path: Path) -> str:
    """Why the file at ``path`` is not a whole DICOM object ('' when it is): unreadable, or native (uncompressed)
    PixelData shorter than Rows × Columns × SamplesPerPixel × BitsAllocated/8 × NumberOfFrames (pydicom reads a
    truncated value without complaint; PS3.5 8.1.1 gives the length)."""
    try:
        ds = dcmread(path)
        if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
            return ""
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.BitsAllocated) * frames + 7) // 8
        have = len(ds.PixelData)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
        return f"not a readable DICOM file ({type(exc).__name__})"
    return f"file truncated: PixelData {have} of {expected} bytes" if have < expected else ""


def create(dest: DicomDestination) -> DimseSender:
    """The sender of kind ``DicomDestination.kind`` for ``dest`` (``node.send.base.make_sender``)."""
    return DimseSender(dest)
