"""Asking an Orthanc server (kind "orthanc") what it holds: its REST ``POST /tools/find`` at Instance level, one
query per series of a delivery (``node.send.confirm`` runs the state machine), then one per instance that answer
left out when it listed some (``LimitFindInstances`` caps it). Orthanc offers no Storage Commitment over REST."""

from __future__ import annotations

from collections.abc import Sequence

from orthanc_api_client import exceptions

from node.config import OrthancDestination
from node.errors import DeliveryError, http_status_text
from node.send.base import Ref, Unsupported, count_series
from node.send.orthanc import client_for


class OrthancQuery:
    """Counts for one ``OrthancDestination`` (its url, credentials, ``timeout_s``)."""

    offers_commitment = False

    def __init__(self, dest: OrthancDestination) -> None:
        self.dest = dest

    def request_commitment(self, transaction_uid: str, refs: Sequence[Ref]) -> None:
        """Unsupported: Storage Commitment is a DICOM service."""
        raise Unsupported("no storage commitment over Orthanc's REST API")

    def held(self, refs: Sequence[Ref]) -> set[str]:
        """The SOP Instance UIDs of ``refs`` that Orthanc holds (``POST /tools/find``, Instance level, per series,
        then per instance it left out when it listed any: ``node.send.base.count_series``); DeliveryError when
        Orthanc cannot be asked."""
        client = client_for(self.dest)

        def find(study: str, series: str, sop: str) -> set[str]:
            query = {"StudyInstanceUID": study, "SeriesInstanceUID": series, **({"SOPInstanceUID": sop} if sop else {})}
            try:
                resp = client.post("tools/find", timeout=self.dest.timeout_s, json={
                    "Level": "Instance", "Expand": True, "Query": query})
            except exceptions.OrthancApiException as exc:
                status = getattr(exc, "http_status_code", None)
                raise DeliveryError(f"orthanc destination {self.dest.name!r}: count of the series failed: "
                                    f"{http_status_text(status) if status else type(exc).__name__}") from exc
            return {str((inst.get("MainDicomTags") or {}).get("SOPInstanceUID", "")) for inst in resp.json() or []}

        return count_series(refs, find)


def query(dest: OrthancDestination) -> OrthancQuery:
    """The PeerQuery of kind ``OrthancDestination.kind`` for ``dest`` (``node.send.base.make_query``)."""
    return OrthancQuery(dest)
