"""What a DICOM source holds of one series, by an IMAGE-level C-FIND: its instances that may be slices, told from
the non-image objects the node does not take (hostile18).

A C-MOVE or C-GET of a series can end without success only because of such objects: a Philips MR series holds its
Private MR Series Data / ExamCard objects (SOP class 1.3.46.670589.11.0.0.12.2, no pixel data), a Siemens one its
CSA Non-Image objects; the node offers no storage context for them, so the PACS fails those sub-operations while
every slice came. ``node.ingest.pull`` asks :func:`list_series` then, and counts only the image instances as the
series' size; the objects are named as refused (:meth:`SeriesListing.refused`), never as missing slices.

An object is told from a slice only on what the PACS answers: a SOP class not in ``STORAGE_SOP_CLASSES`` and no
Rows, while the PACS answers Rows for the series' other instances. Whatever cannot be had (no association, a status
other than success, an answer without a valid SOPInstanceUID or SOPClassUID, more than ``MAX_LISTED`` answers)
gives None: nothing is taken for no slice on a guess.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from node.config import DicomSource
from node.dimse import PENDING_STATUSES, Status
from node.ingest.admit import STORAGE_SOP_CLASSES
from node.store import valid_uid

# the warning belongs to the pull that asked: it keeps the pull's logger name, as before this module was split off
log = logging.getLogger("node.ingest.pull")

MAX_LISTED = 100_000  # instances an IMAGE-level C-FIND of one series may answer before it is not believed
MAX_NAMED = 10  # non-image objects named one by one in :meth:`SeriesListing.refused`, then a count


@dataclass(frozen=True)
class SeriesListing:
    """The instances of one series at a source: ``images``, the SOPInstanceUIDs that may be slices; ``non_images``,
    {SOPInstanceUID: SOPClassUID} of the objects that are none (empty when the PACS answers no Rows at all: then no
    object is told from a slice)."""

    images: frozenset[str]
    non_images: Mapping[str, str] = field(default_factory=dict)

    def refused(self, study: str, series: str) -> list[str]:
        """One entry per non-image object a retrieve could not bring (at most ``MAX_NAMED``, then a count), for
        ``FetchResult.refused``."""
        said = [f"instance {sop} of series {series} (study {study}) not retrieved: SOP class {cls} is not a storage "
                "SOP class the node takes, and it has no Rows (no image), so no slice of the series; its other "
                "instances admitted" for sop, cls in sorted(self.non_images.items())[:MAX_NAMED]]
        if len(self.non_images) > MAX_NAMED:
            said.append(f"and {len(self.non_images) - MAX_NAMED} more such non-image object(s) of series {series}")
        return said


def list_series(ae_title: str, src: DicomSource, study: str, series: str) -> SeriesListing | None:
    """The instances of ``series`` (of ``study``) at ``src`` by an IMAGE-level C-FIND (SOPInstanceUID, SOPClassUID,
    Rows) from the calling AE ``ae_title``, 30 s timeouts. None when it cannot be had: the association refused or
    failed (a warning names the source, the series and the error's type), a status other than pending or success,
    an answer without a valid SOPInstanceUID or SOPClassUID, more than ``MAX_LISTED`` answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series
    q.SOPInstanceUID = q.SOPClassUID = ""
    q.Rows = None
    found: list[tuple[str, str, bool]] = []
    try:
        assoc = ae.associate(src.host, src.port, ae_title=src.ae_title)
        if not assoc.is_established:
            return None
        try:
            for st, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                code = int(getattr(st, "Status", -1)) if st is not None else -1
                if code in PENDING_STATUSES and ident is not None:
                    sop, cls = (str(ident.get(k, "") or "").strip() for k in ("SOPInstanceUID", "SOPClassUID"))
                    if not (valid_uid(sop) and valid_uid(cls)) or len(found) >= MAX_LISTED:
                        return None
                    found.append((sop, cls, ident.get("Rows") not in (None, "")))
                elif code != Status.SUCCESS:
                    return None
        finally:
            assoc.release()
    except (OSError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        log.warning("source %s: C-FIND of the instances of series %s failed: %s", src.name, series,
                    type(exc).__name__)
        return None
    if not any(rows for _s, _c, rows in found):  # the PACS does not answer Rows: no object told from a slice
        return SeriesListing(frozenset(sop for sop, _c, _r in found))
    others = {sop: cls for sop, cls, rows in found if cls not in STORAGE_SOP_CLASSES and not rows}
    return SeriesListing(frozenset(sop for sop, _c, _r in found if sop not in others), others)
