"""Asking a DICOM peer (kind "dicom") what it holds: DICOM Storage Commitment, Push Model (PS3.4 Annex J), and a
C-FIND count (Study Root, IMAGE level) for a peer that refuses commitment. The state machine around these is
``node.send.confirm``'s.

The N-ACTION (action type 1) lists the SOP instances sent under a Transaction UID; the peer answers later with an
N-EVENT-REPORT on a new association to the node's own SCP. A peer that refuses the SOP class, the association,
or a request (a failure status, or aborting it unanswered at once: Orthanc does so for a caller not in its
DicomModalities, or not allowed to query) raises Unsupported; one that cannot be reached, or answers nothing
within the destination's ``timeout_s``, raises DeliveryError (retryable).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

from node.config import DicomDestination
from node.dimse import PENDING_STATUSES, Status, assoc_no_delay, max_pdu_problem
from node.errors import DeliveryError
from node.send.base import Ref, Unsupported, count_series
from node.send.dimse import client_ssl_context
from node.send.peer_log import install as quiet_outgoing
from node.send.peer_log import outgoing
from node.send.peer_log import reason as peer_reason

# the well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
MATCHING_TERMINATED = 0xFE00  # C-FIND "Cancel: matching terminated" (PS3.4 C.4.1.1.4): what came is a page
REJECTED_TRANSIENT = 0x02  # A-ASSOCIATE-RJ Result (PS3.8 9.3.4): rejected-transient, worth another try


def _associate(dest: DicomDestination, context: str) -> Any:
    """An association to ``dest`` proposing only ``context`` (Implicit/Explicit VR LE). Unsupported when the peer
    rejects it or accepts no context; DeliveryError (retryable) when it cannot be reached."""
    quiet_outgoing()
    ae = AE(ae_title=dest.calling_ae_title or "SRNODE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s  # the TCP connection and its TLS handshake (node.send.dimse)
    ae.add_requested_context(context)
    kwargs: dict[str, Any] = {"ae_title": dest.ae_title}
    if dest.tls:
        kwargs["tls_args"] = (client_ssl_context(dest), dest.host)
    answers: list[Any] = []  # the peer's A-ASSOCIATE-AC / -RJ, if one came
    kwargs["evt_handlers"] = [(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
    with outgoing() as said:
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
            raise DeliveryError(f"destination {dest.name} ({dest.address}): no association to confirm: "
                                + peer_reason(assoc, "the peer did not answer", said))
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


class DimseQuery:
    """Storage Commitment and C-FIND to one ``DicomDestination`` (its AE titles, address, TLS, ``timeout_s``)."""

    offers_commitment = True

    def __init__(self, dest: DicomDestination) -> None:
        self.dest = dest

    def request_commitment(self, transaction_uid: str, refs: Sequence[Ref]) -> None:
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
        assoc = _associate(self.dest, StorageCommitmentPushModel)
        started = time.monotonic()
        try:
            status, _ = assoc.send_n_action(ds, REQUEST_COMMITMENT, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        except Exception as exc:  # noqa: BLE001 - pynetdicom raises on encoding/context problems
            raise DeliveryError(f"destination {self.dest.name}: storage commitment N-ACTION failed: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(status.get("Status", -1)) if status is not None and len(status) else -1
        if code == -1:
            _unanswered(self.dest, "storage commitment N-ACTION", started)
            # Orthanc aborts the N-ACTION of a caller not in its DicomModalities
            raise Unsupported("N-ACTION not answered: is the node in the peer's modality list?")
        if code != Status.SUCCESS:
            raise Unsupported(f"N-ACTION answered 0x{code:04X}")


    def held(self, refs: Sequence[Ref]) -> set[str]:
        """The SOP Instance UIDs of ``refs`` that the peer lists by C-FIND (Study Root, IMAGE level: per series,
        then per instance that answer left out when it listed any, ``node.send.base.count_series``; an answer
        ended with 0xFE00, matching terminated, is taken as the page it is: Orthanc ends so past its
        ``LimitFindInstances``). Unsupported when the peer refuses C-FIND (the context, or aborting the query
        unanswered); DeliveryError when a query fails otherwise."""
        assoc = _associate(self.dest, StudyRootQueryRetrieveInformationModelFind)

        def find(study: str, series: str, sop: str) -> set[str]:
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = series
            q.SOPInstanceUID = sop
            found: set[str] = set()
            last = -1
            started = time.monotonic()
            for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                last = int(status.get("Status", -1)) if status is not None and len(status) else -1
                if last in PENDING_STATUSES and ident is not None:
                    found.add(str(ident.get("SOPInstanceUID", "")))
            if last == -1:
                _unanswered(self.dest, "C-FIND to count the series", started)
                assoc.join(2.0)  # an empty response: the association thread ends when the peer aborted
            if last == -1 and assoc.is_aborted:
                # Orthanc aborts the C-FIND of a caller it does not allow to query (DicomAlwaysAllowFind false and
                # the node not in its DicomModalities): a refusal, not a failed delivery
                raise Unsupported("C-FIND not answered (the peer aborted): may the node query it?")
            if last not in (Status.SUCCESS, MATCHING_TERMINATED):
                raise DeliveryError(f"destination {self.dest.name}: C-FIND to count the series ended with "
                                    f"{'no response' if last == -1 else f'0x{last:04X}'}")
            return found

        try:
            return count_series(refs, find)
        finally:
            if assoc.is_established:
                assoc.release()


def query(dest: DicomDestination) -> DimseQuery:
    """The PeerQuery of kind ``DicomDestination.kind`` for ``dest`` (``node.send.base.make_query``)."""
    return DimseQuery(dest)
