"""Files in an input folder that are not DICOM and lose nothing when skipped: srnode's own side files, and files
recognisably of another format (text, PNG, PDF, ZIP, NIfTI, ...), e.g. the README, autorun.inf or viewer of a CD
export. ``srnode process`` skips them with a line instead of counting them as failed files.

Decision: a file that cannot be read as DICOM is skipped only when its bytes are *positively* recognised as
something else. Anything else, in particular a file with the 'DICM' marker, an empty file, a file that is cut
inside the 128-byte preamble (zeros) or binary bytes without a known signature, stays a failure naming the file: it
may be a DICOM file cut short, and its data would be lost without a word. (A DICOM data set without the preamble is
not asked about here: ``node.dicom_read.read_dicom`` reads it as DICOM when it is recognisably an image data set.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import filetype  # type: ignore[import-untyped]

# srnode's own side files: ``srnode process`` writes report.json and preview.png beside each series' output, the
# demo preview-job<N>[-k].png into its folder destination
_OWN_REPORT = "report.json"
_OWN_PREVIEW = re.compile(r"preview(-job\d+(-\d+)?)?\.png")

_HEAD = 8192  # bytes read to recognise a file

# imaging formats found beside DICOM that ``filetype`` does not know: (offset, bytes, what)
_IMAGING_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (344, b"n+1\x00", "a NIfTI-1 image"),  # NIfTI-1 header field 'magic' (nifti1.h)
    (344, b"ni1\x00", "a NIfTI-1 header"),
    (4, b"n+2\x00", "a NIfTI-2 image"),  # NIfTI-2 header field 'magic' (nifti2.h)
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file"),  # HDF5 format signature (MINC 2, many research exports)
)


def own_side_file(path: Path) -> str:
    """What srnode side file ``path`` is ("an srnode report", "an srnode preview"), or "" when it is none: the name
    srnode gives it and content of that kind (a JSON object naming a series; a PNG image)."""
    if path.name == _OWN_REPORT:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        return "srnode's report of a series" if isinstance(record, dict) and "series" in record else ""
    if _OWN_PREVIEW.fullmatch(path.name):
        try:
            with path.open("rb") as fh:
                head = fh.read(8)
        except OSError:
            return ""
        return "srnode's preview image" if head == b"\x89PNG\r\n\x1a\n" else ""
    return ""


def other_format(path: Path) -> str:
    """What ``path`` recognisably is when it is not DICOM ("application/pdf (.pdf)", "text", ...), or "" when it may be a
    DICOM file cut short or corrupt (the 'DICM' marker at byte 128, empty, binary without a known signature)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return ""
    if not head or head[128:132] == b"DICM":
        return ""
    kind = filetype.guess(head)  # the file signatures of ~80 common formats (images, documents, archives, programs)
    if kind is not None and kind.extension != "dcm":
        return f"{kind.mime} (.{kind.extension})"
    for offset, magic, what in _IMAGING_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what
    return "text" if _is_text(head) else ""


def _is_text(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) is text: UTF-16 with its byte order mark, or no NUL byte and UTF-8
    (the last character may be cut by the read) with at most 1 % control characters other than tab / CR / LF / FF."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[:exc.start].decode("utf-8")
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\r\n\f")
    return control <= len(text) // 100
