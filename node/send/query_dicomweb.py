"""Asking a DICOMweb service (kind "dicomweb") what it holds: QIDO-RS
``GET {root}/studies/{study}/series/{series}/instances``, one search per series of a delivery (``node.send.confirm``
runs the state machine). DICOMweb has no Storage Commitment."""

from __future__ import annotations

from collections.abc import Sequence

import requests

from node.config import DicomwebDestination
from node.errors import DeliveryError
from node.send.base import Ref, Unsupported, by_series
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
        """The SOP Instance UIDs of ``refs``' series that the DICOMweb service lists by QIDO-RS; DeliveryError when
        the search fails."""
        client = client_for(self.dest)
        found: set[str] = set()
        for (study, series), _ in by_series(refs).items():
            try:
                hits = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                   fields=["SOPInstanceUID"])
            except requests.RequestException as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status == 404:  # some servers answer 404 for a series they do not have
                    continue
                raise DeliveryError(f"dicomweb destination {self.dest.name!r}: QIDO-RS count of the series failed: "
                                    f"{f'HTTP {status}' if status else type(exc).__name__}") from exc
            for h in hits or []:
                found.update(str(v) for v in (h.get("00080018") or {}).get("Value", []))
        return found


def query(dest: DicomwebDestination) -> DicomwebQuery:
    """The PeerQuery of kind ``DicomwebDestination.kind`` for ``dest`` (``node.send.base.make_query``)."""
    return DicomwebQuery(dest)
