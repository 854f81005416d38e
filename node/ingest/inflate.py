"""The deflate-bomb guard of admission's header check: a Deflated data set is inflated in chunks to a scratch copy.

What it guards against: a Part 10 file on the Deflated Explicit VR Little Endian transfer syntax (PS3.5 A.5) is a
few bytes of file meta followed by a raw deflate stream, and pydicom's ``dcmread`` inflates such a stream whole in
memory before it reads a single element. A stream of zeros deflates ~1000:1, so a small C-STORE or STOW-RS part
could make the node hold gigabytes (a 1 MB stream: +2 GB and 10 s in the header check; a 307 KB STOW-RS part:
+600 MB). Admission (``node.ingest.admit.header_dataset``) therefore never lets pydicom see a deflated data set:

- :func:`is_deflated` reads the file meta group (0002,xxxx) itself, as pydicom reads it -- explicit VR, or implicit
  VR when the first element's VR bytes are not two capitals (a meta written in implicit VR hid its syntax from an
  explicit-only read) -- and, where that read finds no TransferSyntaxUID, asks pydicom which one it will act on (a
  UID padded past 128 bytes was missed); a file meta ending past ``MAX_META_BYTES`` is refused before pydicom reads
  it at all;
- :func:`inflated_copy` writes a copy of the file whose data set is inflated in chunks and whose meta says Explicit
  VR Little Endian, which the header check then reads as any other file; the copy is removed when the ``with``
  block ends.

Limits (units): the file meta may end at most ``MAX_META_BYTES`` (1 MiB) into the file; the deflate stream is read
and inflated ``INFLATE_CHUNK`` (1 MiB) at a time, so memory stays ~2 MiB whatever the ratio; the inflated data set
may reach ``limit`` bytes (``[node] max_instance_mb`` << 20) and no more (0xC211); the copy lives on disk (the
``scratch`` folder, default the file's own), and the spool's ``[node] min_free_mb`` watermark is asked after every
chunk (0xA700 once it is crossed). Not guarded here: what the inflated data set holds (admission's header check reads
it with the same bounds as any other file) and a deflated N-EVENT-REPORT (``node.ingest.scp`` does not offer the
Deflated transfer syntax on its Storage Commitment context).
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.dimse import Status
from node.errors import IngestError, dicom_read_problem

__all__ = ["LONG_VRS", "MAX_META_BYTES", "inflated_copy", "is_deflated"]

LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR")  # explicit VRs: 4-byte lengths
MAX_META_BYTES = 1 << 20  # a file meta group (0002,xxxx) ending past this is refused unread (~200 bytes in practice)
INFLATE_CHUNK = 1 << 20  # bytes read, and at most bytes inflated, at a time from a deflated data set


def is_deflated(fh: BinaryIO, path: Path, size: int) -> bool:
    """Whether the data set of the Part 10 file ``path`` (``size`` bytes, open as ``fh``) is on the Deflated
    transfer syntax, as pydicom would act on it; False for a file without 'DICM' after a preamble. IngestError
    (0xC210) when its file meta ends past the file or past ``MAX_META_BYTES`` (pydicom reads the file meta's values
    whatever their size). Leaves ``fh`` anywhere."""
    meta_end, syntax = _meta_end(fh)
    if meta_end > min(size, MAX_META_BYTES):  # pydicom reads the file meta's values whatever their size
        raise IngestError(f"file cannot be parsed: its file meta ends at byte {meta_end} (the file has {size}; "
                          f"a file meta over {MAX_META_BYTES} bytes is not read)", Status.CANNOT_UNDERSTAND)
    # the syntax pydicom will act on (it strips a UID's padding, whatever its length): a Deflated one missed
    # here was inflated whole by dcmread (a TransferSyntaxUID padded past 128 bytes: +600 MB for 300 KB)
    # (asked of pydicom only when the read above found none: a second parse of every instance's meta is not
    # needed for a syntax read whole)
    return syntax == DeflatedExplicitVRLittleEndian or (
        not syntax and bool(meta_end) and _pydicom_syntax(path) == DeflatedExplicitVRLittleEndian)


@contextmanager
def inflated_copy(path: Path, limit: int, scratch: Path | None = None,
                  has_space: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A Part 10 copy of the deflated file at ``path`` (see :func:`is_deflated`), for the ``with`` block only: its
    data set inflated and its meta saying Explicit VR Little Endian (the syntax a deflated data set inflates to,
    PS3.5 A.5), so that the header check reads it as any other file. Written in ``scratch`` (default: the file's
    folder) in chunks, never whole in memory; removed when the block ends, and when it fails. ``limit``: the most
    bytes the inflated data set may hold; ``has_space``: the spool's ``[node] min_free_mb`` watermark, asked after
    every chunk (None: not asked).

    IngestError(0xA700) once the inflated data set passes ``limit`` bytes, (0xC210) when its file meta cannot be
    read or the stream is not deflate, (0xA700) when the copy cannot be written, or once ``has_space()`` is False:
    the check's own copy must not take the reserve the watermark keeps for the index, the jobs and their results."""
    copy = _inflate(path, limit, scratch, has_space)
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _meta_end(fh: BinaryIO) -> tuple[int, str]:
    """(offset where the file meta group (0002,xxxx) of the Part 10 file ``fh`` ends, its TransferSyntaxUID or
    "") read from after its 128-byte preamble and 'DICM' (explicit VR little endian, PS3.10 7.1), without pydicom:
    where a deflated data set starts, and whether it is one; its end may lie past the end of a file whose meta
    declares lengths it does not hold. (0, "") when the file has no 'DICM' after a preamble. Leaves ``fh``
    anywhere."""
    fh.seek(128)
    if fh.read(4) != b"DICM":
        return 0, ""
    syntax, implicit = "", None
    while True:
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            return fh.tell() - len(head), syntax
        if implicit is None:  # as pydicom decides (filereader._is_implicit_vr): from the first element's "VR"
            # bytes, not two capitals: a file meta written in implicit VR, which pydicom reads (and then inflates a
            # Deflated data set whole), was read here as explicit and its transfer syntax missed
            implicit = not all(0x40 < c < 0x5B for c in head[4:6])
        if implicit:
            length = struct.unpack("<L", head[4:8])[0]
        elif head[4:6] in LONG_VRS:
            more = fh.read(4)
            length = struct.unpack("<L", more)[0] if len(more) == 4 else 0
        else:
            length = struct.unpack("<H", head[6:8])[0]
        if head[2:4] == b"\x10\x00" and length <= 128:  # (0002,0010) Transfer Syntax UID
            syntax = fh.read(length).rstrip(b"\0 ").decode("ascii", "replace")
        else:
            fh.seek(length, 1)


def _pydicom_syntax(path: Path) -> str:
    """The TransferSyntaxUID pydicom reads in the file meta of ``path`` ("" when it cannot read one); call only once
    the file meta is known to be small (``MAX_META_BYTES``)."""
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "")
    except Exception:  # noqa: BLE001 - pydicom raises many types on a broken file; dcmread will say what
        return ""


def _inflate(path: Path, limit: int, scratch: Path | None = None,
             has_space: Callable[[], bool] | None = None) -> Path:
    """The copy :func:`inflated_copy` hands out, written; the caller removes it. Raises as :func:`inflated_copy`,
    leaving no copy behind."""
    try:
        meta = read_file_meta_info(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
        raise IngestError(f"file cannot be parsed: {type(exc).__name__}: {dicom_read_problem(exc)}",
                          Status.CANNOT_UNDERSTAND) from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    try:
        write_file_meta_info(head, meta, enforce_standard=False)
    except Exception as exc:  # noqa: BLE001 - e.g. TypeError on the values of a file meta written in implicit VR
        raise IngestError(f"file cannot be parsed: its file meta cannot be read as explicit VR little endian "
                          f"(PS3.10 7.1; {type(exc).__name__})", Status.CANNOT_UNDERSTAND) from exc
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    folder = scratch or path.parent
    fd, name = tempfile.mkstemp(prefix="inflated-", suffix=".dcm", dir=folder)
    copy, done = Path(name), False
    try:
        with path.open("rb") as src, open(fd, "wb") as out:
            out.write(b"\0" * 128 + b"DICM" + head.getvalue())
            src.seek(_meta_end(src)[0])
            total, pending = 0, b""
            while not inflater.eof:
                if not pending:
                    pending = src.read(INFLATE_CHUNK)
                    if not pending:
                        break
                part = inflater.decompress(pending, INFLATE_CHUNK)  # at most a chunk out, whatever the ratio
                pending = inflater.unconsumed_tail
                total += len(part)
                if total > limit:
                    raise IngestError(f"a deflated data set inflating to more than {limit} bytes is over "
                                      f"node.max_instance_mb = {limit >> 20}: refused before its header is read "
                                      "whole", Status.TOO_LARGE)
                out.write(part)
                if has_space is not None and not has_space():
                    raise IngestError(f"its deflated data set cannot be inflated in {folder} to check its header: "
                                      f"the spool disk fell below node.min_free_mb after {total} bytes",
                                      Status.OUT_OF_RESOURCES)
            out.write(inflater.flush())
        done = True
        return copy
    except zlib.error as exc:
        raise IngestError(f"file cannot be parsed: its deflated data set is not a deflate stream ({exc})",
                          Status.CANNOT_UNDERSTAND) from exc
    except OSError as exc:  # the spool's disk (ENOSPC): out of resources, as any write there
        raise IngestError(f"its deflated data set cannot be inflated in {folder}: {exc}",
                          Status.OUT_OF_RESOURCES) from exc
    finally:
        if not done:
            copy.unlink(missing_ok=True)
