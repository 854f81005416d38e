"""Admission: the ONE way an instance enters the node, whatever carried it.

The C-STORE SCP, STOW-RS, every pull (C-GET, WADO-RS, Orthanc REST; C-MOVE arrives through the SCP) and the
Orthanc changes follower all call :meth:`Admission.admit_file` or :meth:`Admission.admit_bytes`. Admission:

1. decides what the caller may do (``[node].allowed_callers`` / ``require_known_callers``): one decision, by
   calling AE title and, where an entry names one, the caller's address;
2. reads the header without decoding pixels (:func:`read_header`): UIDs present and valid, the pixel data
   element wholly inside the file (a Deflated data set is first inflated in chunks to a scratch copy, never whole
   in memory: ``node.ingest.inflate``); the SOP class comes from the dataset itself (SOPClassUID, else the file meta),
   and a C-STORE whose command names another SOP class or another SOP instance than the dataset's is answered
   0xA900 (nothing is stored: the command and the data set disagree on what this is);
3. hands the file to the group commit (``node.ingest.commit``), which checks the spool's disk watermark, links
   it into the spool, makes it durable and records it in the index (with the caller's AE title and the rules it
   may use) together with the instances other callers handed it meanwhile: one sync and one index transaction
   per batch, and the caller waits until its batch is on disk; a resend of a known SOPInstanceUID that differs from the
   stored copy is a conflict (``node.ingest.resend``): kept aside in ``spool/conflicts/``, recorded in the index,
   counted and audited, the first copy still the one used; a plain duplicate (same content) restarts its series'
   quiet timer while the series is still receiving (``Index.note_duplicate``: a sender resending is sending);
4. counts the outcome in one metric (``srnode_instances_received_total{status}``).

Every refusal is an :class:`~node.errors.IngestError` carrying the DIMSE status to answer with
(:class:`node.dimse.Status`); STOW-RS reports the same value as its Failure Reason.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts

from node.audit import AuditLog
from node.config import CallerConfig, Config
from node.dimse import Status, label
from node.errors import IngestError, dicom_read_problem
from node.ingest.commit import GroupCommit
from node.ingest.inflate import LONG_VRS, inflated_copy, is_deflated
from node.ingest.resend import resend_difference
from node.metrics import Metrics
from node.phi import raw_text
from node.store import NO_HINT, Index, Instance, SizeHint, Spool, Stored, valid_uid

log = logging.getLogger(__name__)

# the storage SOP classes pynetdicom knows (PS3.4 Annex B.5), as UID strings
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
_UNDEFINED_LENGTH = 0xFFFFFFFF
IN_MEMORY_HEADER_BYTES = 1 << 20  # files up to this size are parsed from memory (read_header: one read, no seeks)
DEFER_BYTES = 64 << 10  # a header value larger than this is left in the file, not read (header_dataset)
# the header values read_header and STOW-RS look at: each must have been read (not left in the file as too long)
READ_KEYWORDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID", "Modality",
                 "ImagesInAcquisition", "NumberOfFrames", "AcquisitionNumber")
DEFAULT_MAX_INSTANCE_BYTES = 2048 << 20  # [node] max_instance_mb's default, in bytes


@dataclass(frozen=True)
class Caller:
    """Who handed the node an instance.

    ``ae_title``: the calling AE title (C-STORE), or the identity configured for the path (a source's
    ``ae_title`` or name for pulls, ``[http].stow_caller`` for STOW-RS); ``address``: the peer's IP address or
    host; ``via``: the path, for logs and the audit ("c-store", "stow-rs", "c-get", "wado-rs", "orthanc-rest").
    ``trusted``: the instances were already admitted by the receiving node (a Celery worker fetching its job's
    series from it); the caller checks were applied there and are not repeated.
    """

    ae_title: str
    address: str = ""
    via: str = "c-store"
    trusted: bool = False


@dataclass(frozen=True)
class Header:
    """What the handler learns from a received file, without its pixels."""

    sop_uid: str
    series_uid: str
    study_uid: str
    modality: str
    sop_class: str  # SOPClassUID of the dataset (else the file meta's MediaStorageSOPClassUID)
    transfer_syntax: str  # the file meta's TransferSyntaxUID ("" when the file has no meta)
    size_hint: SizeHint = NO_HINT  # what the header says about the series' size (:func:`size_hint`)


def _integer(ds: Dataset, keyword: str) -> str:
    """``keyword``'s value as a decimal integer string, read raw (no pydicom conversion, so no warning quoting the
    value); "" when absent or empty, "?" when it is no single integer (a malformed or hostile value is never
    echoed: it may hold anything)."""
    text = raw_text(ds, keyword)
    if not text:
        return ""
    return str(int(text)) if re.fullmatch(r"[+-]?\d{1,9}", text) else "?"


def size_hint(ds: Dataset) -> SizeHint:
    """What ``ds`` (a header) says about the size of its series: ImagesInAcquisition (0020,1002), the number of
    images of its acquisition. For a multi-frame object (NumberOfFrames > 1, e.g. an enhanced CT/MR image) those
    images are frames: the series is expected to hold ImagesInAcquisition / NumberOfFrames instances (1 for a
    single enhanced object whose ImagesInAcquisition equals its NumberOfFrames; no hint when it does not divide).
    The signature also carries NumberOfFrames and AcquisitionNumber, so a series is trusted to declare a size
    only when every instance agrees on all three (one acquisition, one frame count; see ``node.store.SizeHint``).
    No ImagesInAcquisition: no hint -- an enhanced object without it is NOT taken as a series of one (a series
    may hold several, e.g. one per echo). Never raises."""
    images = _integer(ds, "ImagesInAcquisition")
    if not images:
        return NO_HINT
    frames = _integer(ds, "NumberOfFrames") or "1"
    acquisition = _integer(ds, "AcquisitionNumber")
    signature = f"ImagesInAcquisition={images} NumberOfFrames={frames} AcquisitionNumber={acquisition}"
    n = 0
    if images.isdigit() and frames.isdigit() and int(frames) > 0 and int(images) % int(frames) == 0:
        n = int(images) // int(frames)
    return SizeHint(signature, n)


def _pixel_data_end(fh: BinaryIO, little: bool, implicit: bool) -> tuple[int, str] | None:
    """From the start of the pixel data element: (offset where its value ends, tag) or None at end of file.

    Encapsulated (undefined length) pixel data is walked item by item up to its sequence delimiter.
    """
    end = "<" if little else ">"
    head = fh.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = f"({group:04X},{elem:04X})"
    if implicit:
        (length,) = struct.unpack(end + "L", head[4:8])
    elif head[4:6] in LONG_VRS:
        more = fh.read(4)
        if len(more) < 4:
            return fh.tell() + 4, tag
        (length,) = struct.unpack(end + "L", more)
    else:
        (length,) = struct.unpack(end + "H", head[6:8])
    if length != _UNDEFINED_LENGTH:
        return fh.tell() + length, tag
    while True:  # encapsulated: items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD)
        item = fh.read(8)
        if len(item) < 8:
            return fh.tell() + 8, tag
        ig, ie, ilen = struct.unpack(end + "HHL", item)
        if (ig, ie) == (0xFFFE, 0xE0DD):
            return fh.tell(), tag
        fh.seek(ilen, 1)


def _header_source(path: Path, size: int) -> BinaryIO:
    """What :func:`read_header` parses: a file of at most ``IN_MEMORY_HEADER_BYTES`` read whole into memory
    (one read; the same bytes, so the same checks), a larger one opened as it is. pydicom asks a file object for
    its position ~40 times per header, and a file's ``tell()`` is an ``lseek`` that releases the GIL: under 16
    concurrent associations each release was a wait for the GIL to come back (strace: 43 of read_header's 51
    system calls for a 128 KiB CT slice were ``lseek``). Raises OSError."""
    if size > IN_MEMORY_HEADER_BYTES:
        return path.open("rb")
    with path.open("rb", buffering=0) as raw:
        return io.BytesIO(raw.readall())


def _too_large(what: str, limit: int) -> IngestError:
    return IngestError(f"{what} is over node.max_instance_mb = {limit >> 20}: refused before its header is read "
                       "whole", Status.TOO_LARGE)


def _elements_inside(ds: Dataset, size: int) -> tuple[int, str] | None:
    """(where it ends, tag) of the first top-level element of ``ds`` (read from a file of ``size`` bytes) whose
    value the file does not hold (its length past the end), else None. Values over ``DEFER_BYTES`` are left in the
    file by the header check (not read), so a lying length must be caught here."""
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > size:
            return tell + length, f"({tag.group:04X},{tag.element:04X})"
    return None


def _parse(fh: BinaryIO, size: int) -> tuple[Dataset, tuple[int, str] | None]:
    """(header, where its pixel data element ends and its tag, None without one) of the file open as ``fh``
    (``size`` bytes, not deflated); IngestError(0xC210) when it cannot be parsed or an element ends past it."""
    try:
        ds: Dataset = dcmread(fh, stop_before_pixels=True, defer_size=DEFER_BYTES)
        ends = _pixel_data_end(fh, ds.original_encoding[1] is not False,
                               ds.original_encoding[0] is not False) if fh.tell() < size else None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
        raise IngestError(f"file cannot be parsed: {type(exc).__name__}: {dicom_read_problem(exc)}",
                          Status.CANNOT_UNDERSTAND) from exc
    for keyword in READ_KEYWORDS:  # values read below: one left in the file is no header value (and not read)
        tag = tag_for_keyword(keyword)
        raw = ds.get_item(tag, keep_deferred=True) if tag is not None and tag in ds else None
        length = int(getattr(raw, "length", 0) or 0)
        if raw is not None and raw.value is None and length > DEFER_BYTES:
            raise IngestError(f"{keyword} is {length} bytes long: not a header value",
                              Status.CANNOT_UNDERSTAND)
    past = _elements_inside(ds, size)
    if past is None and ends is not None and ends[0] > size:
        past = ends
    if past is not None:
        raise IngestError(f"file is truncated: element {past[1]} ends at byte {past[0]}, the file has {size}",
                          Status.CANNOT_UNDERSTAND)
    if ends is not None and ends[0] < size:
        problem = _trailing_problem(fh, ends, size, ds.original_encoding[1] is not False,
                                    ds.original_encoding[0] is not False)
        if problem is not None:
            raise IngestError(f"file cannot be parsed: {size - ends[0]} byte(s) after its pixel data {ends[1]} "
                              f"(which ends at byte {ends[0]}) are no data set elements: {problem}",
                              Status.CANNOT_UNDERSTAND)
    return ds, ends


MAX_TRAILING_ELEMENTS = 1000  # elements after the pixel data walked (padding, a signature, private groups)


def _trailing_problem(fh: BinaryIO, ends: tuple[int, str], size: int, little: bool, implicit: bool) -> str | None:
    """What is wrong with the bytes between the end of the pixel data element (``ends``: offset, tag) and the
    end of the file (``size``), None when they are whole data set elements, each of a tag above the one before
    (PS3.5 7.1: ascending order; Data Set Trailing Padding (FFFC,FFFC), a Digital Signatures Sequence, private
    groups above 7FE0 are such), each ending inside the file; an undefined-length one ends the walk (believed).
    Before hostile18 bytes after the pixel data were stored as they came (0x0000): zeros, text, an element header
    announcing 1 GB past the end: a file every later reader parses its own way, or fails on."""
    end = "<" if little else ">"
    at = ends[0]
    previous = int(ends[1][1:5], 16) << 16 | int(ends[1][6:10], 16)
    for _ in range(MAX_TRAILING_ELEMENTS):
        if at >= size:
            return None
        fh.seek(at)
        head = fh.read(8)
        if len(head) < 8:
            return f"{size - at} byte(s) at byte {at}, too few for an element header"
        group, elem = struct.unpack(end + "HH", head[:4])
        tag = group << 16 | elem
        if tag <= previous:
            return (f"the tag ({group:04X},{elem:04X}) at byte {at} does not follow "
                    f"({previous >> 16:04X},{previous & 0xFFFF:04X}) (tags ascend in a data set)")
        if implicit:
            (length,) = struct.unpack(end + "L", head[4:8])
            at += 8
        elif not (65 <= head[4] <= 90 and 65 <= head[5] <= 90):
            return f"the element ({group:04X},{elem:04X}) at byte {at} has no VR (bytes {bytes(head[4:6])!r})"
        elif head[4:6] in LONG_VRS:
            more = fh.read(4)
            if len(more) < 4:
                return f"the element ({group:04X},{elem:04X}) at byte {at} is cut in its header"
            (length,) = struct.unpack(end + "L", more)
            at += 12
        else:
            (length,) = struct.unpack(end + "H", head[6:8])
            at += 8
        if length == _UNDEFINED_LENGTH:
            return None
        if at + length > size:
            return f"the element ({group:04X},{elem:04X}) ends at byte {at + length}, the file has {size}"
        at, previous = at + length, tag
    return f"more than {MAX_TRAILING_ELEMENTS} elements after the pixel data"


def header_dataset(path: Path, max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, scratch: Path | None = None,
                   has_space: Callable[[], bool] | None = None) -> tuple[Dataset, tuple[int, str] | None]:
    """(header, where its pixel data element ends and its tag, or None) of the DICOM file at ``path``, no pixel
    data read, with bounded memory whatever the file declares or holds: values over ``DEFER_BYTES`` stay in the
    file (not read: a 500 MB private element cost 500 MB of memory per association in the check), a file over
    ``max_bytes`` is refused before it is read, and a deflated data set is inflated in chunks to a copy beside
    the file (``node.ingest.inflate.inflated_copy``, refused once it passes ``max_bytes``), read there and removed (its values
    over ``DEFER_BYTES`` cannot be read then). ``scratch``: the folder of that copy, default the file's own; a
    file that is not in ``incoming/`` (reindex reads the spool's ``instances/``) must name ``incoming/``: a copy
    a kill leaves there is removed at the next start, one left beside a stored instance stays for good.
    ``has_space``: the spool's watermark, asked while inflating (0xA700 once it is False; None: not asked).
    IngestError 0xC211 (too large) or 0xC210 (cannot be parsed, an element past the end of the file); OSError
    when unreadable."""
    size = path.stat().st_size
    if size > max_bytes:
        raise _too_large(f"an instance of {size} bytes", max_bytes)
    with _header_source(path, size) as fh:
        if not is_deflated(fh, path, size):  # 0xC210 for a file meta too long to read
            fh.seek(0)
            return _parse(fh, size)
    with inflated_copy(path, max_bytes, scratch, has_space) as copy:
        size = copy.stat().st_size
        with _header_source(copy, size) as fh:
            ds, ends = _parse(fh, size)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian  # as the file says, not its copy
        return ds, ends


def read_header(path: Path, max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES, scratch: Path | None = None,
                has_space: Callable[[], bool] | None = None) -> Header:
    """Parse the header of a received file; IngestError(0xC210) naming the reason when it is unusable, (0xA700)
    when the file, or its deflated data set once inflated, is over ``max_bytes`` (``[node] max_instance_mb``).

    Pixels are not decoded; the pixel data element is only checked to lie wholly inside the file (for the deflated
    transfer syntax: inside the inflated data set). Memory stays bounded whatever the file declares or holds
    (:func:`header_dataset`; ``scratch``: where a deflated data set is inflated, ``has_space``: the watermark
    asked meanwhile). The SOP class is the dataset's SOPClassUID, else the file meta's
    MediaStorageSOPClassUID; the series' declared size is read too (:func:`size_hint`). OSError when ``path``
    cannot be read at all.
    """
    ds, ends = header_dataset(path, max_bytes, scratch, has_space)
    uids: dict[str, str] = {}
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        try:
            value = str(ds.get(kw, "") or "").strip()
        except Exception as exc:  # noqa: BLE001 - a malformed value
            raise IngestError(f"{kw} cannot be read: {exc}", Status.CANNOT_UNDERSTAND) from exc
        if not value:
            raise IngestError(f"{kw} is missing or empty", Status.CANNOT_UNDERSTAND)
        if not valid_uid(value):
            raise IngestError(f"{kw} {value!r} is not a valid UID", Status.CANNOT_UNDERSTAND)
        uids[kw] = value
    try:
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "").strip()
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    except Exception as exc:  # noqa: BLE001 - a malformed value
        raise IngestError(f"SOPClassUID cannot be read: {exc}", Status.CANNOT_UNDERSTAND) from exc
    name = UID(sop_class).name if sop_class else ""
    if "Image Storage" in name and ends is None:
        raise IngestError(f"{name} without pixel data", Status.CANNOT_UNDERSTAND)
    try:
        modality = str(ds.get("Modality", "") or "")
    except Exception as exc:  # noqa: BLE001 - a malformed value (found by tests/ingest/fuzz_ingest.py)
        raise IngestError(f"Modality cannot be read: {exc}", Status.CANNOT_UNDERSTAND) from exc
    return Header(sop_uid=uids["SOPInstanceUID"], series_uid=uids["SeriesInstanceUID"],
                  study_uid=uids["StudyInstanceUID"], modality=modality, sop_class=sop_class,
                  transfer_syntax=transfer_syntax, size_hint=size_hint(ds))


def find_caller(callers: tuple[CallerConfig, ...], ae_title: str, address: str) -> CallerConfig | None:
    """The ``[node].allowed_callers`` entry for this AE title (and address, where the entry names a host)."""
    for c in callers:
        if c.ae_title.strip() == ae_title.strip() and (not c.host or c.host == address):
            return c
    return None


def caller_rules(cfg: Config, caller: Caller) -> str:
    """The rules ``caller`` may use, as the index stores them ("" = every rule; "a,b" = only these).

    Raises IngestError(0x0124 not authorized) when ``[node].require_known_callers`` is set and the caller is not
    in ``[node].allowed_callers``. The SCP applies the same decision at association time (A-ASSOCIATE-RJ).
    """
    if caller.trusted:
        return ""
    entry = find_caller(cfg.node.allowed_callers, caller.ae_title, caller.address)
    if entry is None:
        if cfg.node.require_known_callers:
            raise IngestError(f"caller {caller.ae_title!r} ({caller.via}) is not in node.allowed_callers",
                              Status.NOT_AUTHORIZED)
        return ""
    return ",".join(entry.rules)


class Admission:
    """Admits instances into ``spool`` and ``index`` for ``cfg``; safe to share between threads.

    Counts each offered instance in ``srnode_instances_received_total{status}`` (an error other than
    IngestError counts under 0x0110) and each refusal by :meth:`admit_file` in
    ``srnode_failures_total{where="ingest"}``. ``audit``: where conflicting resends are recorded (the running
    node's audit log).
    """

    def __init__(self, cfg: Config, spool: Spool, index: Index, metrics: Metrics,
                 audit: AuditLog | None = None) -> None:
        self.cfg, self.spool, self.index, self.metrics, self.audit = cfg, spool, index, metrics, audit
        self.writer = GroupCommit(spool, index)  # makes admitted instances durable in shared batches

    def admit_file(self, path: Path, caller: Caller, declared_sop_class: str = "",
                   transfer_syntax: str = "", declared_sop_instance: str = "") -> Stored:
        """Admit the complete DICOM file at ``path`` (on the spool's disk; it is linked, not moved).

        ``declared_sop_class`` / ``declared_sop_instance``: the Affected SOP Class / Instance UID of the C-STORE
        command (0xA900 when the dataset's differ); ``transfer_syntax``: the negotiated one (default: the file
        meta's). Returns where the instance is stored (``duplicate`` when its SOPInstanceUID was already there:
        the first copy is kept; a resend that differs is kept aside as a conflict). Raises IngestError with the
        DIMSE status.
        """
        status = Status.SUCCESS
        try:
            return self._admit(path, caller, declared_sop_class, transfer_syntax, declared_sop_instance)
        except IngestError as exc:
            status = Status(exc.status) if exc.status in Status._value2member_map_ else Status.CANNOT_UNDERSTAND
            self.metrics.failures.labels(where="ingest", reason=label(exc.status)).inc()
            raise
        except BaseException as exc:  # the index or the disk failed: counted as such, then raised as it is
            status = Status.PROCESSING_FAILURE
            self.metrics.failures.labels(where="ingest", reason=type(exc).__name__).inc()
            raise
        finally:
            self.metrics.instances_received.labels(status=label(status)).inc()

    def admit_bytes(self, data: bytes, caller: Caller) -> Stored:
        """Admit one DICOM Part 10 file given as bytes (STOW-RS part, pulled instance); as :meth:`admit_file`.

        The bytes go to a temporary file in the spool's ``incoming/`` first (IngestError 0xA700 if it fails).
        """
        with tempfile.NamedTemporaryFile(prefix="rx-", suffix=".dcm", dir=self.spool.incoming) as tmp:
            try:
                tmp.write(data)
                tmp.flush()
            except OSError as exc:
                self.metrics.instances_received.labels(status=label(Status.OUT_OF_RESOURCES)).inc()
                raise IngestError(f"cannot write to the spool {self.spool.root}: {exc}",
                                  Status.OUT_OF_RESOURCES) from exc
            return self.admit_file(Path(tmp.name), caller)

    def count_refused(self, exc: IngestError, instances: int = 1) -> None:
        """Count ``instances`` refused with ``exc`` without :meth:`admit_file` (a pulled series refused whole):
        in ``srnode_instances_received_total{status}`` and ``srnode_failures_total{where="ingest"}``, as it does."""
        status = Status(exc.status) if exc.status in Status._value2member_map_ else Status.CANNOT_UNDERSTAND
        self.metrics.failures.labels(where="ingest", reason=label(exc.status)).inc(instances)
        self.metrics.instances_received.labels(status=label(status)).inc(instances)

    def check_file(self, path: Path, caller: Caller, declared_sop_class: str = "",
                   declared_sop_instance: str = "") -> Header:
        """What :meth:`admit_file` checks before it stores anything, without storing (nor counting) anything: the
        caller may hand instances (``caller_rules``), the header is usable (:func:`read_header`), the SOP class is a
        storage one and the C-STORE command's (``declared_*``) agree with the dataset. Returns the header; raises
        IngestError with the DIMSE status, as :meth:`admit_file` would (a pull checks every instance of a series
        with it before admitting any: all or nothing per series, ``node.ingest.pull.Staging``); OSError when
        ``path`` cannot be read."""
        caller_rules(self.cfg, caller)
        return self._checked(path, declared_sop_class, declared_sop_instance)

    def _checked(self, path: Path, declared_sop_class: str, declared_sop_instance: str) -> Header:
        header = read_header(path, self.cfg.node.max_instance_mb << 20, has_space=self.spool.has_space)
        if header.sop_class not in STORAGE_SOP_CLASSES:
            raise IngestError(f"SOP class {header.sop_class!r} is not a storage SOP class",
                              Status.SOP_CLASS_NOT_SUPPORTED)
        if declared_sop_class and declared_sop_class != header.sop_class:
            raise IngestError(f"the dataset's SOP class {header.sop_class} differs from the command's "
                              f"{declared_sop_class}", Status.DATASET_DOES_NOT_MATCH)
        if declared_sop_instance and declared_sop_instance.strip() != header.sop_uid:
            raise IngestError(f"the dataset's SOPInstanceUID {header.sop_uid} differs from the command's Affected "
                              f"SOP Instance UID {declared_sop_instance.strip()}", Status.DATASET_DOES_NOT_MATCH)
        return header

    def _admit(self, path: Path, caller: Caller, declared_sop_class: str, transfer_syntax: str,
               declared_sop_instance: str) -> Stored:
        allowed_rules = caller_rules(self.cfg, caller)
        header = self._checked(path, declared_sop_class, declared_sop_instance)
        inst = Instance(sop_uid=header.sop_uid, series_uid=header.series_uid, study_uid=header.study_uid,
                        sop_class=header.sop_class, transfer_syntax=transfer_syntax or header.transfer_syntax,
                        path="", calling_ae=caller.ae_title, allowed_rules=allowed_rules)
        stored, added = self.writer.commit(path, inst, header.modality, header.size_hint)
        if added:
            return stored
        return self._resent(path, stored, replace(inst, path=str(stored.path)), caller)

    def declare(self, study_uid: str, series_uid: str, instances: int, by: str) -> dict[str, Any] | None:
        """A puller (or the Orthanc plugin, through the HTTP API) says series (``study_uid``, ``series_uid``)
        holds ``instances`` distinct instances (``by``: who, in words: "c-move", "http", ...): once they are in,
        the series completes after ``[node] declared_settle_s`` instead of the quiet period
        (``Index.declare_series``). Returns the series row (as ``Index.series``), None when nothing of the series
        was received (the declaration is not kept).
        ValueError when ``instances`` < 1; SpoolError when the index cannot be written."""
        row = self.index.declare_series(study_uid, series_uid, instances, by)
        if row is None:
            log.warning("series %s (study %s): %s declares %d instance(s) but none was received: ignored",
                        series_uid, study_uid, by, instances)
            return None
        log.info("series %s (study %s): %s declares %d instance(s); %d received", series_uid, study_uid, by,
                 instances, row["n_instances"])
        return row

    def _resent(self, path: Path, stored: Stored, inst: Instance, caller: Caller) -> Stored:
        """A SOPInstanceUID already in the index came again: a plain duplicate, or a conflict kept aside."""
        kept = self.index.instance(inst.sop_uid)
        if kept is None:  # pragma: no cover - the row was there a moment ago; nothing deletes rows
            return stored
        why = resend_difference(kept, inst.study_uid, inst.series_uid, path)
        if not why:
            active = self.index.note_duplicate(kept.study_uid, kept.series_uid)
            log.info("duplicate instance %s of series %s from %s (%s): kept the copy already stored%s",
                     inst.sop_uid, inst.series_uid, caller.ae_title, caller.via,
                     "; the series is still receiving: its quiet timer restarts" if active else "")
            return stored
        if not stored.duplicate and stored.path != Path(kept.path):
            stored.path.unlink(missing_ok=True)  # linked under another study/series just now: not an instance
        aside = self.spool.keep_aside(path, inst.sop_uid)
        self.index.add_conflict(inst, caller.via, why, kept.path, str(aside))
        self.metrics.instance_conflicts.inc()
        log.warning("conflicting resend of instance %s (series %s) from %s (%s): %s; the stored copy is kept and "
                    "used, the resend is kept aside as %s", inst.sop_uid, inst.series_uid, caller.ae_title,
                    caller.via, why, aside)
        if self.audit is not None:
            self.audit.write("instance-conflict", sop=inst.sop_uid, series=inst.series_uid, study=inst.study_uid,
                             calling_ae=caller.ae_title, via=caller.via, reason=why, kept=kept.path,
                             resend=str(aside))
        return Stored(Path(kept.path), duplicate=True)
