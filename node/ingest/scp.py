"""Inbound DICOM: a pynetdicom AE with C-ECHO and C-STORE for every storage SOP class and transfer syntax.

The C-STORE handler never decodes pixels. It reads the header of the received file (pynetdicom writes it in
chunks to the spool's ``incoming/`` folder, so memory stays bounded), checks the UIDs and that the file is
complete, links the file into the spool, records it in the index and only then answers Success.

Statuses: 0x0000 stored (a duplicate SOPInstanceUID is kept once and logged), 0xA700 spool disk below the
watermark or not writable, 0xC210 cannot understand (truncated, UIDs missing or invalid, no pixel data in an
image), 0x0122 SOP class not supported. Unknown callers (when ``[node].require_known_callers``) get an
association rejection, as does everyone once the node is stopping.
"""

from __future__ import annotations

import logging
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AuditLog
from node.config import CallerConfig, Config
from node.errors import IngestError
from node.index import Index, Instance
from node.metrics import METRICS
from node.spool import Spool, valid_uid

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
SUCCESS, REFUSED_SOP_CLASS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0x0122, 0xA700, 0xC210
PROCESSING_FAILURE = 0x0110
_UNDEFINED_LENGTH = 0xFFFFFFFF

# A-ASSOCIATE-RJ (result, source, diagnostic)
REJECT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_BUSY = (0x02, 0x03, 0x01)  # transient, presentation related, temporary congestion


@dataclass(frozen=True)
class Header:
    """What the handler learns from a received file, without its pixels."""

    sop_uid: str
    series_uid: str
    study_uid: str
    modality: str


def _pixel_data_end(fh: BinaryIO, little: bool, implicit: bool) -> tuple[int, str] | None:
    """From the start of the pixel data element: (offset where its value ends, tag) or None at end of file.

    Encapsulated (undefined length) pixel data is walked item by item up to its sequence delimiter.
    """
    end = "<" if little else ">"
    head = fh.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = f"({group:04X},{elem:04X})"
    if implicit:
        (length,) = struct.unpack(end + "L", head[4:8])
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        more = fh.read(4)
        if len(more) < 4:
            return fh.tell() + 4, tag
        (length,) = struct.unpack(end + "L", more)
    else:
        (length,) = struct.unpack(end + "H", head[6:8])
    if length != _UNDEFINED_LENGTH:
        return fh.tell() + length, tag
    while True:  # encapsulated: items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD)
        item = fh.read(8)
        if len(item) < 8:
            return fh.tell() + 8, tag
        ig, ie, ilen = struct.unpack(end + "HHL", item)
        if (ig, ie) == (0xFFFE, 0xE0DD):
            return fh.tell(), tag
        fh.seek(ilen, 1)


def read_header(path: Path, sop_class: str) -> Header:
    """Parse the header of a received file; IngestError(0xC210) naming the reason when it is unusable.

    Pixels are not decoded; the pixel data element is only checked to lie wholly inside the file.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            ds: Dataset = dcmread(fh, stop_before_pixels=True)
            deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
            has_pixels = fh.tell() < size and not deflated
            ends = _pixel_data_end(fh, ds.original_encoding[1] is not False,
                                   ds.original_encoding[0] is not False) if has_pixels else None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
        raise IngestError(f"file cannot be parsed: {type(exc).__name__}: {exc}", CANNOT_UNDERSTAND) from exc
    if ends is not None and ends[0] > size:
        raise IngestError(f"file is truncated: element {ends[1]} ends at byte {ends[0]}, the file has {size}",
                          CANNOT_UNDERSTAND)
    uids: dict[str, str] = {}
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        try:
            value = str(ds.get(kw, "") or "").strip()
        except Exception as exc:  # noqa: BLE001 - a malformed value
            raise IngestError(f"{kw} cannot be read: {exc}", CANNOT_UNDERSTAND) from exc
        if not value:
            raise IngestError(f"{kw} is missing or empty", CANNOT_UNDERSTAND)
        if not valid_uid(value):
            raise IngestError(f"{kw} {value!r} is not a valid UID", CANNOT_UNDERSTAND)
        uids[kw] = value
    name = UID(sop_class).name if sop_class else ""
    if "Image Storage" in name and ends is None and not deflated:
        raise IngestError(f"{name} without pixel data", CANNOT_UNDERSTAND)
    try:
        modality = str(ds.get("Modality", "") or "")
    except Exception as exc:  # noqa: BLE001 - a malformed value (found by tests/fuzz/fuzz_ingest.py)
        raise IngestError(f"Modality cannot be read: {exc}", CANNOT_UNDERSTAND) from exc
    return Header(sop_uid=uids["SOPInstanceUID"], series_uid=uids["SeriesInstanceUID"],
                  study_uid=uids["StudyInstanceUID"], modality=modality)


def find_caller(callers: tuple[CallerConfig, ...], ae_title: str, address: str) -> CallerConfig | None:
    for c in callers:
        if c.ae_title.strip() == ae_title.strip() and (not c.host or c.host == address):
            return c
    return None


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
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


@dataclass
class StoreSCP:
    """The node's SCP. ``on_release`` is called after an association is released (a stability hint)."""

    cfg: Config
    spool: Spool
    index: Index
    audit: AuditLog | None = None
    on_release: Callable[[], None] | None = None
    _server: ThreadedAssociationServer | None = field(default=None, init=False)
    _stopping: bool = field(default=False, init=False)
    _counts: dict[int, list[int]] = field(default_factory=dict, init=False)  # assoc -> [stored, refused]
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _saved: tuple[bool, str | None] = field(default=(False, None), init=False)

    # ------------------------------------------------------------------------------------ handlers

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip() if assoc.requestor.primitive else ""
        address = str(assoc.requestor.address)
        if self._stopping:
            log.info("association from %s@%s rejected: the node is stopping", calling, address)
            assoc.acse.send_reject(*REJECT_BUSY)
            assoc.kill()  # waits until the rejection went out (as pynetdicom's own rejections do)
            return
        node = self.cfg.node
        if node.require_known_callers and find_caller(node.allowed_callers, calling, address) is None:
            log.warning("association from %s@%s rejected: caller not in node.allowed_callers", calling, address)
            if self.audit:
                self.audit.write("association-rejected", calling_ae=calling, address=address,
                                 reason="caller not in node.allowed_callers")
            assoc.acse.send_reject(*REJECT_UNKNOWN_CALLER)
            assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._counts[id(event.assoc)] = [0, 0]
        METRICS.active_associations.inc()

    def on_closed(self, event: evt.Event) -> None:
        with self._lock:
            counts = self._counts.pop(id(event.assoc), None)
        if counts is None:
            return
        METRICS.active_associations.dec()
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if self.audit:
            self.audit.write("association", calling_ae=str(event.assoc.requestor.ae_title).strip(),
                             address=str(event.assoc.requestor.address), end=how, stored=counts[0],
                             refused=counts[1])
        if self.on_release is not None:
            self.on_release()

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _count(self, event: evt.Event, ok: bool) -> None:
        with self._lock:
            c = self._counts.get(id(event.assoc))
            if c is not None:
                c[0 if ok else 1] += 1

    def on_store(self, event: evt.Event) -> int:
        req: Any = event.request  # a C_STORE primitive
        sop_class = str(req.AffectedSOPClassUID or "")
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            status = self._store(event, sop_class, calling)
        except IngestError as exc:
            log.warning("C-STORE from %s refused (0x%04X): instance %s: %s", calling, exc.status,
                        req.AffectedSOPInstanceUID, exc)
            METRICS.instances_received.labels(status=f"0x{exc.status:04X}").inc()
            METRICS.failures.labels(where="ingest", reason=f"0x{exc.status:04X}").inc()
            self._count(event, False)
            return exc.status
        except Exception as exc:  # noqa: BLE001 - an SCP must answer with a status, never crash
            log.exception("C-STORE from %s: instance %s: unexpected error: %s", calling,
                          req.AffectedSOPInstanceUID, exc)
            METRICS.failures.labels(where="ingest", reason=type(exc).__name__).inc()
            self._count(event, False)
            return PROCESSING_FAILURE
        METRICS.instances_received.labels(status="0x0000").inc()
        self._count(event, True)
        return status

    def _store(self, event: evt.Event, sop_class: str, calling: str) -> int:
        if sop_class not in STORAGE_SOP_CLASSES:
            raise IngestError(f"SOP class {sop_class!r} is not a storage SOP class", REFUSED_SOP_CLASS)
        self.spool.check_space()
        path = Path(event.dataset_path)
        header = read_header(path, sop_class)
        stored = self.spool.store_file(path, header.study_uid, header.series_uid, header.sop_uid)
        caller = find_caller(self.cfg.node.allowed_callers, calling, str(event.assoc.requestor.address))
        inst = Instance(sop_uid=header.sop_uid, series_uid=header.series_uid, study_uid=header.study_uid,
                        sop_class=sop_class, transfer_syntax=str(event.context.transfer_syntax),
                        path=str(stored.path), calling_ae=calling,
                        allowed_rules=",".join(caller.rules) if caller else "")
        added = self.index.add_instance(inst, header.modality, stored.path.stat().st_size)
        if not added:
            log.info("duplicate instance %s of series %s from %s: kept the copy already stored", header.sop_uid,
                     header.series_uid, calling)
        return SUCCESS

    # ------------------------------------------------------------------------------------ life cycle

    def make_ae(self) -> AE:
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        if node.max_pdu:
            ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Listen on [node].host:port (TLS when [node.tls].enabled); returns once the socket is bound."""
        # pynetdicom writes each received dataset to a temporary file; keep those on the spool's disk
        self._saved = (_config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir)
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.spool.incoming)
        node = self.cfg.node
        ae = self.make_ae()
        self._server = ae.start_server((node.host, node.port), block=False, evt_handlers=self.handlers(),
                                       ssl_context=server_ssl_context(self.cfg))
        log.info("DICOM SCP %s listening on %s:%d%s", node.ae_title, node.host, node.port,
                 " (TLS)" if node.tls.enabled else "")

    @property
    def active(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new associations, let the open ones finish (up to ``timeout``), then close."""
        import socketserver
        import time

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
        log.info("DICOM SCP stopped")
