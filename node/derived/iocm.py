"""IOCM-style rejection note: a Key Object Selection document that retires a superseded derived series.

When late instances make a reprocess, the new derived series (new UIDs) is sent beside the earlier one, and this
note tells the PACS that every instance of the earlier derived and uncertainty series is "Rejected for Quality
Reasons" (DCM 113001, PS3.3 / IHE IOCM). A PACS that implements IOCM hides them; one that does not shows a KO
series whose description says which series were superseded. Its UIDs are deterministic, so a resend is harmless.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from collections.abc import Collection, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node import __version__
from node.config import DeriveConfig
from node.derived.labels import Revision
from node.derived.modules import PATIENT, STUDY, character_set
from node.errors import DeriveError
from node.store import NOT_SENT, DeliveryState, Index, Job

log = logging.getLogger(__name__)

KEY_OBJECT_SELECTION = UID("1.2.840.10008.5.1.4.1.1.88.59")  # Key Object Selection Document (PS3.4 B.5)
# the Patient and General Study modules the derived objects carry (a shorter list here filed the note without the
# rejected objects' IssuerOfPatientID, PatientIdentityRemoved ...)
_PATIENT_STUDY = tuple(dict.fromkeys((*PATIENT, *STUDY)))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def rejection_note(files: Sequence[Path], cfg: DeriveConfig, out_dir: Path, reason: str) -> Path:
    """Write a KOS rejecting every instance in ``files`` (one study) into ``out_dir``; returns its path.

    Key Object Selection Document IOD (PS3.3 A.35.4), TID 2010 titled (113001, DCM, "Rejected for Quality
    Reasons") (PS3.16), ``reason`` as its Key Object Description. DeriveError when a file cannot be read or
    ``files`` is empty; OSError when the note cannot be written.
    """
    headers = []
    for p in files:
        try:
            headers.append(dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
            raise DeriveError(f"rejection note: {Path(p).name} cannot be read: {exc}") from exc
    if not headers:
        raise DeriveError("rejection note: no instances to reject")
    first = headers[0]
    series: dict[str, list[tuple[str, str]]] = {}
    for h in headers:
        series.setdefault(str(h.SeriesInstanceUID), []).append((str(h.SOPClassUID), str(h.SOPInstanceUID)))
    ent = ["rejection", *sorted(series), *sorted(sop for refs in series.values() for _, sop in refs)]
    now = _dt.datetime.now()

    ds = Dataset()
    # Patient / General Study: copied from the rejected instances (the note must file into the same study)
    for kw in _PATIENT_STUDY:
        if kw in first:
            ds[kw] = copy.deepcopy(first[kw])
    # Key Object Document Series
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid(cfg.uid_root, [*ent, "series"])
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 1
    ds.SeriesDescription = "srnode: superseded series rejected"[:64]
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    # General Equipment
    ds.Manufacturer = "srnode"
    ds.SoftwareVersions = __version__
    # Key Object Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    evidence = DicomSequence()
    study = Dataset()
    study.StudyInstanceUID = first.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence()
    for uid, refs in sorted(series.items()):
        s = Dataset()
        s.SeriesInstanceUID = uid
        s.ReferencedSOPSequence = DicomSequence()
        for cls, sop in refs:
            r = Dataset()
            r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = cls, sop
            s.ReferencedSOPSequence.append(r)
        study.ReferencedSeriesSequence.append(s)
    evidence.append(study)
    ds.CurrentRequestedProcedureEvidenceSequence = evidence
    # SR Document Content: TID 2010 titled "Rejected for Quality Reasons", one IMAGE item per instance
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("113001", "DCM", "Rejected for Quality Reasons")])
    ds.ContinuityOfContent = "SEPARATE"
    tpl = Dataset()
    tpl.MappingResource, tpl.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = DicomSequence([tpl])
    items = []
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = DicomSequence([_code("113012", "DCM", "Key Object Description")])
    text.TextValue = reason[:1024]
    items.append(text)
    for h in headers:
        it = Dataset()
        it.RelationshipType, it.ValueType = "CONTAINS", "IMAGE"
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        it.ReferencedSOPSequence = DicomSequence([r])
        items.append(it)
    ds.ContentSequence = DicomSequence(items)
    # SOP Common
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = generate_uid(cfg.uid_root, [*ent, "instance"])
    charset = character_set(first)  # the rejected objects' repertoire: the copied names keep their bytes
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"KO-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    log.info("rejection note %s for %d instance(s) of %d superseded series", ds.SOPInstanceUID, len(headers),
             len(series))
    return path


def _latest_result(index: Index, job: Job) -> Job | None:
    """The latest earlier job of ``job``'s series that produced a derived series, following the chain of
    superseded jobs back past those that produced nothing; None when there is none. SpoolError (index)."""
    old_id, seen = job.supersedes, {job.id}
    while old_id and old_id not in seen:
        seen.add(old_id)
        old = index.job(old_id)
        if old.derived_series_uid:
            return old
        old_id = old.supersedes
    return None


def result_revision(index: Index, job: Job) -> Revision:
    """What decides the revision of ``job``'s results (``node.derived.labels.Revision``: it moves the
    SeriesNumbers): the latest earlier job of the series that made results -- its report's ``revision`` (0 when
    absent) and its derived SeriesInstanceUIDs (report ``derived_series_uids``, else its ``derived_series_uid``);
    no earlier result: revision 0; and the derived series UIDs and revision of every older result of the series
    (``Revision.made``: UIDs made again after a setting was changed back keep their revision). SpoolError (index)."""
    old = _latest_result(index, job)
    if old is None:
        return Revision()
    made: list[tuple[str, int]] = []
    seen: set[int] = {job.id}
    older: Job | None = old
    while older is not None and older.id not in seen:  # the chain of superseded jobs, the latest result first
        seen.add(older.id)
        made += [(u, _revision_of(older)) for u in _derived_uids(older)]
        older = _latest_result(index, older)
    return Revision(_revision_of(old), frozenset(_derived_uids(old)), tuple(reversed(made)))


def _derived_uids(job: Job) -> list[str]:
    """The derived SeriesInstanceUIDs of ``job``'s result (report ``derived_series_uids``, else its one)."""
    return job.derived_series_uids


def _revision_of(job: Job) -> int:
    return int(job.report.get("revision", 0) or 0)


def _results_to_retire(index: Index, job: Job) -> list[Job]:
    """The earlier jobs of ``job``'s series whose results ``job``'s rejection note must retire, newest first.

    The chain of superseded jobs is followed back past jobs that produced nothing (superseded while queued). The
    latest earlier job with results is always retired; an older one too unless a job between them was delivered
    everywhere (its own note then reached every destination and retired it). A job whose results were replaced
    before they were sent (``Outbox.replaced``: late instances while the PACS was down) took its note retiring
    the older results with it: those older results may be in the PACS, retired by nothing."""
    out: list[Job] = []
    old_id, seen = job.supersedes, {job.id}
    while old_id and old_id not in seen:
        seen.add(old_id)
        old = index.job(old_id)
        if old.derived_series_uid:
            out.append(old)
            sent = index.deliveries(old.id)
            if sent and all(d.state in (DeliveryState.DELIVERED, DeliveryState.UNCONFIRMED) for d in sent):
                break  # its note (if it had one) reached every destination: anything older is retired
        old_id = old.supersedes
    return out


def _files_of(spool_outbox: Path, job: Job, old: Job) -> list[Path]:
    """``old``'s result files under ``spool_outbox/job-<id>`` (not its own notes); [] (logged) when gone."""
    old_dir = spool_outbox / f"job-{old.id}"
    mine = sorted(p for p in old_dir.glob("**/*.dcm") if not p.name.startswith("KO-")) if old_dir.is_dir() else []
    if not mine:
        log.warning("job %d supersedes job %d, whose results are no longer in the spool: not in the rejection "
                    "note", job.id, old.id)
    return mine


def _note(olds: list[Job], files: list[Path], job: Job, new_derived_series: str, cfg: DeriveConfig,
          out_dir: Path) -> Path:
    """The rejection note retiring ``files`` (the results of ``olds``), its reason naming them and why."""
    ids = f"job{'s' if len(olds) > 1 else ''} " + ", ".join(str(o.id) for o in reversed(olds))
    why = (f"late instances made the input of {ids} incomplete" if all(o.n_instances < job.n_instances for o in olds)
           else f"{ids} made with other settings (engine, its weights, the [derive] labels, the pipeline version) "
                "or input")  # a replay after a settings change: new UIDs (node.derived.modules.derived_uid)
    reason = f"superseded by srnode job {job.id} (series {new_derived_series}): {why}"
    return rejection_note(files, cfg, out_dir, reason)


def reject_superseded(index: Index, spool_outbox: Path, job: Job, new_derived_series: str, cfg: DeriveConfig,
                      out_dir: Path) -> list[Path]:
    """The rejection note for the results of the earlier jobs of the series (``_results_to_retire``); else [].
    Wherever they went: :func:`rejection_notes` gives each destination the note of what had a delivery there.

    Their files are under ``spool_outbox/job-<id>``. Raises SpoolError (index) and as :func:`rejection_note`.
    """
    olds = [o for o in _results_to_retire(index, job) if o.derived_series_uid != new_derived_series]
    files = [f for old in olds for f in _files_of(spool_outbox, job, old)]
    if not files:
        return []
    return [_note(olds, files, job, new_derived_series, cfg, out_dir)]


def had_delivery(index: Index, job: Job, destination: str) -> bool:
    """Whether ``job``'s results had a delivery to ``destination`` that may have reached it: any delivery there
    but one dropped before it was ever sent (dead-letter whose reason begins with ``NOT_SENT``: replaced by a later
    job's results). A delivery still waiting counts (it may be in hand, or be sent). SpoolError (index)."""
    return any(not (d.state == DeliveryState.DEAD_LETTER and d.reason.startswith(NOT_SENT))
               for d in index.deliveries(job.id) if d.destination == destination)


def rejection_notes(index: Index, spool_outbox: Path, job: Job, new_derived_series: str, cfg: DeriveConfig,
                    out_dir: Path, destinations: Sequence[str], configured: Collection[str] | None = None,
                    ) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Per destination of ``job``, the rejection note retiring the earlier results of the series
    (``_results_to_retire``) that had a delivery there (:func:`had_delivery`), never one naming instances that
    destination never held: a PACS would hold a note rejecting objects it does not know. Returns (the notes per
    destination: none, absent; what was decided per destination, for the job's report: "sent", or why not,
    beginning with ``NOT_SENT``); both empty when nothing is to be retired. Destinations given the same earlier
    results share one note (deterministic UIDs). Raises SpoolError (index) and as :func:`rejection_note`.

    With ``configured`` (the names of the node's ``[[destinations]]`` now), a destination the earlier results had a
    delivery to but that is no longer one of ``destinations`` (the rule changed since) is not forgotten: still
    configured, it gets the note alone (its results would otherwise stay there, current in appearance); no longer
    configured, the note cannot go there: its entry says so (``NOT_SENT``) and a WARNING line names it, so that
    the results it holds are retired by hand."""
    olds = [o for o in _results_to_retire(index, job) if o.derived_series_uid != new_derived_series]
    files = {o.id: _files_of(spool_outbox, job, o) for o in olds}
    olds = [o for o in olds if files[o.id]]
    if not olds:
        return {}, {}
    notes: dict[str, list[Path]] = {}
    said: dict[str, str] = {}
    made: dict[tuple[int, ...], Path] = {}
    for dest in destinations:
        here = [o for o in olds if had_delivery(index, o, dest)]
        if not here:
            ids = ", ".join(str(o.id) for o in reversed(olds))
            said[dest] = (f"{NOT_SENT}the results it would retire (job{'s' if len(olds) > 1 else ''} {ids}) never "
                          f"had a delivery to {dest}")
            log.info("job %d -> %s: rejection note %s", job.id, dest, said[dest])
            continue
        key = tuple(o.id for o in here)
        if key not in made:
            made[key] = _note(here, [f for o in here for f in files[o.id]], job, new_derived_series, cfg, out_dir)
        notes[dest], said[dest] = [made[key]], "sent"
    if configured is None:
        return notes, said
    elsewhere = sorted({d.destination for o in olds for d in index.deliveries(o.id)} - set(destinations))
    for dest in elsewhere:
        here = [o for o in olds if had_delivery(index, o, dest)]
        if not here:
            continue
        ids = f"job{'s' if len(here) > 1 else ''} " + ", ".join(str(o.id) for o in reversed(here))
        if dest not in configured:
            said[dest] = (f"{NOT_SENT}the results it would retire ({ids}) had a delivery to {dest}, which is no "
                          "longer configured: they are not retired there (retire them in that PACS by hand, or "
                          "configure it again and replay the series)")
            log.warning("job %d -> %s: rejection note %s", job.id, dest, said[dest])
            continue
        key = tuple(o.id for o in here)
        if key not in made:
            made[key] = _note(here, [f for o in here for f in files[o.id]], job, new_derived_series, cfg, out_dir)
        notes[dest] = [made[key]]
        said[dest] = (f"sent alone: {dest} is no longer a destination of the rule, but holds the results it retires "
                      f"({ids})")
        log.info("job %d -> %s: rejection note %s", job.id, dest, said[dest])
    return notes, said
