"""Files in an input folder that are not DICOM and lose nothing when skipped: srnode's own side files, and files
recognisably of another format (text, PNG, PDF, ZIP, NIfTI, ...), e.g. the README, autorun.inf or viewer of a CD
export. ``srnode process`` skips them with a line instead of counting them as failed files.

Decision: a file that cannot be read as DICOM is skipped only when its bytes are *positively* recognised as
something else. Anything else, in particular a file with the 'DICM' marker, an empty file, a file that is cut
inside the 128-byte preamble (zeros) or a DICOM data set without the preamble (binary, not text), stays a failure
naming the file: it may be a DICOM file cut short, and its data would be lost without a word.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# srnode's own side files: ``srnode process`` writes report.json and preview.png beside each series' output, the
# demo preview-job<N>[-k].png into its folder destination
_OWN_REPORT = "report.json"
_OWN_PREVIEW = re.compile(r"preview(-job\d+(-\d+)?)?\.png")

_HEAD = 8192  # bytes read to recognise a file

_MAGIC: tuple[tuple[int, bytes, str], ...] = (  # (offset, bytes, what): formats found beside images
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF87a", "a GIF image"),
    (0, b"GIF89a", "a GIF image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (0, b"%PDF-", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive (or Office document)"),
    (0, b"PK\x05\x06", "an empty ZIP archive"),
    (0, b"\x1f\x8b", "a gzip file"),
    (0, b"BZh", "a bzip2 file"),
    (0, b"\xfd7zXZ\x00", "an xz file"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Office (OLE) document"),
    (0, b"MZ", "a Windows program or library"),
    (0, b"\x7fELF", "an ELF program or library"),
    (0, b"SQLite format 3\x00", "an SQLite database"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (344, b"n+1\x00", "a NIfTI-1 image"),
    (344, b"ni1\x00", "a NIfTI-1 header"),
    (4, b"n+2\x00", "a NIfTI-2 image"),
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
    """What ``path`` recognisably is when it is not DICOM ("a PDF document", "text", ...), or "" when it may be a
    DICOM file cut short or corrupt (the 'DICM' marker at byte 128, empty, binary without a known signature)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return ""
    if not head or head[128:132] == b"DICM":
        return ""
    for offset, magic, what in _MAGIC:
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
