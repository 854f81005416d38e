"""Delivery confirmed, not assumed: after a destination accepted a delivery's files, the destination is asked
whether it holds them, and only its answer makes the delivery ``delivered``.

This module is the state machine (which method, fallbacks, the index's records, reports, deadlines, restarts);
the asking itself is the destination kind's ``PeerQuery`` (``node.send.base.make_query``: ``query_dimse``,
``query_orthanc``, ``query_dicomweb``). Methods, by the destination's ``confirm`` (``node.config.ConfirmMethod``)
and kind:

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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt

from node.config import Config, ConfirmMethod, Destination, DicomDestination, FolderDestination
from node.dimse import Status
from node.errors import DeliveryError, NodeError
from node.metrics import Metrics
from node.send.base import QUERY_MODULES, PeerQuery, Ref, Unsupported, make_query
from node.store import Delivery, DeliveryState, Index

log = logging.getLogger(__name__)

METHOD_COMMITMENT, METHOD_COUNT, METHOD_NONE = "commitment", "count", "none"
NEITHER = "peer supports neither storage commitment nor C-FIND"


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


@dataclass(frozen=True)
class Report:
    """A Storage Commitment report (N-EVENT-REPORT event information, PS3.4 J.3.3): the transaction, the SOP
    instances committed, the ones that failed with their Failure Reason."""

    transaction_uid: str
    committed: frozenset[str]
    failed: dict[str, int]


def parse_report(info: Dataset) -> Report:
    """The report in an N-EVENT-REPORT's event information dataset. An instance the report lists as failed is
    not committed, even when it is also listed among the committed ones (a contradictory report: the failure
    is believed)."""
    failed = {str(i.get("ReferencedSOPInstanceUID", "")): int(i.get("FailureReason", 0x0110))
              for i in info.get("FailedSOPSequence", [])}
    committed = frozenset(str(i.get("ReferencedSOPInstanceUID", "")) for i in info.get("ReferencedSOPSequence", []))
    return Report(str(info.get("TransactionUID", "")), committed - failed.keys(), failed)


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

    def __init__(self, cfg: Config, index: Index, metrics: Metrics, settle: Settle, takes_reports: bool = True) -> None:
        """``takes_reports`` False: no Storage Commitment report can reach this process (a ``data_access =
        "dicomweb"`` Celery worker: the peer sends it to the AE title's host, the node, whose index knows no such
        transaction). Storage Commitment is then not requested: ``auto`` counts by C-FIND, ``commitment`` is a
        failed delivery saying why. Before break19 the worker requested it, its delivery stayed 'sent' for good,
        the node ignored the report ("no delivery awaits it") and its job stayed 'sending' with nothing said."""
        self.cfg, self.index, self.metrics, self.settle = cfg, index, metrics, settle
        self.takes_reports = takes_reports
        self._lock = threading.Lock()  # one outcome per delivery: a report and the deadline may race
        # Transaction UIDs this process requested: ``resume`` asks again only for those a stopped node left
        # awaiting. Before ops19 a pending delivery sent at start-up before the resume pass ran was asked twice
        # (two N-ACTIONs 70 ms apart; the first report then found "no delivery awaits it").
        self._asked: set[str] = set()

    def method(self, dest: Destination) -> ConfirmMethod:
        """The configured method; none for a kind that cannot be asked (no ``QUERY_MODULES`` line: folders)."""
        if isinstance(dest, FolderDestination) or dest.kind not in QUERY_MODULES:
            return ConfirmMethod.NONE
        return dest.confirm

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
        peer = make_query(dest)
        if peer.offers_commitment and method is ConfirmMethod.COMMITMENT and not self.takes_reports:
            raise DeliveryError(f"destination {dest.name}: confirm = 'commitment', but this is a Celery worker "
                                "without the shared spool (data_access = 'dicomweb'): the peer sends its Storage "
                                "Commitment report to the receiving node, never here; use confirm = 'auto' or 'count'",
                                retryable=False)
        if peer.offers_commitment and self.takes_reports and method in (ConfirmMethod.AUTO, ConfirmMethod.COMMITMENT):
            try:
                self._request(d, peer, refs, deadline)
                return False
            except Unsupported as exc:
                if method is ConfirmMethod.COMMITMENT:
                    self._undo(d)
                    raise DeliveryError(f"destination {dest.name}: refuses Storage Commitment ({exc}) and "
                                        "confirm = 'commitment'", retryable=False) from exc
                refused = f"storage commitment refused ({exc}); "
        self.index.delivery_sent(d.id, METHOD_COUNT, refs, refused + "count check", deadline=deadline)
        try:
            found = peer.held(refs)
        except Unsupported as exc:
            note = f"{NEITHER} ({refused}C-FIND: {exc})" if method is ConfirmMethod.AUTO else f"peer refuses C-FIND ({exc})"
            if method is ConfirmMethod.COUNT:
                raise DeliveryError(f"destination {dest.name}: {note} and confirm = 'count'", retryable=False) from exc
            self._done(d, METHOD_COUNT, len(refs), None, note, DeliveryState.UNCONFIRMED)
            return True
        self._counted(d, dest.name, refs, found, refused)
        return True

    # ------------------------------------------------------------------------------------ steps

    def _request(self, d: Delivery, peer: PeerQuery, refs: Sequence[Ref], deadline: float) -> None:
        uid = generate_uid(prefix=None)  # 2.25.<UUID>: a new transaction each time
        self.index.delivery_sent(d.id, METHOD_COMMITMENT, refs, "storage commitment requested, report awaited",
                                 transaction_uid=uid, deadline=deadline)
        self._asked.add(uid)
        try:
            peer.request_commitment(uid, refs)
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
        0x0000, or 0x0110 when the report cannot be read or recorded, or comes from an AE title and address that
        are no DICOM destination's: then it is not even decoded (pynetdicom decodes the event information on first
        access; 11 MB of 160,000 references took 12.8 s of CPU and ~350 MB, from anyone who knew the node's AE
        title)."""
        requestor = event.assoc.requestor
        caller = (str(requestor.ae_title).strip(), str(requestor.address))
        if not self._may_report(*caller):
            log.warning("storage commitment report from %s@%s ignored unread: that AE title and address are no DICOM "
                        "destination's", caller[0], caller[1])
            return Status.PROCESSING_FAILURE, None
        try:
            report = parse_report(event.event_information)
        except Exception as exc:  # noqa: BLE001 - a malformed report: say so, do not crash the SCP
            log.warning("storage commitment report from %s unreadable: %s", event.assoc.requestor.ae_title, exc)
            return Status.PROCESSING_FAILURE, None
        try:
            if not self.report(report, caller):
                return Status.PROCESSING_FAILURE, None
        except Exception as exc:  # noqa: BLE001 - the index may be busy; the deadline settles it later
            log.exception("storage commitment report %s not recorded: %s", report.transaction_uid, exc)
            return Status.PROCESSING_FAILURE, None
        return Status.SUCCESS, None

    def _may_report(self, calling_ae: str, address: str) -> bool:
        """Whether ``calling_ae``@``address`` is one of the node's DICOM destinations (``_not_from``), the only
        peers whose Storage Commitment reports :meth:`report` takes."""
        return any(isinstance(d, DicomDestination) and not _not_from(d, calling_ae, address)
                   for d in self.cfg.destinations)

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

    def resume(self) -> int:
        """At start-up: ask again for every delivery left awaiting confirmation by a stopped node (a new Storage
        Commitment transaction, or the count check again); a delivery this process already asked (its transaction
        is one of ours: the outbox sent it since the start) is not asked twice. Returns how many were asked."""
        n = 0
        for d in self.index.deliveries(states=(DeliveryState.SENT,)):
            if d.transaction_uid and d.transaction_uid in self._asked:
                continue
            n += 1
            self.recheck(d)
        return n

    def recheck(self, d: Delivery) -> None:
        """Run ``d``'s confirmation again without sending its files (they were accepted). Whatever it raises is a
        counted attempt of ``d`` alone (as a send's in ``Outbox.attempt``): a destination no longer configured
        (a ConfigError) dead-letters it at once; before, the exception left ``resume`` / ``overdue`` and, every
        0.5 s, the outbox's whole pass, so no delivery to any destination went out again."""
        try:
            settled = self.after_send(d, [Path(f) for f in d.files])
        except NodeError as exc:  # DeliveryError; ConfigError: the destination was removed from the config
            self.settle.failed(d, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a client library raised something else: still this delivery's
            log.exception("job %d -> %s: unexpected error while confirming: %s", d.job_id, d.destination, exc)
            self.settle.failed(d, DeliveryError(f"unexpected {type(exc).__name__} while confirming: {exc}"[:500]))
            return
        if settled:
            self.settle.settled(d)
