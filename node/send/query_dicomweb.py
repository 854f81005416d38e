"""Asking a DICOMweb service (kind "dicomweb") what it holds: QIDO-RS
``GET {root}/studies/{study}/series/{series}/instances``, one search per series of a delivery (``node.send.confirm``
runs the state machine), then -- when that answer listed some of the series but not every instance sent (a server
answering a page: Orthanc's ``LimitFindInstances``) -- one search per instance left out (``SOPInstanceUID=``).
DICOMweb has no Storage Commitment."""

from __future__ import annotations

from collections.abc import Sequence

import requests

from node.config import DicomwebDestination
from node.errors import DeliveryError, http_status_text
from node.send.base import Ref, Unsupported, count_series
from node.send.dicomweb import client_for


class DicomwebQuery:
    """Searches for one ``DicomwebDestination`` (its service root, credentials, TLS, ``timeout_s``)."""

    offers_commitment = False

    def __init__(self, dest: DicomwebDestination) -> None:
        self.dest = dest

    def request_commitment(self, transaction_uid: str, refs: Sequence[Ref]) -> None:
        """Unsupported: Storage Commitment is a DICOM service."""
        raise Unsupported("no storage commitment over DICOMweb")

    def held(self, refs: Sequence[Ref]) -> set[str]:
        """The SOP Instance UIDs of ``refs`` that the DICOMweb service lists by QIDO-RS (a search per series, then
        per instance it left out when it listed any: ``node.send.base.count_series``); DeliveryError when a search
        fails."""
        client = client_for(self.dest)

        def search(study: str, series: str, sop: str) -> set[str]:
            filters = {"SOPInstanceUID": sop} if sop else None
            try:
                hits = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                   fields=["SOPInstanceUID"], search_filters=filters)
            except requests.RequestException as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status == 404:  # some servers answer 404 for a series (an instance) they do not have
                    return set()
                raise DeliveryError(f"dicomweb destination {self.dest.name!r}: QIDO-RS count of the series failed: "
                                    f"{http_status_text(status) if status else type(exc).__name__}") from exc
            found: set[str] = set()
            for h in hits or []:
                found.update(str(v) for v in (h.get("00080018") or {}).get("Value", []))
            return found

        return count_series(refs, search)


def query(dest: DicomwebDestination) -> DicomwebQuery:
    """The PeerQuery of kind ``DicomwebDestination.kind`` for ``dest`` (``node.send.base.make_query``)."""
    return DicomwebQuery(dest)
