"""Pull by UID: retrieve a study/series from a configured ``[[sources]]`` entry into the spool.

``srnode fetch --study UID [--series UID] --from NAME`` and ``POST /jobs`` both call :func:`fetch`.
Instances go into the spool through the same admission as received ones (``node.ingest.admit``), so the normal
stable → job path processes them. A pull is all or nothing per series: what this process reads (C-GET, WADO-RS,
Orthanc REST, the changes follower) is staged in the spool's ``incoming/`` (:class:`Staging`) and admitted only
once the source sent all of it; a failure part-way admits none of it and names the series. A C-MOVE's instances
come through the node's SCP: one that fails declares the series' size, so its job says INCOMPLETE.

- kind ``dicom``: C-MOVE (default) with the node's own AE as move destination — the PACS sends the instances to the
  running node's SCP, so the PACS must know the node's AE title, host and port; or C-GET (``--method get``), where
  this process receives the instances on the same association and spools them itself.
- kind ``dicomweb``: WADO-RS (dicomweb-client) from ``url`` (the DICOMweb service root).
- kind ``orthanc``: Orthanc REST (``/tools/find`` + ``/instances/{id}/file``, byte-exact) from ``url``; with
  ``follow_changes = true`` a ``node.ingest.follower.ChangesFollower`` also pulls every StableSeries from
  ``/changes``.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.config import Config, DicomSource, DicomwebSource, OrthancSource, Source
from node.dimse import (
    PENDING_STATUSES,
    RETRIEVE_RETRYABLE_STATUSES,
    Status,
    assoc_no_delay,
    label,
    max_pdu_problem,
)
from node.errors import ConfigError, DeliveryError, IngestError, NodeError, SpoolError, http_status_text
from node.ingest.admit import Admission, Caller, caller_rules
from node.ingest.listing import list_series
from node.store import valid_uid

log = logging.getLogger(__name__)

METHODS = ("move", "get")


class FetchError(DeliveryError):
    """A source refused or could not be reached (``retryable`` as for deliveries)."""


@dataclass
class FetchResult:
    source: str
    method: str
    study: str
    series: str
    received: int = 0  # instances spooled by this process (C-GET, WADO-RS, REST)
    moved: int = 0  # instances the PACS reported sent by C-MOVE (they arrive through the node's SCP)
    refused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.method, "study": self.study, "series": self.series,
                "received": self.received, "moved": self.moved, "refused": self.refused}


def source_caller(src: Source, via: str) -> Caller:
    """The caller identity of instances pulled from ``src``: its ``ae_title`` (else its name) and host."""
    return Caller(src.ae_title or src.name, src.caller_host, via)


def fetch(cfg: Config, source_name: str, study: str, series: str = "", *, admission: Admission,
          method: str = "") -> FetchResult:
    """Retrieve ``study`` (or one ``series`` of it) from source ``source_name`` into the spool.

    Every instance enters through ``admission`` with the source as its caller (``[node].allowed_callers``
    applies as for C-STORE). A pull of one ``series`` that ended well with nothing refused declares the series'
    size (C-MOVE: the final response's NumberOfCompletedSuboperations; else the instances received), so the
    series completes after ``[node] declared_settle_s`` rather than the quiet period (``Admission.declare``).
    Raises ConfigError for an unknown source or method, or a ``study`` / ``series`` that is not a UID (a wildcard
    would reach the source as one), FetchError when the source refuses or cannot be
    reached; refused instances are listed in the result.
    """
    src = cfg.source(source_name)
    if not study:
        raise ConfigError("fetch: a StudyInstanceUID is required")
    for what, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid and not valid_uid(uid):  # never a wildcard, a path or a list to the source (it may match them)
            raise ConfigError(f"fetch: the {what} {uid[:70]!r} is not a UID (digits and dots, at most 64)")
    if isinstance(src, DicomSource):
        method = method or "move"
        if method not in METHODS:
            raise ConfigError(f"fetch: method {method!r} is not one of {', '.join(METHODS)}")
        result = FetchResult(src.name, f"c-{method}", study, series)
        _dimse(cfg, src, result, admission, method)
    elif isinstance(src, DicomwebSource):
        # one WADO-RS answer: a series, or a whole study (its series interleaved), admitted once read whole
        result = FetchResult(src.name, "wado-rs", study, series)
        with Staging(admission, source_caller(src, "wado-rs")) as stage:
            stage_all(stage, _wado(src, study, series), f"source {src.name!r}: WADO-RS of study {study}", series)
            result.received = stage.admit(result.refused)
    else:
        result = FetchResult(src.name, "orthanc-rest", study, series)
        with orthanc_client(src) as client:
            for series_id in _orthanc_series(client, src, study, series):
                with Staging(admission, source_caller(src, "orthanc-rest")) as stage:
                    stage_all(stage, orthanc_series_files(client, src, series_id),
                               f"source {src.name!r}: Orthanc series {series_id} of study {study}", series)
                    result.received += stage.admit(result.refused)
    for why in result.refused:  # one line a series refused (or a caller refused), never one an instance
        log.warning("fetch from %s (%s): %s", src.name, result.method, why)
    log.info("fetch from %s (%s): %d spooled, %d moved, %d refused", src.name, result.method,
             result.received, result.moved, len(result.refused))
    sent = result.moved if result.method == "c-move" else result.received
    if series and sent > 0 and not result.refused:
        admission.declare(study, series, sent, f"{result.method} from {src.name}")
    return result


def _no_slice(path: Path, exc: Exception) -> bool:
    """Whether a pulled instance admission refused is no slice of its series, so that its series need not be
    refused whole: refused for its SOP class (0x0122: not a storage SOP class the node takes, however it comes; a
    C-STORE of it is refused alike while the slices are stored) and without pixel data (a vendor's private non-image
    object: Philips' MR Series Data / ExamCard, Siemens' CSA Non-Image, kept in the series of the images). One
    with pixel data may be a slice: its series is refused whole."""
    if not isinstance(exc, IngestError) or exc.status != Status.SOP_CLASS_NOT_SUPPORTED:
        return False
    try:
        ds = dcmread(path, defer_size=256, specific_tags=list(_PIXEL_DATA))
    except Exception:  # noqa: BLE001 - pydicom raises many types on a broken file: may be anything
        return False
    return not any(kw in ds for kw in _PIXEL_DATA)


_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _sop_of(path: Path) -> str:
    """The SOPInstanceUID of a staged file, as it reads ("(unreadable)" when it does not)."""
    try:
        uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - pydicom raises many types on a broken file
        return "(unreadable)"
    return uid.strip() if valid_uid(uid.strip()) else "(no valid SOPInstanceUID)"


class Staging:
    """Pulled instances staged in a folder of the spool's ``incoming/``, one file each as it comes (one in memory at
    a time, never the series), admitted only by :meth:`admit`, once the source sent all of them: a pull that fails
    part-way admits none of what it read (:meth:`failed`), so no job is ever made from part of a series the source
    was still sending. The one staging path of every pull (``fetch`` from any source, the changes follower). A
    context manager: on leaving, whatever was not admitted is removed with its folder.
    """

    def __init__(self, admission: Admission, caller: Caller) -> None:
        self.admission, self.caller = admission, caller
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="pull-", dir=admission.spool.incoming))
        except OSError as exc:
            raise FetchError(f"cannot stage a pull in {admission.spool.incoming}: {exc}") from exc
        self.paths: list[Path] = []
        self.uids: dict[tuple[str, str], int] = {}  # (study, series) read so far -> instances
        self.cut_short: list[str] = []  # series UIDs :meth:`admit` stored in part (a commit failed part-way)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def add(self, data: bytes) -> None:
        """Write one instance to the staging folder; FetchError when the spool's disk cannot hold it, or is below
        ``[node] min_free_mb`` (checked before each write, as every input does: a series bigger than the room above
        it is not staged down to a full disk, then refused whole at admission)."""
        path = self.folder / f"{len(self.paths):06d}.dcm"
        try:
            self.admission.spool.check_space()
        except IngestError as exc:
            raise FetchError(f"cannot stage a pulled instance: {exc}") from exc
        try:
            path.write_bytes(data)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise FetchError(f"cannot stage a pulled instance in {self.folder}: {exc}") from exc
        self.paths.append(path)
        key = self._key_of(path)  # admission decides on it later (:meth:`admit`)
        self.uids[key] = self.uids.get(key, 0) + 1

    def admit(self, refused: list[str]) -> int:
        """Admit the staged instances, all or nothing per series: every one is checked first
        (``Admission.check_file``); a series of which admission refuses any instance is refused whole (none of it
        admitted: a job on it would lack a slice without a word), with one entry in ``refused`` naming it by UID,
        how many of its instances were refused and why; a caller admission refuses (``[node].allowed_callers``)
        gives one entry for the whole pull, not one per instance. The other series are admitted in order
        (``Admission.admit_file``; a refusal then is listed as admission words it). A staged file whose series
        cannot be read might be of any series: nothing staged is admitted then. Returns how many were admitted;
        the stage is then empty. The caller logs the entries (one line each)."""
        try:
            return self._admit(refused)
        finally:
            for path in self.paths:
                path.unlink(missing_ok=True)
            self.paths, self.uids = [], {}

    def _admit(self, refused: list[str]) -> int:
        if not self.paths:
            return 0
        try:
            caller_rules(self.admission.cfg, self.caller)
        except IngestError as exc:
            self.admission.count_refused(exc, len(self.paths))
            refused.append(f"{len(self.paths)} instance(s) of {self._series_named()} refused: {exc}")
            return 0
        series: dict[tuple[str, str], list[Path]] = {}
        bad: dict[tuple[str, str], list[str]] = {}
        sops: dict[tuple[str, str], set[str]] = {}  # the distinct instances of each series the source sent
        for path in self.paths:
            try:
                head = self.admission.check_file(path, self.caller)
                key = (head.study_uid, head.series_uid)
                sops.setdefault(key, set()).add(head.sop_uid)
            except (IngestError, OSError) as exc:
                key = self._key_of(path)
                self.admission.count_refused(exc if isinstance(exc, IngestError) else IngestError(str(exc)))
                if key != ("?", "?") and _no_slice(path, exc):
                    refused.append(f"instance {_sop_of(path)} of series {key[1]} (study {key[0]}) refused ({exc}): "
                                   "no image (no pixel data), so no slice of the series; its other instances "
                                   "admitted")
                    continue
                bad.setdefault(key, []).append(str(exc))
            series.setdefault(key, []).append(path)
        unknown = ("?", "?") in bad  # a file whose series cannot be read: it may be a slice of any of them
        n = 0
        for key, paths in series.items():
            if key not in bad and not unknown:
                n += self._commit(key, paths, len(sops.get(key, ())), refused)
                continue
            reasons = bad.get(key) or bad[("?", "?")]
            shown = "; ".join(sorted(set(reasons))[:3]) + (" ..." if len(set(reasons)) > 3 else "")
            if key == ("?", "?"):
                what = f"{len(paths)} staged file(s) whose series cannot be read"
            else:
                k = len(bad.get(key, []))
                what = (f"series {key[1]} (study {key[0]}) refused whole: {k} of {len(paths)} instance(s) refused by "
                        f"admission" if k else f"series {key[1]} (study {key[0]}) refused whole: {len(paths)} "
                        "instance(s) pulled with a file whose series cannot be read")
                self.admission.count_refused(IngestError(shown), len(paths) - k)
            refused.append(f"{what} ({shown}); a pull is all or nothing per series: none of it admitted")
        return n

    def _commit(self, key: tuple[str, str], paths: list[Path], distinct: int, refused: list[str]) -> int:
        """Admit ``paths``, every one of series ``key`` checked already (``distinct`` instances); returns how many
        were admitted. Committing may still fail part-way (the disk reaching ``min_free_mb`` between two commits,
        an fsync or the index failing): what was admitted stays (it cannot be taken back), so the series is declared
        with the ``distinct`` instances the source sent (``Admission.declare``): it never completes early and its
        job says INCOMPLETE, unless a retry brings the rest; one entry in ``refused`` names the series and why."""
        admitted, late = 0, []
        for path in paths:
            try:
                self.admission.admit_file(path, self.caller)
                admitted += 1
            except (IngestError, SpoolError) as exc:
                late.append(str(exc))
        if not late:
            return admitted
        shown = "; ".join(sorted(set(late))[:3]) + (" ..." if len(set(late)) > 3 else "")
        what = (f"series {key[1]} (study {key[0]}): {len(late)} of {len(paths)} instance(s) could not be stored after "
                f"{admitted} were ({shown})")
        if not admitted:
            refused.append(f"{what}; none of it admitted")
            return 0
        self.cut_short.append(key[1])
        by = f"{self.caller.via} from {self.caller.ae_title}: {admitted} of {distinct} stored, the rest failed"
        try:
            self.admission.declare(key[0], key[1], distinct, by)
            said = (f"the series is declared {distinct} instance(s): unless a pull brings the rest, its job says "
                    "INCOMPLETE")
        except (SpoolError, ValueError) as exc:
            said = f"its size could not be declared ({exc}): its job may not say it is INCOMPLETE"
        refused.append(f"{what}; {said}")
        return admitted

    @staticmethod
    def _key_of(path: Path) -> tuple[str, str]:
        """The (study, series) of a staged file admission refused, when its header tells them (valid UIDs; the rest
        of the file may be what admission refused); else ("?", "?")."""
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            key = (str(ds.get("StudyInstanceUID", "") or "").strip(), str(ds.get("SeriesInstanceUID", "") or "").strip())
        except Exception:  # noqa: BLE001 - pydicom raises many types on a broken file
            return ("?", "?")
        return key if all(valid_uid(u) for u in key) else ("?", "?")

    def _series_named(self) -> str:
        named = [f"series {se}" for (_st, se) in self.uids if se != "?"]
        return ", ".join(named[:5]) + (f" and {len(named) - 5} more series" if len(named) > 5 else "") \
            if named else "the pull"

    def failed(self, exc: Exception, what: str, series: str = "") -> FetchError:
        """The error of a pull that failed part-way (``exc``, from call ``what``), naming by UID the series of
        which nothing was admitted (``series``, the series asked for, when none of it was read yet); call it
        inside the ``with``: the staged files are removed on leaving."""
        staged = [f"series {se} (study {st}): {k} instance(s) read" for (st, se), k in self.uids.items()]
        if not staged:
            staged = [f"series {series}: none read" if series else "no instance read"]
        shown = "; ".join(staged[:5]) + (f"; and {len(staged) - 5} more series" if len(staged) > 5 else "")
        retryable = exc.retryable if isinstance(exc, DeliveryError) else True
        detail = str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {str(exc)[:200]}"
        log.warning("pull %s failed part-way: %s; admitted none of %s", what, detail, shown)
        return FetchError(f"{what} failed part-way ({detail}); none of it admitted ({shown}): a pull is all or "
                          "nothing per series, pull it again", retryable=retryable)


def stage_all(stage: Staging, files: Iterable[bytes], what: str, series: str = "") -> None:
    """Stage every file of ``files``; FetchError naming the series (:meth:`Staging.failed`) when reading fails."""
    try:
        for data in files:
            stage.add(data)
    except (NodeError, httpx.HTTPError, OSError, ValueError) as exc:
        raise stage.failed(exc, what, series) from exc


# ------------------------------------------------------------------------------------------ DIMSE


def _query(study: str, series: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series else "STUDY"
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    return ds


def _dimse(cfg: Config, src: DicomSource, result: FetchResult, admission: Admission, method: str) -> None:
    caller = source_caller(src, "c-get")
    with Staging(admission, caller) as stage:
        _dimse_retrieve(cfg, src, result, stage, method)
        if method == "get":  # the C-GET ended well: every instance it brought is in, admitted together
            result.received += stage.admit(result.refused)  # none left when only non-images failed


def _dimse_retrieve(cfg: Config, src: DicomSource, result: FetchResult, stage: Staging, method: str) -> None:
    from pynetdicom import AE, build_role, evt
    from pynetdicom.presentation import StoragePresentationContexts
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    ae = AE(ae_title=cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.connection_timeout = 60  # the TCP connection and its TLS handshake (node.send.dimse)
    handlers: list[Any] = []
    roles: list[Any] = []
    what = f"source {src.name!r}: C-{method.upper()} of study {result.study}"
    if method == "move":
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        model = StudyRootQueryRetrieveInformationModelMove
    else:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for ctx in StoragePresentationContexts[:120]:
            syntax = str(ctx.abstract_syntax)
            ae.add_requested_context(syntax)
            roles.append(build_role(syntax, scp_role=True))
        model = StudyRootQueryRetrieveInformationModelGet

        def on_store(event: Any) -> int:  # staged: admitted only once the C-GET ended well (refusals listed then)
            try:
                # in a process whose SCP runs (``srnode serve``: pynetdicom's STORE_RECV_CHUNKED_DATASET is on)
                # the data set is in a file pynetdicom wrote, with its file meta; else in memory
                path = getattr(event.request, "_dataset_path", None)
                stage.add(Path(path).read_bytes() if path is not None else event.encoded_dataset())
                return Status.SUCCESS
            except FetchError as exc:
                log.warning("%s: %s", what, exc)
                return Status.OUT_OF_RESOURCES
            except OSError as exc:  # the file pynetdicom wrote could not be read
                log.warning("%s: a received instance could not be read: %s", what, exc)
                return Status.PROCESSING_FAILURE

        handlers = [(evt.EVT_C_STORE, on_store)]
    assoc = ae.associate(src.host, src.port, ae_title=src.ae_title, ext_neg=roles, evt_handlers=handlers)
    if not assoc.is_established:
        raise FetchError(f"source {src.name!r}: association with {src.ae_title}@{src.host}:{src.port} "
                         "was rejected or not answered")
    too_small = max_pdu_problem(assoc.acceptor.maximum_length)  # no request could be sent within it
    if too_small is not None:
        assoc.abort()
        raise FetchError(f"source {src.name!r}: association with {src.ae_title}@{src.host}:{src.port} aborted: "
                         f"{too_small}", retryable=False)
    assoc_no_delay(assoc)
    try:
        query = _query(result.study, result.series)
        responses = (assoc.send_c_move(query, cfg.node.ae_title, model) if method == "move"
                     else assoc.send_c_get(query, model))
        for status, _identifier in responses:
            if status is None or "Status" not in status:
                exc = FetchError(f"source {src.name!r}: C-{method.upper()} got no answer (timeout or abort)")
                if method == "move":
                    raise exc
                raise stage.failed(exc, what, result.series)
            last = int(status.Status)
            if last == Status.SUCCESS and method == "move":
                result.moved = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
            if last != Status.SUCCESS and last not in PENDING_STATUSES:
                failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
                exc = FetchError(f"source {src.name!r}: C-{method.upper()} ended with status {label(last)}"
                                 f" ({failed} sub-operation(s) failed; is {cfg.node.ae_title} known to the PACS?)",
                                 retryable=last in RETRIEVE_RETRYABLE_STATUSES)
                if method == "get":
                    if _get_fell_short_of_non_images_only(cfg, src, result, stage):
                        return
                    raise stage.failed(exc, what, result.series)
                said = _move_fell_short(cfg, src, result, stage.admission, status, last)
                if not said:  # every slice came: only non-image objects the node does not take were left
                    return
                raise FetchError(f"{exc}; {said}", retryable=exc.retryable)
    finally:
        assoc.release()


def _move_fell_short(cfg: Config, src: DicomSource, result: FetchResult, admission: Admission,
                     status: Dataset, last: int) -> str:
    """A C-MOVE ended without success: what it moved came through the node's SCP and is admitted already (the
    PACS answers once those C-STOREs ended). A series pull declares the size the PACS meant to move (completed +
    failed + warning + remaining sub-operations; a PACS that gives no counts, as Orthanc on a failure: the
    series' NumberOfSeriesRelatedInstances by C-FIND), ``Admission.declare``, so the series never completes
    early from what came: made after the quiet period, its job says ``INCOMPLETE`` with this C-MOVE's status
    (``srnode status``, a warning); a retry that ends well declares the count again. A study pull cannot tell
    which of its series fell short (the counts are the study's), nor a series pull whose size the PACS does not
    say: a warning says so. What failed may be no slice (hostile18): an IMAGE-level C-FIND (``node.ingest.listing``)
    tells the series' non-image objects of a SOP class the node does not take (a Philips series data object) from
    its images; they never count as missing, and when every image came the series is declared its images, the
    objects listed in ``result.refused``, and "" is returned (the pull did not fall short). Returns what was done,
    in words."""
    listing = list_series(cfg.node.ae_title, src, result.study, result.series) if result.series else None
    if listing is not None:
        slices, others = listing.images, listing.non_images
        missing = slices - {i.sop_uid for i in admission.index.instances_of(result.series, result.study)}
        if others and slices and not missing:  # every image came: what failed is no slice of the series
            result.moved = len(slices)
            result.refused.extend(listing.refused(result.study, result.series))
            admission.declare(result.study, result.series, len(slices),
                              f"c-move from {src.name}: all {len(slices)} image instance(s) came; {len(others)} "
                              "non-image object(s) of a SOP class the node does not take were not (no slices)")
            log.warning("source %s: C-MOVE of series %s ended with status %s, but every one of its %d image "
                        "instance(s) came: what failed is %d non-image object(s) of a SOP class the node does not "
                        "take (%s), no slice of it", src.name, result.series, label(last), len(slices),
                        len(others), ", ".join(sorted(set(others.values()))[:3]))
            return ""
    counts = {k: int(getattr(status, f"Number{k}Suboperations", 0) or 0)
              for k in ("OfCompleted", "OfFailed", "OfWarning", "OfRemaining")}
    done, meant = counts["OfCompleted"] + counts["OfWarning"], sum(counts.values())
    how = f"{done} of {meant} sub-operation(s) done, {counts['OfFailed']} failed"
    if listing is not None and listing.non_images and listing.images:  # objects that are no slice: never missing
        meant = len(listing.images)
        how += (f"; the series holds {meant} image instance(s) by C-FIND (and {len(listing.non_images)} non-image "
                "object(s) the node does not take)")
    elif result.series and meant == 0:
        meant = _series_size(cfg, src, result.study, result.series)
        how = f"no sub-operation counts; the series holds {meant} instance(s) by C-FIND"
    if not result.series or meant == 0:
        log.warning("source %s: C-MOVE of study %s%s ended with status %s (no per-series count): what it moved "
                    "completes by the quiet period and may lack instances without a job saying so; pull %s again",
                    src.name, result.study, f" series {result.series}" if result.series else "", label(last),
                    "it" if result.series else "each series")
        return ("what it moved completes by the quiet period and may lack instances (no count per series): pull "
                f"{'it' if result.series else 'each series'} again")
    result.moved = done
    row = admission.declare(result.study, result.series, meant,
                            f"c-move from {src.name} ended with status {label(last)}: {how}")
    if row is None:
        return f"nothing of series {result.series} came"
    return (f"series {result.series} declared {meant} instance(s) ({row['n_instances']} came): unless a retry "
            "brings the rest, its job says INCOMPLETE")


def _get_fell_short_of_non_images_only(cfg: Config, src: DicomSource, result: FetchResult, stage: Staging) -> bool:
    """A C-GET of a series ended without success: whether what it did not bring is only non-image objects of a SOP
    class the node does not take (``node.ingest.listing``: a Philips series data object has no storage context
    the node offers, so the PACS fails that sub-operation), every image instance of the series being staged. If
    so the staged instances are admitted (``Staging.admit``), the objects listed in ``result.refused`` and the
    series declared its image instances; True. Else nothing is done (the pull fails whole, as before)."""
    if not result.series:
        return False
    listing = list_series(cfg.node.ae_title, src, result.study, result.series)
    if listing is None or not listing.images or not listing.non_images:
        return False
    slices, others = listing.images, listing.non_images
    if slices - {_sop_of(p) for p in stage.paths}:
        return False
    result.received = stage.admit(result.refused)
    result.refused.extend(listing.refused(result.study, result.series))
    if result.received:
        stage.admission.declare(result.study, result.series, len(slices),
                                f"c-get from {src.name}: all {len(slices)} image instance(s) came; {len(others)} "
                                "non-image object(s) of a SOP class the node does not take were not (no slices)")
    return True


def _series_size(cfg: Config, src: DicomSource, study: str, series: str) -> int:
    """The series' NumberOfSeriesRelatedInstances by a C-FIND to ``src``; 0 when it cannot be had."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

    ae = AE(ae_title=cfg.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    q = _query(study, series)
    q.NumberOfSeriesRelatedInstances = None
    sizes: list[int] = []
    try:
        assoc = ae.associate(src.host, src.port, ae_title=src.ae_title)
        if not assoc.is_established:
            return 0
        try:
            for st, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                if st is not None and int(getattr(st, "Status", -1)) in PENDING_STATUSES and ident is not None:
                    sizes.append(int(ident.get("NumberOfSeriesRelatedInstances") or 0))
        finally:
            assoc.release()
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        log.warning("source %s: C-FIND of the size of series %s failed: %s", src.name, series, type(exc).__name__)
        return 0
    return sizes[0] if len(sizes) == 1 else 0


# ------------------------------------------------------------------------------------------ DICOMweb


def _wado(src: DicomwebSource, study: str, series: str) -> Iterator[bytes]:
    import requests
    from dicomweb_client import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    session = (create_session_from_user_pass(src.username, src.password) if src.username and not src.token
               else create_session())
    headers = {"Authorization": f"Bearer {src.token}"} if src.token else None
    client = DICOMwebClient(src.url.rstrip("/"), session=session, headers=headers, timeout=120)
    try:
        datasets = client.iter_series(study, series) if series else client.iter_study(study)
        for ds in datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            yield buf.getvalue()
    except requests.RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise FetchError(f"source {src.name!r}: WADO-RS from {src.url} failed: "
                         f"{http_status_text(status) if status else type(exc).__name__}",
                         retryable=status not in (400, 401, 403, 404)) from exc


# ------------------------------------------------------------------------------------------ Orthanc REST


def orthanc_client(src: OrthancSource) -> httpx.Client:
    """An HTTP client for ``src``'s REST API (basic auth or bearer token, 120 s timeout)."""
    auth = (src.username, src.password) if src.username else None
    headers = {"Authorization": f"Bearer {src.token}"} if src.token else {}
    return httpx.Client(base_url=src.url.rstrip("/"), auth=auth, headers=headers, timeout=120)


def orthanc_call(src: OrthancSource, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
    """``fn()``'s response; raises FetchError naming ``src`` and ``what`` (retryable for 5xx and transport errors)."""
    try:
        r = fn()
        r.raise_for_status()
        return r
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if 300 <= code < 400:  # not followed: the credentials stay with the configured host
            where = " ".join(exc.response.headers.get("Location", "?").split())[:200]
            raise FetchError(f"source {src.name!r}: {what}: HTTP {code}, redirected to {where}: give the address it "
                             "names as url", retryable=False) from exc
        raise FetchError(f"source {src.name!r}: {what}: {http_status_text(code)}", retryable=code >= 500) from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"source {src.name!r}: {what}: {type(exc).__name__}") from exc


def orthanc_ids(src: OrthancSource, what: str, r: httpx.Response, key: str = "") -> list[str]:
    """The list of Orthanc ids in ``r``'s JSON (``key``: in that key of an object); FetchError naming ``what``
    when the answer is not JSON of that shape (a proxy's page, another server): never guessed from."""
    try:
        doc = r.json()
    except ValueError:
        doc = None
    ids = (doc.get(key) if isinstance(doc, dict) else None) if key else doc
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        got = type(doc).__name__ if doc is not None else "no JSON"
        raise FetchError(f"source {src.name!r}: {what}: answered JSON that is not Orthanc's (expected "
                         f"{f'an object with {key!r}' if key else 'a list'} of ids, got {got})")
    return ids


def _orthanc_series(client: httpx.Client, src: OrthancSource, study: str, series: str) -> list[str]:
    """The Orthanc ids of the series to pull (one when ``series`` is given); FetchError when none."""
    query = {"StudyInstanceUID": study, **({"SeriesInstanceUID": series} if series else {})}
    found = orthanc_ids(src, "find", orthanc_call(src, "find", lambda: client.post("/tools/find", json={
        "Level": "Series", "Query": query})))
    if not found:
        raise FetchError(f"source {src.name!r}: no series for study {study}" + (f" series {series}" if series
                         else ""), retryable=False)
    return found


def orthanc_series_files(client: httpx.Client, src: OrthancSource, series_id: str) -> Iterator[bytes]:
    """The files of Orthanc series ``series_id``, byte-exact; raises FetchError."""
    instances = orthanc_ids(src, f"series {series_id}", orthanc_call(
        src, f"series {series_id}", lambda: client.get(f"/series/{series_id}")), "Instances")
    for inst in instances:
        url = f"/instances/{inst}/file"
        yield orthanc_call(src, f"instance {inst}", lambda u=url: client.get(u)).content  # type: ignore[misc]
