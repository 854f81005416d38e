"""Asking an Orthanc server (kind "orthanc") what it holds: its REST ``POST /tools/find`` at Instance level, one
query per series of a delivery (``node.send.confirm`` runs the state machine). Orthanc offers no Storage
Commitment over REST."""

from __future__ import annotations

from collections.abc import Sequence

from orthanc_api_client import exceptions

from node.config import OrthancDestination
from node.errors import DeliveryError
from node.send.base import Ref, Unsupported, by_series
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
        """The SOP Instance UIDs of ``refs``' series that Orthanc holds (``POST /tools/find``, Instance level);
        DeliveryError when Orthanc cannot be asked."""
        client = client_for(self.dest)
        found: set[str] = set()
        for (study, series), _ in by_series(refs).items():
            try:
                resp = client.post("tools/find", timeout=self.dest.timeout_s, json={
                    "Level": "Instance", "Expand": True,
                    "Query": {"StudyInstanceUID": study, "SeriesInstanceUID": series}})
            except exceptions.OrthancApiException as exc:
                status = getattr(exc, "http_status_code", None)
                raise DeliveryError(f"orthanc destination {self.dest.name!r}: count of the series failed: "
                                    f"{f'HTTP {status}' if status else type(exc).__name__}") from exc
            for inst in resp.json() or []:
                found.add(str((inst.get("MainDicomTags") or {}).get("SOPInstanceUID", "")))
        return found


def query(dest: OrthancDestination) -> OrthancQuery:
    """The PeerQuery of kind ``OrthancDestination.kind`` for ``dest`` (``node.send.base.make_query``)."""
    return OrthancQuery(dest)
