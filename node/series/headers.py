"""The input headers of a volume, per slice: a small frozen record of what is read after loading, and the full
header, held in memory or (once released) read again from its file when a derived object copies from it.

Why (issue #15 item 5): a long series held every input slice's pydicom header for the whole job (~28 KB a slice
for a 64² CT, far more for scanner headers) although, once the volumes are built, only a few values of each are
read (``SliceHeader``: its UIDs, window, photometric interpretation, thickness, stored bits) and the full header
of one slice at a time, when a derived slice copies its patient / study / acquisition attributes from it.

``InputHeaders`` is the ``SeriesVolume.datasets`` sequence: ``headers[k]`` is slice k's full header (a Dataset),
``headers.record(k)`` its ``SliceHeader``. The load (``node.series.load``) holds no header of a single-frame image
read from a file: it takes what it needs as it reads each file and lets go of it (the record has what is read
later, ``seen`` what the job's checks took). Frames of a multi-frame object (one header for many slices;
re-reading it per slice would parse its functional groups again and again) and the tiles of a Siemens mosaic (made
in memory) stay held; ``release(fix)`` (the job's pipeline, after the volumes are built and checked) drops their
PixelData, private elements, overlays and icon and sets ``fix``. A header not held is read again (header only,
``stop_before_pixels``) when asked for, stripped as the held ones, and ``fix`` applied once released (the job's
``node.derived.conform_dataset``, so it carries the same values as the checked one); the last one read is kept
for the next ask (a derived slice and its neighbour copy from the same input slice). The file must hold the bytes
loaded (``FileStamp``: size and a digest of all its bytes, so an in-place rewrite with its modification time put
back is caught, a touch is not a change) and the same SOPInstanceUID; otherwise ``DeriveError`` names the file, so that no derived slice is written with values
other than the checked ones (two patients in one derived series).
"""

from __future__ import annotations

import collections.abc
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.dicom_read import read_dicom
from node.errors import DeriveError, dicom_read_problem
from node.series.lossy import LossyCompression, lossy_compression
from node.series.slices import MALFORMED, frame_group_item, sop_class_of, sop_instance_of

_UNUSED_AFTER_LOAD = (Tag("IconImageSequence"),)


@dataclass(frozen=True)
class FileStamp:
    """The bytes a header was read from: the file's size and a BLAKE2b-128 digest of all its bytes. A file whose
    bytes changed in any way (rewritten in place with its mtime put back, replaced by a rename, removed and written
    again with other values) has another stamp; one touched, or copied back with the same bytes, has the same."""

    size: int
    digest: bytes

    @classmethod
    def of_bytes(cls, data: bytes) -> FileStamp:
        """The stamp of a file whose bytes are ``data``."""
        return cls(len(data), hashlib.blake2b(data, digest_size=16).digest())


def read_stamped(path: Path, stop_before_pixels: bool = False) -> tuple[Dataset, FileStamp]:
    """The whole file (pixels not decoded; ``stop_before_pixels``: its header only) and the stamp of the bytes
    read: the file is read once, into memory, and both the digest and pydicom's parse come from those bytes
    (issue #15 item 5: it was read twice); ``filename`` is ``path``. Raises OSError and pydicom's errors as
    ``pydicom.dcmread``."""
    with open(path, "rb") as fh:
        data = fh.read()
    ds = read_dicom(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    ds.filename = str(path)  # as ``pydicom.dcmread(path)`` sets it (messages name the file)
    return ds, FileStamp.of_bytes(data)


def _numbers(value: Any) -> list[float]:
    """A DS value (one number or several) as floats; [] when absent or unreadable."""
    if value is None or value == "":
        return []
    items = list(value) if hasattr(value, "__len__") and not isinstance(value, (str, bytes)) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return []


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # VOILUTFunction's defined terms (PS3.3 C.11.2.1.3)


def slice_voi(ds: Dataset, frame: int = -1) -> tuple[str, Dataset | None]:
    """The image's VOI LUT Function (one of ``VOI_FUNCTIONS``, "" when absent, another value, or unreadable) and
    its VOI LUT Sequence's first item as a new data set (LUTDescriptor, LUTData, LUTExplanation; None when absent
    or incomplete): at the top level, or for a frame of an enhanced object (``frame`` 0-based) in its Frame VOI LUT
    functional group. Both act on modality values (after the rescale), as the window does."""
    try:
        src: Dataset | None = ds if frame < 0 else frame_group_item(ds, "FrameVOILUTSequence", frame)
        if src is None:
            return "", None
        fn = str(src.get("VOILUTFunction", "") or "").strip().upper()
        seq = src.get("VOILUTSequence")
        lut = None
        if seq is not None and len(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0] and \
                _table_whole(seq[0]):
            lut = Dataset()
            for keyword in ("LUTDescriptor", "LUTExplanation", "LUTData"):
                if keyword in seq[0]:
                    elem = seq[0][keyword]
                    lut.add_new(elem.tag, elem.VR, elem.value)
    except MALFORMED:
        return "", None
    return (fn if fn in VOI_FUNCTIONS else ""), lut


def _table_whole(item: Dataset) -> bool:
    """Whether a VOI LUT item is a table a reader can apply (PS3.3 C.11.2.1.1): a LUTDescriptor of 3 integers
    (entries, 0 meaning 65536; first value mapped; 8 to 16 bits an entry) and LUTData holding that many 16-bit
    entries. review19: a descriptor of one value failed the whole series (TypeError comparing the slices' tables),
    and a table shorter than its descriptor, or of 40 bits an entry, was copied to every derived slice (dciodvfy:
    "LookupTableData has wrong length")."""
    desc = item.LUTDescriptor
    values = list(desc) if isinstance(desc, collections.abc.Sequence) and not isinstance(desc, (str, bytes)) \
        else [desc]
    if len(values) != 3 or not all(isinstance(v, int) for v in values):
        return False
    entries = values[0] or 65536
    if not 8 <= values[2] <= 16:
        return False
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        return len(data) == 2 * entries
    held = len(data) if isinstance(data, collections.abc.Sequence) and not isinstance(data, str) else 1
    return held == entries


def voi_lut_key(lut: Dataset | None) -> tuple[str, str, bytes] | None:
    """What makes two VOI LUT items the same table: descriptor, explanation and the table's values as bytes."""
    if lut is None:
        return None
    data = lut.LUTData
    raw = bytes(data) if isinstance(data, (bytes, bytearray)) else b",".join(str(int(v)).encode() for v in
                                                                              (data if isinstance(data, list | tuple |
                                                                               collections.abc.Sequence) else [data]))
    return str(list(lut.LUTDescriptor)), str(lut.get("LUTExplanation", "") or ""), raw


def slice_window(ds: Dataset, frame: int = -1) -> tuple[list[float], list[float]] | None:
    """The (centres, widths) of one image: its WindowCenter / WindowWidth, or for a frame of an enhanced object
    (``frame`` 0-based) its Frame VOI LUT functional group. None when absent, unreadable or a width is not > 0."""
    try:
        src: Dataset | None = ds if frame < 0 else frame_group_item(ds, "FrameVOILUTSequence", frame)
        if src is None:
            return None
        c, w = _numbers(src.get("WindowCenter")), _numbers(src.get("WindowWidth"))
    except MALFORMED:
        return None
    n = min(len(c), len(w))
    if n == 0 or any(x <= 0 for x in w[:n]):
        return None
    return c[:n], w[:n]


@dataclass(frozen=True)
class SliceHeader:
    """What is read of one input image after its volume is built (everything else of its header is read again
    from ``file`` when a derived slice copies from it).

    ``file``: where it was read from (None: made in memory); ``stamp``: that file as read (None: the header cannot
    be read again and stays held); ``frame``: 0-based frame of a multi-frame object, -1 for single-frame;
    ``sop_class_uid`` / ``sop_instance_uid`` (file meta as fallback, ``node.series.sop_class_of``);
    ``study_uid``; ``photometric``: PhotometricInterpretation as given ("" when absent); ``window``: the image's
    (centres, widths) (``slice_window``); ``slice_thickness``: the top-level SliceThickness in mm of a
    single-frame image (None when absent or multi-frame, 0 when empty); ``bits_stored`` (16 when absent) and ``pixel_representation`` (0 when absent);
    ``lossy``: the lossy compression the image has been through (``node.series.lossy``; None: none known), read
    while its pixel data is still there;
    ``seen``: what the job's check took of the header as it was read (``node.series.load_volumes``'s
    ``inspect``; None when not asked), so that the header need not be held, or read again, to check it.
    """

    file: Path | None
    stamp: FileStamp | None
    frame: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    photometric: str
    window: tuple[tuple[float, ...], tuple[float, ...]] | None
    slice_thickness: float | None
    bits_stored: int
    pixel_representation: int
    lossy: LossyCompression | None = None
    seen: Any = field(default=None, compare=False)
    voi_function: str = ""  # ``slice_voi``: VOILUTFunction, a defined term or ""
    voi_lut: Dataset | None = field(default=None, compare=False)  # ``slice_voi``: the VOI LUT item, or None

    @classmethod
    def of(cls, ds: Dataset, frame: int = -1, file: Path | None = None,
           stamp: FileStamp | None = None, seen: Any = None) -> SliceHeader:
        """The record of ``ds`` (frame ``frame``); ``stamp`` only for a single-frame header read from ``file``
        as it is (what can be read again); ``seen``: what the job's check took of the header as it was read
        (``node.series.load_volumes(inspect=...)``)."""
        win = slice_window(ds, frame)
        voi_function, voi_lut = slice_voi(ds, frame)
        thick = float(ds.get("SliceThickness") or 0) if frame < 0 and "SliceThickness" in ds else None
        return cls(
            file=file,
            stamp=stamp if frame < 0 and file is not None else None,
            frame=frame,
            sop_class_uid=sop_class_of(ds),
            sop_instance_uid=sop_instance_of(ds),
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            photometric=str(ds.get("PhotometricInterpretation", "") or ""),
            window=(tuple(win[0]), tuple(win[1])) if win else None,
            slice_thickness=thick,
            bits_stored=int(ds.get("BitsStored", 16) or 16),
            pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
            lossy=lossy_compression(ds),
            seen=seen,
            voi_function=voi_function,
            voi_lut=voi_lut,
        )


def strip_header(ds: Dataset) -> None:
    """Drop what nothing reads once the volumes are built: PixelData, private elements (odd groups: scanner
    headers such as Siemens CSA or GE's, often several KB a slice), overlays (groups 60xx) and the icon image
    (the derived objects copy listed standard attributes only, ``node.derived.modules``)."""
    if "PixelData" in ds:
        del ds.PixelData
    for tag in [t for t in ds.keys() if t.is_private or 0x6000 <= t.group <= 0x601E or t in _UNUSED_AFTER_LOAD]:
        del ds[tag]


def read_again(rec: SliceHeader, fix: Callable[[Dataset], object] | None = None) -> Dataset:
    """Slice ``rec``'s header read again from its file (no pixels), stripped (``strip_header``) and ``fix``
    applied. DeriveError, naming the file, when it is gone, is not the file loaded (``FileStamp``, SOPInstanceUID)
    or cannot be read."""
    path = rec.file
    if path is None or rec.stamp is None:
        raise DeriveError("an input header that was made in memory cannot be read again")
    why = ""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        if FileStamp.of_bytes(data) != rec.stamp:
            why = "was changed since the series was loaded (its bytes differ)"
        else:
            ds = read_dicom(io.BytesIO(data), stop_before_pixels=True)
            ds.filename = str(path)
            if sop_instance_of(ds) != rec.sop_instance_uid:
                why = "holds another instance than when the series was loaded"
    except FileNotFoundError:
        why = "is gone (removed or superseded while the job ran)"
    except (OSError, EOFError, *MALFORMED) as exc:
        why = f"cannot be read again ({dicom_read_problem(exc)})"
    if why:
        raise DeriveError(f"input {path.name} {why}: the derived slices copy their patient, study and acquisition "
                          "attributes from it, so none is written without it")
    strip_header(ds)
    if fix is not None:
        fix(ds)
    return ds


class _Store:
    """The headers of one volume: records, held Datasets (None once released), the fix for headers read again,
    and the last one read again (index, Dataset)."""

    def __init__(self, records: list[SliceHeader], held: list[Dataset | None]) -> None:
        self.records = records
        self.held = held
        self.fix: Callable[[Dataset], object] | None = None
        self.last: tuple[int, Dataset] | None = None

    def dataset(self, i: int) -> Dataset:
        ds = self.held[i]
        if ds is not None:
            return ds
        if self.last is not None and self.last[0] == i:
            return self.last[1]
        ds = read_again(self.records[i], self.fix)
        self.last = (i, ds)
        return ds


class InputHeaders(collections.abc.Sequence[Dataset]):
    """The input headers of a volume in slice order (multi-frame: the same dataset once per frame): item k is
    slice k's full header (held, or read again from its file once released), ``record(k)`` its ``SliceHeader``.
    A slice ``headers[a:b]`` is a view sharing the same headers (a regular run of the volume)."""

    def __init__(self, datasets: Sequence[Dataset | None] = (), frames: Sequence[int] | None = None,
                 records: Sequence[SliceHeader] | None = None) -> None:
        """``datasets`` (held) with their 0-based ``frames`` (-1 single-frame; default all -1) or ready
        ``records`` (one per dataset); ``Path(ds.filename)`` names a file in messages, never read again. With
        ``records``, a None dataset is one not held: read again from its record's file (it must have a stamp)."""
        if records is None:
            fr = list(frames) if frames is not None else [-1] * len(datasets)
            records = [SliceHeader.of(ds, f, _file_of(ds)) for ds, f in zip(datasets, fr, strict=True)
                       if ds is not None]
        if any(ds is None and rec.stamp is None for ds, rec in zip(datasets, records, strict=False)):
            raise ValueError("InputHeaders: a header not held must be one that can be read again")
        if len(records) != len(datasets):
            raise ValueError("InputHeaders: one record per dataset")
        self._store = _Store(list(records), list(datasets))
        self._index: range = range(len(records))

    @classmethod
    def _view(cls, store: _Store, index: range) -> InputHeaders:
        view = cls.__new__(cls)
        view._store, view._index = store, index
        return view

    def __len__(self) -> int:
        return len(self._index)

    @overload
    def __getitem__(self, k: int) -> Dataset: ...

    @overload
    def __getitem__(self, k: slice) -> InputHeaders: ...

    def __getitem__(self, k: int | slice) -> Dataset | InputHeaders:
        if isinstance(k, slice):
            return InputHeaders._view(self._store, self._index[k])
        return self._store.dataset(self._index[k])

    def __iter__(self) -> Iterator[Dataset]:
        return (self._store.dataset(i) for i in self._index)

    def held_dataset(self, k: int) -> Dataset | None:
        """Slice ``k``'s full header if it is held in memory, else None (never reads a file)."""
        return self._store.held[self._index[k]]

    def record(self, k: int) -> SliceHeader:
        """Slice ``k``'s record (never reads a file)."""
        return self._store.records[self._index[k]]

    @property
    def records(self) -> list[SliceHeader]:
        """Every slice's record, slice order."""
        return [self._store.records[i] for i in self._index]

    @property
    def held(self) -> int:
        """How many slices' full headers are held in memory (the rest are read again when asked for)."""
        return sum(1 for i in self._index if self._store.held[i] is not None)

    def release(self, fix: Callable[[Dataset], object] | None = None) -> None:
        """Strip every held header (``strip_header``) and let go of those that can be read again (single-frame,
        read from a file); ``fix`` is applied to each header read again. For every slice of the volume, also
        those outside this view."""
        store = self._store
        store.fix, store.last = fix, None
        stripped: set[int] = set()
        for i, ds in enumerate(store.held):
            if ds is None:
                continue
            if store.records[i].stamp is not None:
                store.held[i] = None
            elif id(ds) not in stripped:  # a multi-frame header is held once per frame
                strip_header(ds)
                stripped.add(id(ds))


def _file_of(ds: Dataset) -> Path | None:
    name = getattr(ds, "filename", None)
    return Path(name) if isinstance(name, str) and name else None
