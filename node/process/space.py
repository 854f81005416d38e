"""Room on the disk for a job's results, and a write of them that fails, in one line.

A job writes its derived series, its Parametric Map and sigma card (and a rejection note) into the spool's outbox
(``outbox/job-<id>``), on the same disk as the received instances and the index. :class:`ResultsRoom` keeps the
spool's watermark ``[node] min_free_mb`` free while they are written (the room the index needs to record the
job's outcome, and ingest its next instances): it refuses a series whose derived pixel data alone would not fit
above the watermark before the engine runs, and every file before it is written when the free space, less that
file's pixel data, would fall below it. :func:`write_error` finds the OSError (ENOSPC, EIO, ...) behind an
exception: pydicom re-raises a write error as a new OSError without its ``errno``, the original as its cause.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from models.engine import Factors, output_shape
from node.errors import SpoolError
from node.process.budget import SeriesFootprint

MB = 1024 * 1024
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class ResultsSpaceError(SpoolError):
    """A job's results cannot be written: the spool disk has no room for them above ``[node] min_free_mb`` (the
    message has the sizes), or a write failed (ENOSPC, EIO, ...: the message names the error and the file)."""


@dataclass(frozen=True)
class ResultsRoom:
    """The watermark kept free on the disk of ``folder`` (the spool's outbox): ``min_free_mb`` MiB."""

    folder: Path
    min_free_mb: int

    def free_bytes(self) -> int:
        """Free bytes on ``folder``'s file system now (statvfs). Raises OSError."""
        return shutil.disk_usage(self.folder).free

    def check(self, need_bytes: int = 0, what: str = "the next result file") -> None:
        """ResultsSpaceError when writing ``need_bytes`` more (``what``, in words) would leave less than
        ``min_free_mb`` MiB free; nothing otherwise. Raises OSError when the free space cannot be read."""
        free = self.free_bytes()
        if free - need_bytes < self.min_free_mb * MB:
            raise ResultsSpaceError(
                f"disk full before writing results: {what} needs about {_size(need_bytes)}, the spool disk has "
                f"{_size(free)} free, node.min_free_mb = {self.min_free_mb}")


def _size(n: int) -> str:
    """``n`` bytes in words: KB below 1 MiB, else MB (both of 1024)."""
    return f"{n / 1024:.0f} KB" if n < MB else f"{n / MB:.1f} MB"


def results_bytes(fp: SeriesFootprint, factors: Factors) -> int:
    """Bytes of the derived series' pixel data alone (output voxels x the input's bytes per sample, at least 2:
    the derived CT/MR objects are 16-bit): a lower bound of what the job writes (headers, the Parametric Map and
    the sigma card come on top). 0 for a series without frames."""
    if fp.frames == 0:
        return 0
    z, y, x = output_shape((fp.frames, fp.rows, fp.columns), factors)
    return z * y * x * max(fp.bytes_per_sample, 2)


def pixel_bytes(ds: Dataset) -> int:
    """Bytes of ``ds``'s pixel data (PixelData, FloatPixelData or DoubleFloatPixelData; 0 without any): what
    writing it needs at least."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        value = ds.get(keyword)
        if isinstance(value, (bytes, bytearray)):
            return len(value)
    return 0


def write_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or along its ``__cause__`` / ``__context__`` chain), preferring one
    with an ``errno``; None when there is none."""
    found: OSError | None = None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and not isinstance(cur, SpoolError):
            if cur.errno is not None:
                return cur
            found = found or cur
        cur = cur.__cause__ or cur.__context__
    return found


def failed_write(exc: OSError, path: Path, what: str, root: Path) -> ResultsSpaceError:
    """The ResultsSpaceError for a write of ``path`` (``what``, in words: "derived slice 17") that failed with
    ``exc``: its error in one line (:func:`describe_write_error`) and ``path`` relative to ``root``."""
    err = write_error(exc) or exc
    where = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    return ResultsSpaceError(f"{describe_write_error(err)} at {what} ({where})")


def describe_write_error(exc: OSError, root: Path | None = None) -> str:
    """One line for a failed write of a job's results: "disk full while writing results: No space left on
    device (ENOSPC) ..." for ENOSPC/EDQUOT, "write error while writing results: ..." for any other errno; the
    file named relative to ``root`` (the spool) when it lies under it."""
    code = exc.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else ""
    text = exc.strerror or (os.strerror(code) if code is not None else str(exc))
    where = ""
    if exc.filename:
        path = Path(os.fsdecode(exc.filename))
        try:
            where = f" ({path.relative_to(root)})" if root is not None else f" ({path.name})"
        except ValueError:
            where = f" ({path.name})"
    head = "disk full while writing results" if code in DISK_FULL else "write error while writing results"
    return f"{head}: {text}{f' ({name})' if name else ''}{where}"
