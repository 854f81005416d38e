"""Memory a series needs, from its headers only, checked before any pixel is decoded.

A decompression bomb (three RLE frames of 8 MB that declare 16384 x 16384 pixels each) decodes to 1.5 GB and
makes the engine ask for tens of GB: the node is killed by the kernel, restarts, re-runs the same job and is
killed again. :func:`check_series` reads every instance's header (never its pixels) and refuses, with the numbers:

- pixel data that cannot hold what the header declares: native (uncompressed) PixelData shorter than
  Rows x Columns x frames x samples x bits allocated / 8; RLE fragments that cannot decode to a frame's size
  even at RLE's best ratio (2 bytes -> 128); encapsulated pixel data with fewer fragments than frames;
- a series whose estimated working memory exceeds the budget ``[node] max_series_memory_mb`` (0: three quarters
  of the memory limit: physical RAM, or the cgroup limit in a container).

The estimate is the decoded pixels (Rows x Columns x frames x bytes per sample) plus the output voxel count
(``models.engine.output_shape`` of all frames) times the engine's working bytes per output voxel, plus the
engine's fixed cost. Those were measured end to end (``srnode process``
from files: decode, float volume, engine, derived objects; peak RSS growth) on the CPU:
cubic 37-39 B per output voxel (40x256^2 and 80x256^2, factor 2); selfsup 40 B at 512^2x600 (12.8 GB peak,
README engine section) and about 47 B between 24x256^2 and 48x256^2 plus about 0.4 GB fixed. The check uses
the larger of the rule's engine and cubic (the fallback runs after a failure), with a margin.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from models.engine import Factors, output_shape
from node.dicom_read import read_dicom
from node.errors import VolumeError

log = logging.getLogger(__name__)

MB = 1024 * 1024
# engine -> (working bytes per output voxel, fixed bytes), measured (module docstring) and rounded up
ENGINE_COST: dict[str, tuple[int, int]] = {
    "cubic": (40, 0),
    "selfsup": (48, 512 * MB),
}
UNKNOWN_ENGINE_COST = (64, 1024 * MB)  # an engine not measured here (e.g. diffusion): a conservative guess
RLE_MAX_RATIO = 64  # an RLE replicate run: 2 bytes -> at most 128 bytes (PS3.5 G.3.1)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}


class BudgetError(VolumeError):
    """The series would need more memory than ``[node] max_series_memory_mb`` (the message has the numbers)."""


@dataclass(frozen=True)
class InstanceSize:
    """What one instance's header declares about its pixels."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def pixels(self) -> int:
        """Rows x Columns x frames."""
        return self.rows * self.columns * self.frames

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded pixel data (bits allocated rounded as DICOM packs them)."""
        return math.ceil(self.pixels * self.samples * self.bits_allocated / 8)


@dataclass(frozen=True)
class SeriesFootprint:
    """The series' declared size: frames (slices) in all, the largest frame, bytes decoded, bytes per sample."""

    frames: int
    rows: int
    columns: int
    decoded_bytes: int
    bytes_per_sample: int

    def needed_bytes(self, factors: Factors, engine: str) -> tuple[int, int, int, int]:
        """(bytes needed, output voxels, bytes per output voxel, fixed bytes) to process with ``engine`` (and
        its cubic fallback): the decoded pixels (Rows x Columns x frames x bytes per sample), plus the output
        voxels times the engine's working bytes per voxel, plus its fixed cost."""
        z, y, x = output_shape((max(self.frames, 1), self.rows, self.columns), factors)
        per, fixed = ENGINE_COST.get(engine, UNKNOWN_ENGINE_COST)
        per, fixed = max(per, ENGINE_COST["cubic"][0]), max(fixed, ENGINE_COST["cubic"][1])
        voxels = z * y * x
        return self.decoded_bytes + voxels * per + fixed, voxels, per, fixed


def memory_limit_bytes() -> int:
    """The memory this process may use: physical RAM, or less when a cgroup (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) limits it."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def series_budget_mb(configured_mb: int) -> tuple[int, str]:
    """(budget in MiB, how it was set): ``configured_mb``, or for 0 three quarters of :func:`memory_limit_bytes`."""
    if configured_mb > 0:
        return configured_mb, "node.max_series_memory_mb"
    limit = memory_limit_bytes()
    return int(limit * 3 / 4) // MB, f"node.max_series_memory_mb = 0: 3/4 of the {limit / MB / 1024:.1f} GiB memory limit"


def instance_size(path: Path) -> InstanceSize | None:
    """The declared pixel size of the file at ``path``, its pixel data checked against what the file holds
    (module docstring); None for an instance without pixel data or Rows/Columns. VolumeError naming the
    instance and the numbers when the pixel data cannot hold what is declared; OSError when unreadable."""
    with path.open("rb") as fh:
        try:
            ds = read_dicom(fh, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a broken file
            raise VolumeError(f"instance {path.name}: header cannot be read: {exc}") from exc
        try:
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            bits = int(ds.get("BitsAllocated", 16) or 16)
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"instance {path.name}: image size attributes cannot be read: {exc}") from exc
        if rows <= 0 or cols <= 0:
            return None
        if frames < 1 or samples < 1 or bits < 1:
            raise VolumeError(f"instance {path.name}: NumberOfFrames {frames}, SamplesPerPixel {samples}, "
                              f"BitsAllocated {bits} must be >= 1")
        size = InstanceSize(rows, cols, frames, samples, bits)
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        if ts == DeflatedExplicitVRLittleEndian:
            return size  # the pixel data is inside the deflated stream: not cheap to check
        little = ds.original_encoding[1] is not False
        implicit = ds.original_encoding[0] is not False
        element = _pixel_element(fh, little, implicit)
    if element is None:
        return size
    length, fragments = element
    what = f"instance {path.name} ({rows}x{cols}, {frames} frame(s), {samples} sample(s) of {bits} bits"
    if fragments is None:  # native
        if length < size.decoded_bytes:
            raise VolumeError(f"{what}): PixelData has {length} bytes, the header declares {size.decoded_bytes}")
        return size
    frame_fragments = fragments[1:]  # the first item is the Basic Offset Table
    if len(frame_fragments) < frames:
        raise VolumeError(f"{what}): encapsulated PixelData has {len(frame_fragments)} fragment(s) for {frames} "
                          "frame(s)")
    if ts == RLELossless:
        present = sum(max(0, n - 64) for n in frame_fragments)  # each frame: a 64-byte RLE header, then segments
        if present * RLE_MAX_RATIO < size.decoded_bytes:
            raise VolumeError(f"{what}): {present} bytes of RLE segments cannot decode to the declared "
                              f"{size.decoded_bytes} bytes (at most {RLE_MAX_RATIO}x)")
    return size


def footprint(paths: Sequence[Path]) -> SeriesFootprint:
    """The declared size of the series in ``paths`` (see :func:`instance_size`; VolumeError as there)."""
    frames = rows = cols = decoded = bps = 0
    for p in paths:
        size = instance_size(Path(p))
        if size is None:
            continue
        frames += size.frames
        rows, cols = max(rows, size.rows), max(cols, size.columns)
        decoded += size.decoded_bytes
        bps = max(bps, math.ceil(size.samples * size.bits_allocated / 8))
    return SeriesFootprint(frames, rows, cols, decoded, bps)


def check_series(paths: Sequence[Path], factors: Factors, engine: str, configured_mb: int) -> SeriesFootprint:
    """Refuse a series before decoding it: VolumeError when an instance's pixel data cannot hold what it declares,
    BudgetError when processing it with ``engine`` at ``factors`` would need more than the budget
    (``configured_mb``: ``[node] max_series_memory_mb``, 0 = auto, :func:`series_budget_mb`). Returns the
    footprint."""
    fp = footprint(paths)
    if fp.frames == 0:
        return fp
    budget_mb, how = series_budget_mb(configured_mb)
    need, voxels, per, fixed = fp.needed_bytes(factors, engine)
    if need > budget_mb * MB:
        raise BudgetError(
            f"series needs about {need / MB:.0f} MB of memory, over the budget of {budget_mb} MB ({how}): "
            f"{fp.frames} frame(s) of up to {fp.rows}x{fp.columns}, {fp.bytes_per_sample} byte(s)/sample = "
            f"{fp.decoded_bytes / MB:.0f} MB decoded, + x{factors.through_plane} through-plane x{factors.in_plane} "
            f"in-plane = {voxels / 1e6:.0f} M output voxels x {per} B (engine {engine}) + {fixed // MB} MB fixed; "
            "not decoded")
    log.debug("series footprint %s: about %d MB of %d MB", fp, need // MB, budget_mb)
    return fp


def _pixel_element(fh: BinaryIO, little: bool, implicit: bool) -> tuple[int, list[int] | None] | None:
    """At the element after the header: (value length, fragment lengths or None for native) of the pixel data
    element; None when the next element is none of the pixel data tags or the file ends. Lengths past the end
    of the file are admission's business (checked on arrival)."""
    end = "<" if little else ">"
    head = fh.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        return None
    if implicit:
        (length,) = struct.unpack(end + "L", head[4:8])
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        more = fh.read(4)
        if len(more) < 4:
            return None
        (length,) = struct.unpack(end + "L", more)
    else:
        (length,) = struct.unpack(end + "H", head[6:8])
    if length != _UNDEFINED:
        return length, None
    fragments: list[int] = []
    total = 0
    while True:  # items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD); always little endian
        item = fh.read(8)
        if len(item) < 8:
            break
        ig, ie, ilen = struct.unpack("<HHL", item)
        if (ig, ie) != (0xFFFE, 0xE000):
            break
        fragments.append(ilen)
        total += ilen
        fh.seek(ilen, 1)
    return total, fragments
