"""Delivery confirmed, not assumed: after a destination accepted a delivery's files, the destination is asked
whether it holds them, and only its answer makes the delivery ``delivered``.

Methods, by the destination's ``confirm`` (``node.config.ConfirmMethod``) and kind:

- DICOM, ``auto`` or ``commitment``: DICOM Storage Commitment, Push Model (PS3.4 Annex J). An N-ACTION (action
  type 1) lists the SOP instances sent under a new Transaction UID; the peer answers later with an N-EVENT-REPORT
  (event type 1: all committed, 2: some failed) on a new association to the node's own SCP (``StoreSCP``
  ``on_report``). The Transaction UID, the instances expected and a deadline (``[outbox] confirm_timeout_s``) are
  stored in the index *before* the N-ACTION goes out, so a report that comes at once, or to a restarted node,
  still finds its delivery; at start-up a delivery still awaiting its report is asked again under a new UID
  (``resume``). The peer must know the node as a modality: Orthanc sends the report to the DicomModalities entry
  whose AE title is the delivery's calling AE title (``calling_ae_title``, "" = "SRNODE"), at that entry's
  host and port (the node's [node] port); Orthanc answers asynchronously only.
- DICOM, ``auto`` when the peer refuses the Storage Commitment context or request (Orthanc refuses the request
  of a caller that is not in its DicomModalities), or ``count``: a C-FIND (Study Root,
  IMAGE level) per series of the delivery lists the SOP Instance UIDs the peer holds.
- Orthanc REST (``auto``/``count``): ``POST /tools/find`` at Instance level per series.
- DICOMweb (``auto``/``count``): QIDO-RS ``GET {root}/studies/{study}/series/{series}/instances``.
- ``none``, and folder destinations: delivered once the files were accepted (folder: written and fsync'd), shown
  as "not confirmed".

A confirmation that finds fewer of the sent instances than were sent is a failed attempt ("expected N, PACS has
M"): the outbox sends the delivery again (all its files: a resend is harmless) after its backoff, and after
``[outbox] max_attempts`` dead-letters it with those numbers. A report not received by the deadline is a failed
attempt too. A DICOM peer under ``auto`` that refuses both Storage Commitment and C-FIND (dcmtk's storescp) ends
in the distinct state ``unconfirmed`` ("peer supports neither storage commitment nor C-FIND"), never silently
``delivered``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import (
    Config,
    ConfirmMethod,
    Destination,
    DicomDestination,
    DicomwebDestination,
    FolderDestination,
    OrthancDestination,
)
from node.dimse import PENDING_STATUSES, Status, assoc_no_delay, max_pdu_problem
from node.errors import DeliveryError
from node.metrics import Metrics
from node.store import Delivery, DeliveryState, Index

log = logging.getLogger(__name__)

# (StudyInstanceUID, SeriesInstanceUID, SOPClassUID, SOPInstanceUID) of one file sent
Ref = tuple[str, str, str, str]

# the well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
METHOD_COMMITMENT, METHOD_COUNT, METHOD_NONE = "commitment", "count", "none"
NEITHER = "peer supports neither storage commitment nor C-FIND"
REJECTED_TRANSIENT = 0x02  # A-ASSOCIATE-RJ Result (PS3.8 9.3.4): rejected-transient, worth another try


class Unsupported(Exception):
    """The peer refuses the service asked for (its presentation context, or the whole association)."""


class Mismatch(DeliveryError):
    """The destination holds fewer of the sent instances than were sent; ``confirmed``: how many it holds."""

    def __init__(self, message: str, confirmed: int) -> None:
        super().__init__(message, retryable=True)
        self.confirmed = confirmed


class Settle(Protocol):
    """What the outbox does when a confirmation ends (``node.send.outbox.Outbox``)."""

    def failed(self, d: Delivery, exc: Exception) -> None: ...

    def settled(self, d: Delivery) -> None: ...


def sop_refs(paths: Sequence[Path]) -> list[Ref]:
    """(study, series, SOP class, SOP instance) of each file; DeliveryError (not retryable) for an unreadable one."""
    out: list[Ref] = []
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"])
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
            raise DeliveryError(f"{p}: not a readable DICOM file: {exc}", retryable=False) from exc
        out.append((str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                    str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))))
    return out


def _by_series(refs: Sequence[Ref]) -> dict[tuple[str, str], set[str]]:
    series: dict[tuple[str, str], set[str]] = defaultdict(set)
    for study, ser, _, sop in refs:
        series[(study, ser)].add(sop)
    return series


# ------------------------------------------------------------------------------------------------ DIMSE


def _associate(dest: DicomDestination, context: str) -> Any:
    """An association to ``dest`` proposing only ``context`` (Implicit/Explicit VR LE). Unsupported when the peer
    rejects it or accepts no context; DeliveryError (retryable) when it cannot be reached."""
    from node.send.dimse import client_ssl_context  # the sender's TLS settings, unchanged

    ae = AE(ae_title=dest.calling_ae_title or "SRNODE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.add_requested_context(context)
    kwargs: dict[str, Any] = {"ae_title": dest.ae_title}
    if dest.tls:
        kwargs["tls_args"] = (client_ssl_context(dest), dest.host)
    answers: list[Any] = []  # the peer's A-ASSOCIATE-AC / -RJ, if one came
    kwargs["evt_handlers"] = [(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
    try:
        assoc = ae.associate(dest.host, dest.port, **kwargs)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"destination {dest.name} ({dest.address}): cannot connect to confirm: {exc}") from exc
    if assoc.is_rejected:
        if any(getattr(a, "result", None) == REJECTED_TRANSIENT for a in answers):
            raise DeliveryError(f"destination {dest.name} ({dest.address}): association to confirm rejected "
                                "(transient)")
        raise Unsupported("association rejected")
    if not assoc.is_established:
        if not answers:  # no A-ASSOCIATE answer at all: refused connection, timeout, or the peer went away
            raise DeliveryError(f"destination {dest.name} ({dest.address}): no association to confirm "
                                "(peer not reachable or no answer)")
        # the peer answered but accepted none of the proposed contexts (pynetdicom aborts then)
        raise Unsupported("association not established (no acceptable presentation context)")
    if not any(str(cx.abstract_syntax) == context for cx in assoc.accepted_contexts):
        assoc.release()
        raise Unsupported("presentation context refused")
    too_small = max_pdu_problem(assoc.acceptor.maximum_length)  # nothing could be sent within it
    if too_small is not None:
        assoc.abort()
        raise DeliveryError(f"destination {dest.name} ({dest.address}): association to confirm aborted: {too_small}",
                            retryable=False)
    assoc_no_delay(assoc)
    return assoc


def _unanswered(dest: DicomDestination, what: str, started: float) -> None:
    """A request that got no answer at all: DeliveryError (retryable) when that took the destination's
    ``timeout_s`` -- a busy or vanished peer, our own DIMSE timeout ended it -- rather than a peer that aborts at
    once what it will not serve (the caller's refusal)."""
    if time.monotonic() - started >= 0.9 * dest.timeout_s:
        raise DeliveryError(f"destination {dest.name}: {what} not answered within {dest.timeout_s:g} s")


def request_commitment(dest: DicomDestination, transaction_uid: str, refs: Sequence[Ref]) -> None:
    """Send the Storage Commitment N-ACTION for ``refs`` under ``transaction_uid`` (the report comes later, on
    another association). Unsupported when the peer refuses the SOP class or the request (a failure status, or
    no answer: Orthanc aborts a request from a caller it does not know as a modality); DeliveryError when the
    peer cannot be reached or the request cannot be sent."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for _, _, sop_class, sop in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop
        items.append(item)
    ds.ReferencedSOPSequence = items
    assoc = _associate(dest, StorageCommitmentPushModel)
    started = time.monotonic()
    try:
        status, _ = assoc.send_n_action(ds, REQUEST_COMMITMENT, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
    except Exception as exc:  # noqa: BLE001 - pynetdicom raises on encoding/context problems
        raise DeliveryError(f"destination {dest.name}: storage commitment N-ACTION failed: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.get("Status", -1)) if status is not None and len(status) else -1
    if code == -1:
        _unanswered(dest, "storage commitment N-ACTION", started)
        # Orthanc aborts the N-ACTION of a caller not in its DicomModalities
        raise Unsupported("N-ACTION not answered: is the node in the peer's modality list?")
    if code != Status.SUCCESS:
        raise Unsupported(f"N-ACTION answered 0x{code:04X}")


def find_dimse(dest: DicomDestination, refs: Sequence[Ref]) -> set[str]:
    """The SOP Instance UIDs of ``refs``' series that the peer lists by C-FIND (Study Root, IMAGE level).
    Unsupported when the peer refuses C-FIND (the context, or aborting the query unanswered); DeliveryError when a
    query fails otherwise."""
    assoc = _associate(dest, StudyRootQueryRetrieveInformationModelFind)
    found: set[str] = set()
    try:
        for (study, series), _ in _by_series(refs).items():
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = series
            q.SOPInstanceUID = ""
            last = -1
            started = time.monotonic()
            for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                last = int(status.get("Status", -1)) if status is not None and len(status) else -1
                if last in PENDING_STATUSES and ident is not None:
                    found.add(str(ident.get("SOPInstanceUID", "")))
            if last == -1:
                _unanswered(dest, "C-FIND to count the series", started)
                assoc.join(2.0)  # an empty response: the association thread ends when the peer aborted
            if last == -1 and assoc.is_aborted:
                # Orthanc aborts the C-FIND of a caller it does not allow to query (DicomAlwaysAllowFind false and
                # the node not in its DicomModalities): a refusal, not a failed delivery
                raise Unsupported("C-FIND not answered (the peer aborted): may the node query it?")
            if last != Status.SUCCESS:
                raise DeliveryError(f"destination {dest.name}: C-FIND to count the series ended with "
                                    f"{'no response' if last == -1 else f'0x{last:04X}'}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found


# ------------------------------------------------------------------------------------------------ HTTP peers


def find_orthanc(dest: OrthancDestination, refs: Sequence[Ref]) -> set[str]:
    """The SOP Instance UIDs of ``refs``' series that Orthanc holds (``POST /tools/find``, Instance level);
    DeliveryError when Orthanc cannot be asked."""
    from orthanc_api_client import OrthancApiClient, exceptions

    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    client = OrthancApiClient(dest.url.rstrip("/") + "/", user=dest.username or None, pwd=dest.password or None,
                              headers=headers)
    found: set[str] = set()
    for (study, series), _ in _by_series(refs).items():
        try:
            resp = client.post("tools/find", timeout=dest.timeout_s, json={
                "Level": "Instance", "Expand": True,
                "Query": {"StudyInstanceUID": study, "SeriesInstanceUID": series}})
        except exceptions.OrthancApiException as exc:
            status = getattr(exc, "http_status_code", None)
            raise DeliveryError(f"orthanc destination {dest.name!r}: count of the series failed: "
                                f"{f'HTTP {status}' if status else type(exc).__name__}") from exc
        for inst in resp.json() or []:
            found.add(str((inst.get("MainDicomTags") or {}).get("SOPInstanceUID", "")))
    return found


def find_dicomweb(dest: DicomwebDestination, refs: Sequence[Ref]) -> set[str]:
    """The SOP Instance UIDs of ``refs``' series that the DICOMweb service lists by QIDO-RS; DeliveryError when
    the search fails."""
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    session = (create_session_from_user_pass(dest.username, dest.password) if dest.username and not dest.token
               else create_session())
    if dest.tls_ca:
        session.verify = dest.tls_ca
    if dest.tls_cert:
        session.cert = (dest.tls_cert, dest.tls_key) if dest.tls_key else dest.tls_cert
    headers = {"Authorization": f"Bearer {dest.token}"} if dest.token else None
    client = DICOMwebClient(dest.url.rstrip("/"), session=session, headers=headers, timeout=dest.timeout_s)
    found: set[str] = set()
    for (study, series), _ in _by_series(refs).items():
        try:
            hits = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                               fields=["SOPInstanceUID"])
        except requests.RequestException as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 404:  # some servers answer 404 for a series they do not have
                continue
            raise DeliveryError(f"dicomweb destination {dest.name!r}: QIDO-RS count of the series failed: "
                                f"{f'HTTP {status}' if status else type(exc).__name__}") from exc
        for h in hits or []:
            found.update(str(v) for v in (h.get("00080018") or {}).get("Value", []))
    return found


# ------------------------------------------------------------------------------------------------ the flow


@dataclass(frozen=True)
class Report:
    """A Storage Commitment report (N-EVENT-REPORT event information, PS3.4 J.3.3): the transaction, the SOP
    instances committed, the ones that failed with their Failure Reason."""

    transaction_uid: str
    committed: frozenset[str]
    failed: dict[str, int]


def parse_report(info: Dataset) -> Report:
    """The report in an N-EVENT-REPORT's event information dataset."""
    committed = frozenset(str(i.get("ReferencedSOPInstanceUID", "")) for i in info.get("ReferencedSOPSequence", []))
    failed = {str(i.get("ReferencedSOPInstanceUID", "")): int(i.get("FailureReason", 0x0110))
              for i in info.get("FailedSOPSequence", [])}
    return Report(str(info.get("TransactionUID", "")), committed, failed)


def _not_from(dest: Destination, calling_ae: str, address: str) -> str:
    """Why a Storage Commitment report from ``calling_ae``@``address`` is not from ``dest`` ("" when it is)."""
    if not isinstance(dest, DicomDestination):
        return f"destination {dest.name} is not a DICOM peer"
    if calling_ae != dest.ae_title.strip():
        return f"calling AE title is not the destination's ({dest.ae_title})"
    try:
        want = {ipaddress.ip_address(str(a[4][0]).split("%")[0]) for a in socket.getaddrinfo(dest.host, None)}
        got = ipaddress.ip_address(address.split("%")[0])
    except (OSError, ValueError) as exc:
        return f"cannot compare the address with the destination's host {dest.host}: {exc}"
    mapped = got.ipv4_mapped if isinstance(got, ipaddress.IPv6Address) else None
    if got not in want and mapped not in want:
        return f"address is not the destination's host ({dest.host})"
    return ""


def shortfall(dest: str, method: str, expected: int, confirmed: int, extra: str = "") -> Mismatch:
    """The failed attempt of a confirmation that found ``confirmed`` of ``expected`` instances."""
    return Mismatch(f"{method}: expected {expected}, PACS has {confirmed} ({dest}{extra})", confirmed)


class Confirmations:
    """The confirmation step of the outbox: runs the destination's method after a delivery's files were sent,
    handles Storage Commitment reports (``on_report``, the SCP's N-EVENT-REPORT handler), overdue reports
    (``overdue``) and deliveries left awaiting confirmation by a stopped node (``resume``)."""

    def __init__(self, cfg: Config, index: Index, metrics: Metrics, settle: Settle) -> None:
        self.cfg, self.index, self.metrics, self.settle = cfg, index, metrics, settle
        self._lock = threading.Lock()  # one outcome per delivery: a report and the deadline may race

    def method(self, dest: Destination) -> ConfirmMethod:
        """The configured method (folders: always none)."""
        return ConfirmMethod.NONE if isinstance(dest, FolderDestination) else dest.confirm

    def after_send(self, d: Delivery, paths: Sequence[Path]) -> bool:
        """Confirm delivery ``d`` whose ``paths`` the destination just accepted. Returns True when the delivery
        is settled now (delivered or unconfirmed; the index says which), False when a Storage Commitment report is
        awaited. Raises DeliveryError (a Mismatch for too few instances) for a failed attempt."""
        dest = self.cfg.destination(d.destination)
        method = self.method(dest)
        refs = sop_refs(paths)
        if method is ConfirmMethod.NONE:
            note = ("written to the folder and fsync'd, not confirmed by a peer" if isinstance(dest, FolderDestination)
                    else "not confirmed (confirm = none)")
            self._done(d, METHOD_NONE, len(refs), None, note)
            return True
        deadline = time.time() + self.cfg.outbox.confirm_timeout_s
        refused = ""
        if isinstance(dest, DicomDestination) and method in (ConfirmMethod.AUTO, ConfirmMethod.COMMITMENT):
            try:
                self._request(d, dest, refs, deadline)
                return False
            except Unsupported as exc:
                if method is ConfirmMethod.COMMITMENT:
                    self._undo(d)
                    raise DeliveryError(f"destination {dest.name}: refuses Storage Commitment ({exc}) and "
                                        "confirm = 'commitment'", retryable=False) from exc
                refused = f"storage commitment refused ({exc}); "
        self.index.delivery_sent(d.id, METHOD_COUNT, refs, refused + "count check", deadline=deadline)
        try:
            found = self._find(dest, refs)
        except Unsupported as exc:
            note = f"{NEITHER} ({refused}C-FIND: {exc})" if method is ConfirmMethod.AUTO else f"peer refuses C-FIND ({exc})"
            if method is ConfirmMethod.COUNT:
                raise DeliveryError(f"destination {dest.name}: {note} and confirm = 'count'", retryable=False) from exc
            self._done(d, METHOD_COUNT, len(refs), None, note, DeliveryState.UNCONFIRMED)
            return True
        self._counted(d, dest.name, refs, found, refused)
        return True

    # ------------------------------------------------------------------------------------ steps

    def _find(self, dest: Destination, refs: Sequence[Ref]) -> set[str]:
        if isinstance(dest, DicomDestination):
            return find_dimse(dest, refs)
        if isinstance(dest, OrthancDestination):
            return find_orthanc(dest, refs)
        if isinstance(dest, DicomwebDestination):
            return find_dicomweb(dest, refs)
        raise Unsupported(f"no query for kind {dest.kind.value!r}")  # pragma: no cover - folders are 'none'

    def _request(self, d: Delivery, dest: DicomDestination, refs: Sequence[Ref], deadline: float) -> None:
        uid = generate_uid(prefix=None)  # 2.25.<UUID>: a new transaction each time
        self.index.delivery_sent(d.id, METHOD_COMMITMENT, refs, "storage commitment requested, report awaited",
                                 transaction_uid=uid, deadline=deadline)
        try:
            request_commitment(dest, uid, refs)
        except (Unsupported, DeliveryError):
            self._undo(d)
            raise
        log.info("job %d -> %s: storage commitment of %d instance(s) requested (transaction %s)", d.job_id,
                 d.destination, len(refs), uid)

    def _undo(self, d: Delivery) -> None:
        """Forget a commitment request that did not go out (the delivery stays 'sent' until settled)."""
        self.index.delivery_sent(d.id, "", [], "", deadline=time.time() + self.cfg.outbox.confirm_timeout_s)

    def _counted(self, d: Delivery, dest_name: str, refs: Sequence[Ref], found: set[str], refused: str) -> None:
        expected = {r[3] for r in refs}
        have = len(expected & found)
        if have < len(expected):
            self.metrics.confirmations.labels(destination=d.destination, method=METHOD_COUNT,
                                              outcome="mismatch").inc()
            raise shortfall(dest_name, "count check", len(expected), have)
        self._done(d, METHOD_COUNT, len(expected), have, refused + f"{have} of {len(expected)} instance(s) "
                   "listed by the destination")

    def _done(self, d: Delivery, method: str, expected: int, confirmed: int | None, note: str,
              state: DeliveryState = DeliveryState.DELIVERED) -> None:
        self.index.delivery_confirmed(d.id, method, expected, confirmed, note, state)
        outcome = "confirmed" if state is DeliveryState.DELIVERED and method != METHOD_NONE else (
            "unconfirmed" if state is DeliveryState.UNCONFIRMED else "not-confirmed")
        self.metrics.confirmations.labels(destination=d.destination, method=method, outcome=outcome).inc()

    # ------------------------------------------------------------------------------------ reports, deadlines

    def on_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """The SCP's EVT_N_EVENT_REPORT handler: a Storage Commitment report for a transaction this node opened
        settles its delivery (all committed: delivered; else a failed attempt naming the numbers). Answers
        0x0000, or 0x0110 when the report cannot be read or recorded."""
        try:
            report = parse_report(event.event_information)
        except Exception as exc:  # noqa: BLE001 - a malformed report: say so, do not crash the SCP
            log.warning("storage commitment report from %s unreadable: %s", event.assoc.requestor.ae_title, exc)
            return Status.PROCESSING_FAILURE, None
        requestor = event.assoc.requestor
        caller = (str(requestor.ae_title).strip(), str(requestor.address))
        try:
            if not self.report(report, caller):
                return Status.PROCESSING_FAILURE, None
        except Exception as exc:  # noqa: BLE001 - the index may be busy; the deadline settles it later
            log.exception("storage commitment report %s not recorded: %s", report.transaction_uid, exc)
            return Status.PROCESSING_FAILURE, None
        return Status.SUCCESS, None

    def report(self, report: Report, caller: tuple[str, str] | None = None) -> bool:
        """Settle the delivery awaiting ``report`` (none: logged and ignored, e.g. a transaction already given up).
        ``caller``: (calling AE title, IP address) of the association that brought the report; a report is only
        taken from the delivery's destination (its AE title, from an address its host resolves to), never from
        any AE that learnt the transaction UID. Returns False when the report was ignored."""
        with self._lock:
            d = self.index.delivery_by_transaction(report.transaction_uid)
            if d is None:
                log.warning("storage commitment report for transaction %s: no delivery awaits it (ignored)",
                            report.transaction_uid)
                return False
            if caller is not None:
                why = _not_from(self.cfg.destination(d.destination), *caller)
                if why:
                    log.warning("storage commitment report for transaction %s from %s@%s ignored: %s",
                                report.transaction_uid, caller[0], caller[1], why)
                    return False
            expected = {r[3] for r in d.sop_refs}
            have = len(expected & report.committed)
            if have == len(expected):
                self._done(d, METHOD_COMMITMENT, len(expected), have,
                           f"storage commitment: all {have} instance(s) committed")
                self.settle.settled(d)
                return True
            self.metrics.confirmations.labels(destination=d.destination, method=METHOD_COMMITMENT,
                                              outcome="mismatch").inc()
            reasons = sorted({f"0x{r:04X}" for r in report.failed.values()})
            extra = f"; {len(report.failed)} failed, reason {', '.join(reasons)}" if report.failed else ""
            self.settle.failed(d, shortfall(d.destination, "storage commitment", len(expected), have, extra))
            return True

    def overdue(self, now: float) -> None:
        """Deliveries whose Storage Commitment report did not come by their deadline: a failed attempt each (a
        count confirmation left 'sent' by an interrupted check is checked again instead)."""
        for d in self.index.overdue_confirmations(now):
            if d.confirm_method == METHOD_COMMITMENT:
                with self._lock:
                    fresh = self.index.delivery(d.id)
                    if fresh is None or fresh.state is not DeliveryState.SENT or fresh.transaction_uid != d.transaction_uid:
                        continue
                    self.metrics.confirmations.labels(destination=d.destination, method=METHOD_COMMITMENT,
                                                      outcome="overdue").inc()
                    self.settle.failed(d, DeliveryError(
                        f"storage commitment: no report within {self.cfg.outbox.confirm_timeout_s:g} s (expected "
                        f"{len(d.sop_refs)}; is the node in the peer's modality list, reachable at its port?)"))
            else:
                self.recheck(d)

    def resume(self) -> None:
        """At start-up: ask again for every delivery left awaiting confirmation by a stopped node (a new Storage
        Commitment transaction, or the count check again)."""
        for d in self.index.deliveries(states=(DeliveryState.SENT,)):
            self.recheck(d)

    def recheck(self, d: Delivery) -> None:
        """Run ``d``'s confirmation again without sending its files (they were accepted)."""
        try:
            settled = self.after_send(d, [Path(f) for f in d.files])
        except DeliveryError as exc:
            self.settle.failed(d, exc)
            return
        if settled:
            self.settle.settled(d)
