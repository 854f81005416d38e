"""Reading an input DICOM file, with or without its Part 10 wrapper (the 128-byte preamble, 'DICM' and file meta).

Old archives and raw dumps (a data set written as it goes over the network) hold a DICOM data set with no preamble;
pydicom reads those only with ``force=True``, which also "reads" any bytes at all (a text file becomes one element
with a tag made of its letters). ``read_dicom`` reads a file normally and, only when pydicom says the preamble / DICM
is missing, tries once more with ``force`` and keeps the result only when it is recognisably an image data set:

- its first element is a plausible first element of a data set: group 0002 (file meta written without the
  preamble) or group 0008 (the data set's first group), element number below 0x0100, and
- it states a SOPClassUID and a SOPInstanceUID, both well-formed UIDs (digits and dots).

Anything else raises pydicom's error (``InvalidDicomError``: no 'DICM' marker) saying the bytes are no data set
without it either (``node.errors.NOT_A_RAW_DATA_SET``), so a random or text file stays "not a readable DICOM file"
naming it. A data set read this way without file meta gets the transfer syntax its
bytes were parsed with (implicit / explicit VR, little / big endian) so that its pixels decode; an encapsulated
(compressed) pixel data element without file meta cannot name its codec and fails to decode with pydicom's reason.

Every reader of *input* files uses this one function (``srnode process``'s grouping, the series loader, re-reading
a header, the memory budget, the PHI scrub, the preview, and ``srnode check``'s independent reader), so a file is
DICOM or not the same way everywhere.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.errors import NOT_A_RAW_DATA_SET

_UID = re.compile(r"[0-9]+(\.[0-9]+)+")
_FIRST_GROUPS = (0x0002, 0x0008)
_forcing = threading.local()


class _QuietWhileForcing(logging.Filter):
    """Drops pydicom's complaints (and the warnings it raises, logged as ``py.warnings``) made by this thread
    while it reads a file with ``force``: for bytes that are no data set (noise with a plausible first tag) they
    are garbage quoted into the log ("Unknown encoding '<noise>'"), and the file is named as failed anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_forcing, "on", False)


for _name in ("pydicom", "py.warnings"):
    logging.getLogger(_name).addFilter(_QuietWhileForcing())


def _missing_preamble(exc: InvalidDicomError) -> bool:
    text = str(exc)
    return "DICM" in text or "File Meta Information" in text


def _plausible_start(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts like a data set without preamble: (0002,xxxx) or (0008,xxxx)
    with element < 0x0100, little or big endian."""
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, elem = struct.unpack(order + "HH", head[:4])
        if group in _FIRST_GROUPS and elem < 0x0100:
            return True
    return False


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip().rstrip("\x00")
    except Exception:  # noqa: BLE001 - pydicom raises many types on a malformed value
        return ""


def is_raw_image_data_set(ds: Dataset) -> bool:
    """Whether ``ds``, read with ``force``, states the UIDs every image has (SOPClassUID, SOPInstanceUID)."""
    return all(_UID.fullmatch(_uid(ds, kw)) for kw in ("SOPClassUID", "SOPInstanceUID"))


def read_dicom(source: str | Path | BinaryIO, *, stop_before_pixels: bool = False,
               specific_tags: list[Any] | None = None) -> Dataset:
    """``pydicom.dcmread(source)``, or, when the file has no preamble / 'DICM', the data set read with ``force``
    if it is recognisably one (module docstring). Raises pydicom's errors and OSError as ``pydicom.dcmread``."""
    fh: BinaryIO
    own = not hasattr(source, "read")
    fh = open(source, "rb") if own else source  # type: ignore[arg-type, assignment]
    try:
        start = fh.tell()
        try:
            return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, specific_tags=specific_tags)
        except InvalidDicomError as exc:
            if not _missing_preamble(exc):
                raise
            fh.seek(start)
            if not _plausible_start(fh.read(8)):
                raise InvalidDicomError(f"{exc} ({NOT_A_RAW_DATA_SET})") from None
            fh.seek(start)
            _forcing.on = True
            try:
                ds: Dataset = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, force=True)
                accepted = is_raw_image_data_set(ds)
            except Exception:  # noqa: BLE001 - not a data set after all: the original reason stands
                raise InvalidDicomError(f"{exc} ({NOT_A_RAW_DATA_SET})") from None
            finally:
                _forcing.on = False
            if not accepted:
                raise InvalidDicomError(f"{exc} ({NOT_A_RAW_DATA_SET})") from None
            _set_transfer_syntax(ds)
            if specific_tags is not None:
                ds = _only(ds, specific_tags)
            if own:
                ds.filename = str(source)
            return ds
    finally:
        if own:
            fh.close()


def _set_transfer_syntax(ds: Dataset) -> None:
    """A data set read without file meta: the transfer syntax its bytes were parsed with, so its pixels decode."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    if "SOPClassUID" in ds and "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds and "MediaStorageSOPInstanceUID" not in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _only(ds: Dataset, tags: list[Any]) -> Dataset:
    """``ds`` with only ``tags`` (keywords or tags) kept, as ``dcmread(specific_tags=...)`` gives."""
    out = Dataset()
    out.file_meta = ds.file_meta
    for t in tags:
        elem = ds.data_element(t) if isinstance(t, str) else ds[t] if t in ds else None
        if elem is not None:
            out.add(elem)
    return out


def read_dicom_bytes(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    """:func:`read_dicom` of bytes already read."""
    return read_dicom(io.BytesIO(data), stop_before_pixels=stop_before_pixels)


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (sorted by name), told by content (``read_dicom`` of the header),
    not by name: a dcmtk storescp folder holds ``CT.<uid>`` files, an export ``IM0001`` ones. Dot files and
    unreadable files are left out; raises OSError when ``folder`` cannot be listed."""
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            read_dicom(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        out.append(p)
    return out
