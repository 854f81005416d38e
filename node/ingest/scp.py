"""Inbound DICOM: a pynetdicom AE with C-ECHO and C-STORE for every storage SOP class and transfer syntax.

The C-STORE handler never decodes pixels. pynetdicom writes the received dataset in chunks to the spool's
``incoming/`` folder (memory stays bounded); the handler hands that file to ``node.ingest.admit.Admission``
(header check, spool, index) and answers Success only once the file and its index row are on disk: the
group commit (``node.ingest.commit``) makes the files of every open association durable together, one sync and
one index transaction per batch. The associations' pynetdicom threads wait for their events instead of polling
every millisecond (``node.ingest.reactor``). With ``[node] receive_path = "lean"`` (the default) a plain C-STORE is
received by the node's own code in the association's reader thread (``node.ingest.lean``: same file, same
admission, same statuses, :meth:`StoreSCP.store_received`); everything else still goes through pynetdicom.

Statuses (``node.dimse.Status``): 0x0000 stored (a duplicate SOPInstanceUID is kept once and logged; one that
differs from the stored copy is kept aside and reported as a conflict), 0xA700 spool disk below the watermark or
not writable, 0xC210 cannot understand (truncated, UIDs missing or invalid, no pixel data in an image), 0x0122 SOP
class not supported, 0xA900 the dataset's SOP class or SOP instance is not the command's, 0x0110 an unexpected
failure. Associations calling another AE title than ours (``[node].require_called_ae``), unknown callers
(``[node].require_known_callers``) and a caller (calling AE title + address) that already has
``[node].max_associations_per_caller`` open, or whose address already has ``max_associations_per_address`` open
(whatever AE titles), get an association rejection (logged and audited), as does everyone
once the node is stopping. An association with no PDU for ``[node].idle_timeout_s`` is aborted.

A transfer that ends before its dataset is complete (A-ABORT, a dropped connection, a network timeout) leaves the
part pynetdicom had written in ``incoming/``; it is removed as soon as the association ends. What is being received
counts against the disk watermark while it arrives, not only once complete: every ``WATERMARK_CHECK_BYTES``
received on an association the spool's free space is checked, and below ``[node].min_free_mb`` the association
is aborted (the sender got no Success; it sends again later) and its partial file removed.

A disk that fills while a dataset arrives (ENOSPC, e.g. with ``[node].min_free_mb = 0``) does not end the
association: the partial file is removed at once, the rest of that dataset is read and dropped, and its C-STORE
is answered 0xA700 (``_DiskFullGuard``); the next instances of the association are stored once there is room.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socketserver
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AuditLog, PeerBudget
from node.config import Config, ReceivePath
from node.dimse import Status, label, max_pdu_problem
from node.errors import ConfigError, IngestError, listen_problem
from node.ingest.admit import Admission, Caller, find_caller
from node.ingest.lean import MAX_COMMAND_BYTES, LeanHooks
from node.ingest.reactor import pynetdicom_logs_info
from node.ingest.server import start_guarded_server
from node.metrics import Metrics

log = logging.getLogger(__name__)

# the kinds of association rejection (PeerBudget kinds) as srnode_associations_refused_total reasons
_REFUSAL_LABELS = {"max PDU": "max-pdu", "called AE title": "called-ae", "unknown caller": "unknown-caller",
                   "limit": "limit"}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4 (Table 9-21)
MAX_LOGGED_REFUSALS = 10  # WARNING lines naming a refused C-STORE, per association and status (then counted)
REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_BUSY = (0x02, 0x03, 0x01)  # transient, presentation related, temporary congestion
REJECT_MAX_PDU = (0x01, 0x01, 0x01)  # permanent, service user, no reason given (a maximum PDU length of 1-6)
REJECT_CALLER_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation related, local limit exceeded (PS3.8 9.3.4)
WATERMARK_CHECK_BYTES = 1 << 20  # received on one association between two checks of the spool's free space
# the largest data set of a message other than a C-STORE-RQ taken in memory (a Storage Commitment report of
# ~100,000 instances; a C-ECHO has none): pynetdicom gathers those without a bound
MAX_INLINE_DATASET_BYTES = 16 << 20
# the transfer syntaxes of the Storage Commitment context: pynetdicom's defaults without Deflated (make_ae)
REPORT_TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """The SCP's TLS context from ``[node.tls]`` (certificate chain, optional CA, optional client certificate
    requirement), or None when TLS is off. Raises OSError / ssl.SSLError for unreadable or bad files."""
    t = cfg.node.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile=t.cert, keyfile=t.key)
    if t.ca:
        ctx.load_verify_locations(cafile=t.ca)
    if t.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _DiskFullGuard:
    """Stands in for pynetdicom's temporary file of one dataset being received (``DIMSEMessage._data_set_file``):
    passes every write through until the disk is full (OSError ENOSPC); then closes and removes the partial file
    and drops the rest of the dataset, so that the C-STORE still reaches the handler, which answers 0xA700
    (PS3.4 B.2.3), instead of the error ending the association. ``disk_full`` tells the handler."""

    def __init__(self, fh: Any, max_bytes: int = 0) -> None:
        self._fh = fh
        self.name: str = fh.name
        self.file = self  # pynetdicom flushes through ``.file.flush()``
        self.disk_full = False
        self.max_bytes = max_bytes  # [node] max_instance_mb in bytes (0: none)
        self.written = 0
        self.oversize = 0  # bytes received once the data set passed max_bytes (then nothing more written)

    def write(self, data: bytes) -> int:
        if self.oversize:
            self.oversize += len(data)
            return len(data)
        self.written += len(data)
        if 0 < self.max_bytes < self.written:  # not written further: the file removed, answered 0xC211 (hostile19)
            self.oversize = self.written
            self._discard()
            return len(data)
        if not self.disk_full:
            try:
                return int(self._fh.write(data))
            except OSError as exc:
                self._spill(exc)
        return len(data)

    def flush(self) -> None:
        if not self.disk_full:
            try:
                self._fh.file.flush()
            except OSError as exc:
                self._spill(exc)

    def close(self) -> None:
        if not self.disk_full:
            try:
                self._fh.close()
            except OSError as exc:
                self._spill(exc)

    def _spill(self, exc: OSError) -> None:
        if exc.errno != errno.ENOSPC:
            raise exc
        self._discard()

    def _discard(self) -> None:
        """Nothing more is written or flushed; the file is closed (a close that flushes again after ENOSPC fails the
        same way, and closes all the same) and removed."""
        self.disk_full = True
        try:
            self._fh.close()
        except OSError:
            pass
        try:
            os.unlink(self.name)
        except OSError:
            pass


def _held_in_memory(message: Any) -> str | None:
    """What is wrong with the DIMSE message pynetdicom is assembling (``DIMSEServiceProvider.message``), or None:
    pynetdicom holds its command set, and the data set of any message but a C-STORE-RQ (that one goes to a file),
    in memory as the fragments come, without a bound. Past ``MAX_COMMAND_BYTES`` of command set or
    ``MAX_INLINE_DATASET_BYTES`` of such a data set the message is not a request the node serves: the text says
    which (no patient data)."""
    command = getattr(message, "encoded_command_set", None)
    if command is not None and command.tell() > MAX_COMMAND_BYTES:
        return f"a command set of more than {MAX_COMMAND_BYTES} bytes"
    data = getattr(message, "data_set", None)
    if getattr(message, "_data_set_file", None) is None and data is not None \
            and data.tell() > MAX_INLINE_DATASET_BYTES:
        kind = type(message).__name__.replace("_", "-")  # C-ECHO-RQ, ...; DIMSEMessage: no command yet
        name = "message's" if kind == "DIMSEMessage" else kind
        return (f"a {name} data set of more than {MAX_INLINE_DATASET_BYTES} bytes held in memory (only a C-STORE's "
                "is received to disk)")
    return None


def _interleaved(message: Any, primitive: Any) -> str | None:
    """Why the P-DATA ``primitive`` may not go to the DIMSE message being assembled (``message``, pynetdicom's
    ``DIMSEServiceProvider.message``), or None. Once a message's command set is complete (its ``context_id`` set)
    only its data set fragments, on its presentation context, may follow until the last one (PS3.8 9.3.5.1: no
    interleaving without negotiated asynchronous operations; the lean path aborts the same). pynetdicom took a
    command fragment there as more command set (both decoded as one: the first message never answered, its
    partial file left in incoming/ until the next start) and data fragments of another context as this
    message's. The PDVs after a last data fragment are not looked at (pynetdicom does not read them)."""
    cx = getattr(message, "context_id", None)
    if cx is None:
        return None
    for context_id, data in getattr(primitive, "presentation_data_value_list", []):
        control = data[0] if data else 0
        if control & 1 or context_id != cx:
            return "a fragment of another message arrived while a data set was being received"
        if control & 2:
            return None
    return None


def _live(assoc: Any) -> bool:
    """Whether an association is still open or being negotiated (its thread runs, not released, aborted or
    rejected)."""
    return bool(assoc.is_alive() and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected))


def _guard_disk_full(assoc: Any, max_bytes: int = 0) -> None:
    """Make the association's receiver survive a full disk, and bound what it holds in memory: every dataset
    file pynetdicom opens for it is wrapped in a :class:`_DiskFullGuard` as soon as it is created (pynetdicom
    creates it when the command set is complete; its dataset fragments come in later P-DATA); a message whose
    command set, or whose data set held in memory, grows past its bound (:func:`_held_in_memory`), or into whose
    data set another message's fragment comes (:func:`_interleaved`), is dropped with its partial file and the
    association aborted (A-ABORT, one line), as pynetdicom aborts a message it cannot decode. Both
    receive paths (the lean one hands pynetdicom every message but a plain C-STORE). Installed per association,
    before it is accepted."""
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or getattr(dimse, "_srnode_guarded", False):
        return
    receive = dimse.receive_primitive

    def drop(message: Any, problem: str) -> None:
        """Abort for ``problem``: the message's buffers freed, its partial file removed, A-ABORT (Evt19)."""
        log.warning("association from %s: %s: aborted", assoc.requestor.address, problem)
        name = getattr(getattr(message, "_data_set_file", None), "name", None)
        if name:
            try:
                message._data_set_file.close()
            except OSError:
                pass
            Path(name).unlink(missing_ok=True)
        message.encoded_command_set = io.BytesIO()  # freed now, not when the association ends
        message.data_set = io.BytesIO()
        message._data_set_file = None
        dimse.message = None
        dimse.dul.event_queue.put("Evt19")  # A-ABORT (as pynetdicom for a message it cannot decode)

    def guarded(primitive: Any) -> None:
        message: Any = dimse.message
        problem = _interleaved(message, primitive)
        if problem is not None:
            drop(message, problem)
            return
        try:
            receive(primitive)
        except OSError as exc:  # the first bytes of a dataset met a full disk in the call that created its file
            if exc.errno == errno.ENOSPC:
                name = getattr(getattr(dimse.message, "_data_set_file", None), "name", None)
                if name:
                    Path(name).unlink(missing_ok=True)
            raise
        message = dimse.message
        if message is None:
            return
        fh = getattr(message, "_data_set_file", None)
        if fh is not None and not isinstance(fh, _DiskFullGuard):
            message._data_set_file = _DiskFullGuard(fh, max_bytes)
        problem = _held_in_memory(message)
        if problem is not None:
            drop(message, problem)

    dimse.receive_primitive = guarded
    dimse._srnode_guarded = True


@dataclass
class _AssocCount:
    """What one association did: instances stored and refused, since when (monotonic seconds)."""

    started: float
    stored: int = 0  # answered Success, duplicates included
    duplicates: int = 0  # of those, SOPInstanceUIDs already held (the first copy kept, or a conflict kept aside)
    refused: int = 0
    unlogged: dict[int, int] = field(default_factory=dict)  # refusals past MAX_LOGGED_REFUSALS, by DIMSE status
    logged: dict[int, int] = field(default_factory=dict)  # refusals logged one by one, by DIMSE status


@dataclass
class StoreSCP:
    """The node's SCP. ``on_release`` is called after an association ends, released or aborted (a hint).
    ``on_report``, when given, answers Storage Commitment N-EVENT-REPORTs (``node.send.confirm``: the reports
    for the commitments the outbox requested) and the SCP accepts the Storage Commitment Push Model context."""

    cfg: Config
    admission: Admission
    metrics: Metrics
    audit: AuditLog | None = None
    on_release: Callable[[], None] | None = None
    on_report: Callable[[evt.Event], tuple[int, Any]] | None = None
    _server: ThreadedAssociationServer | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _counts: dict[int, _AssocCount] = field(default_factory=dict, init=False)  # per open association
    _received: dict[int, int] = field(default_factory=dict, init=False)  # assoc -> bytes since the last check
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _saved: tuple[bool, str | None] = field(default=(False, None), init=False)
    # associations let through the per-caller limit: id -> (association, calling AE title, address); an ended one
    # is dropped at the next admission (counted from live associations: nothing can leak)
    _admitted: dict[int, tuple[Any, str, str]] = field(default_factory=dict, init=False)
    _budget: PeerBudget | None = field(default=None, init=False)

    @property
    def budget(self) -> PeerBudget:
        """The per-address bound on refusal lines and audit records (``[node] refusals_logged_per_minute``)."""
        if self._budget is None:
            self._budget = PeerBudget(self.cfg.node.refusals_logged_per_minute)
        return self._budget

    def _rejected(self, calling: str, address: str, kind: str, line: str, **fields: Any) -> None:
        """One WARNING line ``line`` and one ``association-rejected`` audit record (``fields``), within the
        address's budget for that ``kind`` of rejection (:class:`node.audit.PeerBudget`: beyond it counted, the
        count written later); always counted in ``srnode_associations_refused_total{reason=...}``."""
        self.metrics.associations_refused.labels(reason=_REFUSAL_LABELS[kind]).inc()
        write, note = self.budget.take(address, kind)
        if not write:
            return
        log.warning("%s%s", line, f" ({note})" if note else "")
        if self.audit:
            self.audit.write("association-rejected", calling_ae=calling, address=address, **fields,
                             **({"note": note} if note else {}))

    # ------------------------------------------------------------------------------------ handlers

    def handlers(self) -> list[Any]:
        """The pynetdicom (event, handler) pairs: association requested / accepted / released / aborted,
        C-ECHO, C-STORE."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_DATA_RECV, self.on_data),
        ] + ([(evt.EVT_N_EVENT_REPORT, self.on_report)] if self.on_report is not None else [])

    def _admit(self, assoc: Any, calling: str, address: str) -> str | None:
        """Why ``assoc`` from the caller ``calling``@``address`` (calling AE title and peer address) may not be
        let in, or None (it is then counted): the caller already has ``[node] max_associations_per_caller`` live
        associations through this check, or its address ``max_associations_per_address`` (whatever AE titles
        they call with: any title gets in unless ``require_known_callers``, so one host calling as HOG1, HOG2,
        ... held every slot). Atomic: of requests negotiated at the same moment exactly as many as the limits
        allow get in (counting every association being negotiated instead refused all four of four at a limit
        of 2)."""
        node = self.cfg.node
        per_caller, per_address = node.max_associations_per_caller, node.max_associations_per_address
        with self._lock:
            self._admitted = {k: v for k, v in self._admitted.items() if _live(v[0])}
            others = [(c, a) for other, c, a in self._admitted.values() if other is not assoc]
            caller = sum(1 for c, a in others if (c, a) == (calling, address))
            host = sum(1 for _, a in others if a == address)
            why = None
            if per_caller and caller >= per_caller:
                why = (f"{caller} open from this caller (calling AE title and address), "
                       f"node.max_associations_per_caller = {per_caller}")
            elif per_address and host >= per_address:
                why = (f"{host} open from {address} (any calling AE title), "
                       f"node.max_associations_per_address = {per_address}")
            else:
                self._admitted[id(assoc)] = (assoc, calling, address)
            return why

    def on_requested(self, event: evt.Event) -> None:
        """Reject the association (A-ASSOCIATE-RJ) when the node is stopping (``REJECT_BUSY``), when the caller's
        maximum PDU length is 1-6 bytes (``REJECT_MAX_PDU``, audited: no P-DATA-TF fits, so no response could be
        sent, ``node.dimse.max_pdu_problem``) or, with ``[node].require_known_callers``, when the caller is not
        in ``[node].allowed_callers`` (``REJECT_UNKNOWN_CALLER``, audited), or when the caller already has
        ``[node].max_associations_per_caller`` associations open, or its address ``max_associations_per_address``
        (``REJECT_CALLER_LIMIT``, audited; counted by
        :meth:`_admit`). Installs the full-disk guard (``_guard_disk_full``) first."""
        assoc = event.assoc
        _guard_disk_full(assoc, self.cfg.node.max_instance_mb << 20)
        calling = str(assoc.requestor.primitive.calling_ae_title).strip() if assoc.requestor.primitive else ""
        address = str(assoc.requestor.address)
        if self._stopping:
            log.info("association from %s@%s rejected: the node is stopping", calling, address)
            assoc.acse.send_reject(*REJECT_BUSY)
            assoc.kill()  # waits until the rejection went out (as pynetdicom's own rejections do)
            return
        node = self.cfg.node
        too_small = max_pdu_problem(assoc.requestor.maximum_length) if assoc.requestor.primitive else None
        if too_small is not None:  # no response could be sent within it (node.dimse.max_pdu_problem)
            self._rejected(calling, address, "max PDU",
                           f"association from {calling}@{address} rejected: {too_small}", reason=too_small)
            assoc.acse.send_reject(*REJECT_MAX_PDU)
            assoc.kill()
            return
        called = str(assoc.requestor.primitive.called_ae_title).strip() if assoc.requestor.primitive else ""
        if node.require_called_ae and called != node.ae_title.strip():
            self._rejected(calling, address, "called AE title",
                           f"association from {calling}@{address} rejected: it called AE title "
                           f"{called!r}, ours is {node.ae_title!r} (node.require_called_ae)", called_ae=called,
                           reason=f"called AE title is not ours ({node.ae_title})")
            assoc.acse.send_reject(*REJECT_CALLED_AE)
            assoc.kill()
            return
        if node.require_known_callers and find_caller(node.allowed_callers, calling, address) is None:
            self._rejected(calling, address, "unknown caller",
                           f"association from {calling}@{address} rejected: caller not in node.allowed_callers",
                           reason="caller not in node.allowed_callers")
            assoc.acse.send_reject(*REJECT_UNKNOWN_CALLER)
            assoc.kill()
            return
        why = self._admit(assoc, calling, address)
        if why is not None:
            self._rejected(calling, address, "limit",
                           f"association from {calling}@{address} rejected (local limit exceeded): {why}", reason=why)
            assoc.acse.send_reject(*REJECT_CALLER_LIMIT)
            assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        """Start counting the association's stored / refused instances; one more active association."""
        with self._lock:
            self._counts[id(event.assoc)] = _AssocCount(time.monotonic())
        self.metrics.active_associations.inc()

    def on_closed(self, event: evt.Event) -> None:
        """An accepted association released or aborted: remove what an aborted transfer left in incoming/, audit
        its counts, log one INFO line (caller, address, instances stored/refused, duration; no patient data), one
        fewer active association, call ``on_release``."""
        if event.event is evt.EVT_ABORTED:
            self._discard_partial(event.assoc)
        with self._lock:
            counts = self._counts.pop(id(event.assoc), None)
            self._received.pop(id(event.assoc), None)
        if counts is None:
            return
        self.metrics.active_associations.dec()
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        calling, address = str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
        # "0 new, 28 already held" (ops19: "28 instance(s) stored (28 of them already held)" read as 28 stored)
        stored = (f"{counts.stored} instance(s) accepted: {counts.stored - counts.duplicates} new, {counts.duplicates} "
                  "already held (the first copy kept)" if counts.duplicates else f"{counts.stored} instance(s) stored")
        unlogged = ", ".join(f"0x{k:04X} x{v}" for k, v in sorted(counts.unlogged.items()))
        quiet = (f" ({sum(counts.unlogged.values())} of them not logged one by one: {unlogged})"
                 if counts.unlogged else "")
        log.info("association from %s@%s %s after %.1f s: %s, %d refused%s", calling, address,
                 how, time.monotonic() - counts.started, stored, counts.refused, quiet)
        if self.audit:
            extra = {"refused_not_logged": {f"0x{k:04X}": v for k, v in sorted(counts.unlogged.items())}} \
                if counts.unlogged else {}
            self.audit.write("association", calling_ae=calling, address=address, end=how, stored=counts.stored,
                             duplicates=counts.duplicates, refused=counts.refused, **extra)
        if self.on_release is not None:
            self.on_release()

    def on_data(self, event: evt.Event) -> None:
        """A PDU arrived: every WATERMARK_CHECK_BYTES per association, the spool must still be above its watermark,
        else the transfer is aborted before it fills the disk further (runs in the association's reader thread)."""
        self.data_received(event.assoc, len(event.data))

    def data_received(self, assoc: Any, size: int) -> None:
        """``size`` bytes (one PDU) arrived on ``assoc``: :meth:`on_data`'s check, called directly by the lean
        receive path (``node.ingest.lean``)."""
        key = id(assoc)
        with self._lock:
            n = self._received.get(key, 0) + size
            self._received[key] = 0 if n >= WATERMARK_CHECK_BYTES else n
        if n < WATERMARK_CHECK_BYTES or self.admission.spool.has_space():
            return
        spool = self.admission.spool
        calling = str(getattr(assoc.requestor, "ae_title", "")).strip()
        why = (f"spool disk {spool.root} has {spool.free_mb():.0f} MB free, below node.min_free_mb = "
               f"{spool.min_free_mb} ({spool.incoming_bytes() / 2**20:.0f} MB of it in incoming/)")
        log.warning("association from %s@%s aborted during a transfer: %s", calling, assoc.requestor.address, why)
        if self.audit:
            self.audit.write("transfer-aborted", calling_ae=calling, address=str(assoc.requestor.address),
                             reason=why)
        self.metrics.failures.labels(where="ingest", reason="0xA700").inc()
        assoc.abort(block=False)

    def on_conn_close(self, event: evt.Event) -> None:
        """The connection is gone (whatever ended it): nothing of the association is still being received."""
        with self._lock:
            self._received.pop(id(event.assoc), None)
        self._discard_partial(event.assoc)

    def _discard_partial(self, assoc: Any) -> None:
        """Remove the dataset files of this association that will never reach the handler: the one pynetdicom was
        writing when the transfer ended, and complete ones still queued behind it (the peer got no answer for
        them and will send them again)."""
        dimse = getattr(assoc, "dimse", None)
        files: list[Any] = [getattr(getattr(dimse, "message", None), "_data_set_file", None)]
        lean = getattr(getattr(assoc, "dul", None), "lean", None)  # the lean path's file (node.ingest.lean)
        lean_path = lean.drop_partial() if lean is not None else None
        if lean_path is not None:
            files.append(lean_path)
        queue = getattr(dimse, "msg_queue", None)
        while queue is not None:
            try:
                item = queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                break
            files.append(getattr(item[1], "_dataset_file", None) if isinstance(item, tuple) else None)
        n = 0
        for fh in files:
            name = fh if isinstance(fh, Path) else getattr(fh, "name", None)
            if not name:
                continue
            try:
                Path(name).unlink()
                n += 1
            except FileNotFoundError:
                continue
            except OSError as exc:  # pragma: no cover - permissions
                log.warning("partial file %s of an ended association not removed: %s", name, exc)
        if n:
            calling = str(getattr(assoc.requestor, "ae_title", "")).strip()
            log.warning("association from %s@%s ended during a transfer: %d incomplete dataset file(s) removed "
                        "from incoming/", calling, assoc.requestor.address, n)
            if self.audit:
                self.audit.write("transfer-incomplete", calling_ae=calling, address=str(assoc.requestor.address),
                                 removed=n)

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO (Verification SOP Class, PS3.4 Annex A): always 0x0000."""
        return Status.SUCCESS

    def _count(self, key: int, ok: bool, duplicate: bool = False) -> None:
        with self._lock:
            c = self._counts.get(key)
            if c is not None:
                if ok:
                    c.stored += 1
                    c.duplicates += duplicate
                else:
                    c.refused += 1

    def _refusal(self, assoc: Any, status: int) -> bool:
        """Count a refused C-STORE of ``assoc`` (answered ``status``); True when its WARNING line is to be written:
        the first ``MAX_LOGGED_REFUSALS`` of an association with that status. The next one with it writes one line
        saying that the rest with it are counted; they are counted by status in the association's end line and
        audit record. A peer sending thousands of instances the node refuses on one association wrote one line each
        (2,000 tiny data sets without SeriesInstanceUID: 2,000 lines, 284 KB), where a STOW-RS request logs 10
        (hostile17). The bound is per status (review19: one bound for all, 30 refusals 0xC210 silenced the line of
        a later 0xC211, or the traceback of an unexpected error, 0x0110, on the same association): at most
        ``MAX_LOGGED_REFUSALS`` lines for each of the few statuses a C-STORE is refused with."""
        key = id(assoc)
        with self._lock:
            c = self._counts.get(key)
            if c is None:
                return True
            c.refused += 1
            if c.logged.get(status, 0) < MAX_LOGGED_REFUSALS:
                c.logged[status] = c.logged.get(status, 0) + 1
                return True
            c.unlogged[status] = c.unlogged.get(status, 0) + 1
            first = c.unlogged[status] == 1
        if first:
            log.warning("association from %s@%s: more than %d C-STOREs refused: the next ones are counted, not "
                        "logged one by one (status 0x%04X; their count by status ends the association's line)",
                        str(assoc.requestor.ae_title).strip(), assoc.requestor.address, MAX_LOGGED_REFUSALS, status)
        return False

    def on_store(self, event: evt.Event) -> int:
        """C-STORE (pynetdicom's receive path): admit the file pynetdicom wrote to the spool's ``incoming/`` (no
        decoding here), as :meth:`store_received`."""
        req: Any = event.request  # a C_STORE primitive
        if getattr(req, "_dataset_path", None) is None and getattr(req, "_dataset_file", None) is None:
            caller = str(event.assoc.requestor.ae_title).strip()
            if self._refusal(event.assoc, Status.CANNOT_UNDERSTAND):
                log.warning("C-STORE from %s refused (0x%04X): the request carries no data set", caller,
                            Status.CANNOT_UNDERSTAND)
            return Status.CANNOT_UNDERSTAND
        oversize = getattr(req._dataset_file, "oversize", 0)
        if oversize:  # written only up to max_instance_mb: its partial file is already removed
            return self.store_oversize(event.assoc, str(req.AffectedSOPInstanceUID or ""), oversize)
        full = getattr(req._dataset_file, "disk_full", False)  # its partial file is already removed
        return self.store_received(event.assoc, None if full else Path(event.dataset_path),
                                   str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or ""),
                                   str(event.context.transfer_syntax))

    def store_oversize(self, assoc: Any, sop_instance: str, received: int) -> int:
        """A C-STORE whose data set passed ``[node] max_instance_mb`` while it arrived (both receive paths): what
        came beyond it was read and dropped, not written (the partial file removed at the limit); answered 0xC211
        (as a file over it found once written: sent again it is refused again), one line within the association's
        budget. Before, the whole data set went to the spool's ``incoming/`` first (100 MiB sent under
        ``max_instance_mb = 8``: 100 MiB written), down to the disk watermark that refuses every caller."""
        limit = self.cfg.node.max_instance_mb
        if self._refusal(assoc, Status.TOO_LARGE):
            log.warning("C-STORE from %s refused (0x%04X): instance %s: its data set passed node.max_instance_mb = "
                        "%d while it arrived (%d bytes came): not written beyond it", str(assoc.requestor.ae_title)
                        .strip(), Status.TOO_LARGE, sop_instance, limit, received)
        self.metrics.instances_received.labels(status=label(Status.TOO_LARGE)).inc()
        return Status.TOO_LARGE

    def store_received(self, assoc: Any, path: Path | None, sop_class: str, sop_instance: str,
                       transfer_syntax: str) -> int:
        """Admit one received data set: the file at ``path`` (in the spool's ``incoming/``; None: the disk filled
        while it arrived and its partial file is gone) that association ``assoc`` sent under a C-STORE naming
        ``sop_class`` / ``sop_instance``, on a context of ``transfer_syntax``. Both receive paths (``on_store``;
        ``node.ingest.lean``) call it.

        Returns the DIMSE status: 0x0000 once the file and its index row are durable, 0xA700 for a full disk,
        the IngestError's status (PS3.4 B.2.3), or 0x0110 for any other error (PS3.7 C.4.2).
        """
        caller = Caller(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address))
        key = id(assoc)
        if path is None:
            if self._refusal(assoc, Status.OUT_OF_RESOURCES):
                log.warning("C-STORE from %s refused (0x%04X): instance %s: the spool disk %s filled up while it "
                            "arrived; its partial file was removed", caller.ae_title, Status.OUT_OF_RESOURCES,
                            sop_instance, self.admission.spool.root)
            self.metrics.instances_received.labels(status=label(Status.OUT_OF_RESOURCES)).inc()
            self.metrics.failures.labels(where="ingest", reason="disk-full").inc()
            return Status.OUT_OF_RESOURCES
        try:
            stored = self.admission.admit_file(path, caller, declared_sop_class=sop_class,
                                               transfer_syntax=transfer_syntax, declared_sop_instance=sop_instance)
        except IngestError as exc:
            if self._refusal(assoc, exc.status):
                log.warning("C-STORE from %s refused (0x%04X): instance %s: %s", caller.ae_title, exc.status,
                            sop_instance, exc)
            return exc.status
        except Exception as exc:  # noqa: BLE001 - an SCP must answer with a status, never crash
            if self._refusal(assoc, Status.PROCESSING_FAILURE):
                log.exception("C-STORE from %s: instance %s: unexpected error: %s", caller.ae_title, sop_instance,
                              exc)
            self.metrics.failures.labels(where="ingest", reason=type(exc).__name__).inc()
            return Status.PROCESSING_FAILURE
        self._count(key, True, stored.duplicate)
        return Status.SUCCESS

    # ------------------------------------------------------------------------------------ life cycle

    def make_ae(self) -> AE:
        """The pynetdicom AE: ``[node].ae_title``, max associations and PDU size, any called AE title
        accepted, Verification and every storage SOP class with every transfer syntax pynetdicom knows."""
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.idle_timeout_s  # no PDU for this long: A-ABORT (the association reactor checks it)
        if node.max_pdu:
            ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        if self.on_report is not None:  # the peer reports as the Storage Commitment SCP (role selection)
            # not deflated: pynetdicom inflates an N-EVENT-REPORT's event information whole, before the node can
            # ask who sent it (1 MB of deflate stream from any caller: +2 GB); every SCU has Implicit VR LE
            ae.add_supported_context(StorageCommitmentPushModel, REPORT_TRANSFER_SYNTAXES, scu_role=True,
                                     scp_role=True)
        return ae

    def lean_hooks(self) -> LeanHooks | None:
        """What the lean receive path needs (``node.ingest.lean``), or None with ``[node] receive_path =
        "pynetdicom"``."""
        if self.cfg.node.receive_path is not ReceivePath.LEAN:
            return None
        if pynetdicom_logs_info():
            log.warning("[node] receive_path = \"lean\" is not used while the pynetdicom logger is at INFO or below "
                        "(its log handlers watch every PDU and DIMSE message): C-STOREs are received by pynetdicom; "
                        "set the pynetdicom logger to WARNING for the lean path")
        return LeanHooks(incoming=self.admission.spool.incoming, store=self.store_received,
                         received=self.data_received, max_bytes=self.cfg.node.max_instance_mb << 20,
                         oversize=self.store_oversize)

    def start(self) -> None:
        """Listen on [node].host:port (TLS when [node.tls].enabled); returns once the socket is bound.

        Sets process-wide state until :meth:`stop`: pynetdicom's chunked receive and ``tempfile.tempdir`` (the
        spool's ``incoming/``). Raises OSError when the port cannot be bound.
        """
        # pynetdicom writes each received dataset to a temporary file; keep those on the spool's disk
        self._saved = (_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
        # torch's compile cache folder defaults to tempfile's folder: keep it where it was, not in incoming/,
        # which the next start empties (before ops19 every run of a job left incoming/torchinductor_<user>/,
        # removed at the next start as "1 partial file(s) removed" after a graceful stop)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "torchinductor_srnode"))
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.admission.spool.incoming)
        node = self.cfg.node
        ae = self.make_ae()
        try:
            self._server = start_guarded_server(ae, (node.host, node.port), self.handlers(),
                                                server_ssl_context(self.cfg),
                                                handshake_timeout_s=node.tls.handshake_timeout_s,
                                                association_timeout_s=node.association_timeout_s, audit=self.audit,
                                                lean_hooks=self.lean_hooks(),
                                                message_timeout_s=node.message_timeout_s, budget=self.budget,
                                                on_refused=lambda why: self.metrics.associations_refused.labels(
                                                    reason=why).inc())
        except OSError as exc:
            _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = self._saved
            raise ConfigError(listen_problem("DICOM port", "node", node.host, node.port, exc)) from exc
        log.info("DICOM SCP %s listening on %s:%d%s", node.ae_title, node.host, node.port,
                 " (TLS)" if node.tls.enabled else "")

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new associations, let the open ones finish (up to ``timeout`` seconds, then abort them),
        then close and restore the process-wide settings."""
        if self._server is None:
            return
        self._stopping = True
        server = self._server
        socketserver.BaseServer.shutdown(server)  # stop accepting; open associations keep running
        deadline = time.monotonic() + timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(server.active_associations)
        if left:
            log.warning("DICOM SCP: %d association(s) still open after %.0f s, aborting them", left, timeout)
            for a in server.active_associations:
                a.abort()
        server.shutdown()
        self._server = None
        _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = self._saved
        for address, n in self.budget.flush().items():  # refusals counted, not written yet (PeerBudget)
            log.warning("%d more refused association(s) / dropped connection(s) from %s were counted, not written "
                        "one by one (node.refusals_logged_per_minute = %d)", n, address,
                        self.cfg.node.refusals_logged_per_minute)
            if self.audit:
                self.audit.write("refusals-not-written", address=address, count=n)
        log.info("DICOM SCP stopped")
