"""Series → volume: stack the slices of one series, decode pixels, measure geometry, convert to modality units.

Headers are read into placed slices by ``node.series.slices`` (including the functional groups of enhanced multi-frame
objects); this module checks that they form one stack, sorts and measures it, and decodes the pixels (each image's
encoding checked and converted to modality values by ``node.series.pixels``).

Geometry comes only from ImagePositionPatient / ImageOrientationPatient (or, for enhanced multi-frame objects,
from the Plane Position / Plane Orientation / Pixel Measures functional groups); intensities only from Rescale
Slope / Intercept, BitsStored and PixelPaddingValue. Every refusal is a ``VolumeError`` whose message names the
series and says why, in words a PACS administrator understands.

Irregular stacks (decision): a stack whose steps between slice centres are not one constant is *not* forced onto a
regular grid. ``load_series`` still returns the volume (with ``steps`` and ``irregular`` set) because in-plane
work is per slice; ``regular_runs`` splits it where the step changes into regular runs (the tilted GE head:
14 slices at 4.0 mm and 14 at 7.0 mm, joined by one 1.08 mm step), and the pipeline super-resolves each run of
2 or more slices through-plane as its own derived series; a slice in no run is named in the job report (file and
reason). Nothing is resampled across a step change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.errors import VolumeError, dicom_read_problem
from node.series.dimensions import DIMENSIONS, IMAGE_KIND, STACK
from node.series.headers import FileStamp, InputHeaders, SliceHeader, read_stamped
from node.series.instances import UniqueInstances
from node.series.levels import level_jumps
from node.series.mosaic import is_mosaic, split_mosaic, tile_name
from node.series.pixels import decoded_pixels, modality_values, stored_format
from node.series.planes import (
    SPACING_REL_TOL,
    describe_plane_groups,
    mean_orientation,
    plane_groups,
    slice_gap,
    slice_step,
)
from node.series.realworld import one_mapping
from node.series.slices import (
    HEADER_VALUES,
    MALFORMED,
    Slice,
    frame_group_item,
    header_value,
    is_image_sop_class,
    slices_of,
    sop_class_of,
    unit_orientation,
)
from node.series.split import position_groups, split_volumes
from node.series.steps import (
    describe_steps,
    fitted_positions,
    grid_segments,
    in_plane_slack,
    off_line,
    off_line_message,
    on_grid,
    position_rounding,
    rounding_slack,
    same_step,
    thickness_groups,
    thickness_message,
)
from node.series.volume import SeriesVolume, StoredFormat, in_hounsfield_units

log = logging.getLogger(__name__)

def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Assemble the files of one single-volume series into a ``SeriesVolume``; VolumeError says why it cannot be
    one (including when the files hold several volumes: ``load_volumes`` splits those)."""
    vols = load_volumes(paths)
    if len(vols) > 1:
        raise VolumeError(f"series {vols[0].series_uid}: holds {len(vols)} volumes "
                          f"({', '.join(v.volume_label for v in vols)}), not one stack of slices")
    return vols[0]


def load_volumes(paths: Sequence[Path], inspect: Callable[[Dataset], object] | None = None) -> list[SeriesVolume]:
    """The volumes of the files of one series (one, or one per time point / echo / image type / b-value /
    stack: ``node.series.split``), each a ``SeriesVolume`` with ``volume`` = (index, count) and ``volume_label``
    set when there are several. Duplicate instances are kept once; Siemens mosaics are split into their slices.

    Each volume's ``data`` is (Z, Y, X) float32 in modality units (HU for CT), every slice converted with its own
    rescale, slices sorted along the normal of ImageOrientationPatient (PS3.3 C.7.6.2.1.1); ``spacing`` (dz, dy,
    dx) mm, dz the median step between slice centres. Padding voxels (PixelPaddingValue, PS3.3 C.7.5.1.1.2)
    become -1000 HU for CT, else the lowest value present; an irregular stack is returned with ``irregular`` set.
    Raises VolumeError (the reason, naming files) when they cannot be volumes.

    Streaming (issue #15 item 5): each file is read once (its stamp and pydicom's parse from the same bytes) and a
    single-frame image's header is let go of as soon as it is read, its modality values and what the load reads
    of it later taken first (``Slice.take``); the checks and refusals are those of reading every header first, in
    the same order (a refusal found while reading is raised after the files an earlier step would refuse were
    read; a value that could not be read is raised when it is asked for). Frames of multi-frame objects and
    mosaic tiles keep their header (``node.series.headers``). ``inspect(header)`` is called on each header let
    go of, after the load took its values, its result kept in the slice's record (``SliceHeader.seen``): the
    job's checks of every input header (``node.derived.check_inputs``) without holding or reading it again."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise VolumeError("no files given")
    try:
        return _load_volumes(paths, inspect)
    except MALFORMED as exc:
        raise VolumeError(f"series of {len(paths)} file(s) starting {sorted(paths)[0].name}: a header value "
                          f"cannot be read ({type(exc).__name__}: {exc})") from exc


def _load_volumes(paths: list[Path], inspect: Callable[[Dataset], object] | None) -> list[SeriesVolume]:
    slices, notes = _read_slices(paths, inspect)
    series_uid = str(header_value(slices[0], "SeriesInstanceUID"))
    _check_one_series(slices, series_uid)
    slices, aside = _set_aside(slices, series_uid)
    set_aside = [(s.where, _record(s).sop_instance_uid, why) for s, why in aside]
    try:
        groups = split_volumes(slices, f"series {series_uid}")
    except VolumeError:
        _check_one_stack(slices, f"series {series_uid}")  # mixed matrices / orientations explain it better
        raise
    vols = []
    for k, g in enumerate(groups):
        name = f"series {series_uid}" + (f" volume {k + 1}/{len(groups)} ({g.label})" if len(groups) > 1 else "")
        _check_one_stack(g.slices, name)
        _check_one_unit(g.slices, name)
        _check_rescale_stated(g.slices, name)
        real_world = one_mapping([header_value(s, "real_world") for s in g.slices], [s.where for s in g.slices],
                                 name)
        vol = _stack(g.slices, series_uid, name, notes + g.notes)
        vol.real_world = real_world
        vol.set_aside = set_aside
        if len(groups) > 1:
            vol.volume, vol.volume_label = (k + 1, len(groups)), g.label
        vols.append(vol)
    _note_missing_positions(vols, series_uid)
    return vols


def _note_missing_positions(vols: list[SeriesVolume], series_uid: str) -> None:
    """A note (and a WARNING) on each volume of a series of several (time points, echoes, ...) that lacks slice
    positions at least half of the other volumes hold (within a quarter of the smallest step, at least 0.05 mm).
    field19: the shared Philips fMRI with time point 2's first slice missing gave "time 2" derived from 8 slices
    beside 9 for times 1 and 3, exit 0, nothing said: a slice missing at an end of a stack leaves no gap for the
    irregular-step note. review19: asked of EVERY other volume, the same position missing from two of the three
    time points was said of neither (8, 8 and 9 slices, nothing said); at least half of the others say it, while
    a position only a few volumes hold (a first time point acquired over a longer range than the 49 after it)
    makes no note on the many. Volumes on grids offset from each other (echoes half a step apart) share no
    positions: no note when a volume would lack more than half of them. Positions only, never a header value."""
    if len(vols) < 2:
        return
    steps = [v.spacing[0] for v in vols if v.positions.shape[0] > 1 and v.spacing[0] > 0]
    tol = max(0.05, 0.25 * min(steps)) if steps else 0.05

    def holds(v: SeriesVolume, p: np.ndarray) -> bool:
        return bool(np.any(np.linalg.norm(v.positions - p, axis=1) <= tol))

    kept: list[np.ndarray] = []  # every position of the series once (within tol)
    for v in vols:
        for p in v.positions:
            if not kept or not np.any(np.linalg.norm(np.asarray(kept) - p, axis=1) <= tol):
                kept.append(p)
    holders = [{id(v) for v in vols if holds(v, p)} for p in kept]
    for v in vols:
        others = [w for w in vols if w is not v]
        # a position is wanted of v when at least half of the other volumes hold it
        wanted = [k for k, h in enumerate(holders) if 2 * len(h - {id(v)}) >= len(others)]
        missing = [k for k in wanted if id(v) not in holders[k]]
        if not missing or 2 * len(missing) > len(wanted):  # volumes on grids offset from each other: no shared grid
            continue
        dist = [float(kept[k] @ v.normal) for k in missing]
        own = v.positions @ v.normal
        ends = sum(1 for d in dist if d < float(own.min()) or d > float(own.max()))
        where = ("at an end of its stack" if ends == len(missing) else
                 "inside its stack" if ends == 0 else f"{ends} at an end of its stack, {len(missing) - ends} inside it")
        named = [w for w in others if any(id(w) in holders[k] for k in missing)]
        labels = ", ".join(w.volume_label or f"volume {w.volume[0] if w.volume else '?'}" for w in named[:3]) + \
            (", ..." if len(named) > 3 else "")
        every = all(len(holders[k]) == len(vols) - 1 for k in missing)
        note = (f"{v.volume_label or 'this volume'}: lacks {len(missing)} slice position(s) that "
                f"{'every other volume of the series holds' if every else 'at least half of the other volumes of the series hold'} "
                f"({labels}), {where}: its derived series covers less than theirs (an image "
                "not received, or not in the folder given; or a volume acquired over a shorter range)")
        log.warning("series %s: %s", series_uid, note)
        v.notes.append(note)


def _stack(slices: list[Slice], series_uid: str, name: str, notes_in: list[str]) -> SeriesVolume:
    """One volume from slices of one plane family without repeated positions: sorted, measured, decoded; each
    slice's header with its record (``node.series.headers``: the file and stamp it can be read again from).

    The volume's orientation is ``mean_orientation`` of its slices' (the first one's when all are equal): slices of
    one plane family may differ by jitter within ``node.series.planes``' tolerance."""
    iop = mean_orientation([s.iop for s in slices])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    nn = float(np.linalg.norm(normal))
    if nn < 1e-6:
        raise VolumeError(f"{name}: ImageOrientationPatient {list(iop)} has parallel row and column directions")
    normal = normal / nn
    slices.sort(key=lambda s: float(np.dot(s.ipp, normal)))
    positions = np.stack([s.ipp for s in slices])
    dist = positions @ normal
    steps = np.diff(dist)
    repeats = [g for g in position_groups(slices) if len(g) > 1]
    if repeats:
        files = ", ".join(slices[i].where for i in repeats[0][:4]) + (", ..." if len(repeats[0]) > 4 else "")
        raise VolumeError(f"{name}: {sum(len(g) for g in repeats)} images share a slice position with another "
                          f"({files}); they are repeats, time points or echoes, not a stack of slices")

    first = slices[0]
    modality = str(header_value(first, "Modality"))
    stated = sorted({str(header_value(s, "RescaleType")) for s in slices} - {""})  # one at most (_check_one_unit)
    unit = stated[0] if stated else ""
    data, formats, notes = _modality_values(slices, in_hounsfield_units(modality, unit))
    vrange = (min(f.value_range[0] for f in formats), max(f.value_range[1] for f in formats))
    notes = notes_in + notes
    names = [s.name + (f", frame {s.frame + 1}" if s.frame >= 0 else "") for s in slices]
    for jump in level_jumps(data, names):  # derived as stored, but said (node.series.levels)
        log.warning("%s: %s", name, jump)
        notes.append(jump)

    dy, dx = slices[0].spacing
    irregular = False
    tilt = 0.0
    rounding = position_rounding(positions)
    if len(slices) > 1:
        med = float(np.median(steps))
        slack = rounding_slack(rounding, normal, med)  # > 0: positions written rounded (node.series.steps)
        irregular = not all(same_step(float(st), med) for st in steps)
        fitted = bool(slack) and on_grid(dist, slack)
        if fitted:  # else (real jitter beyond the rounding) judged and kept as measured
            irregular = False
            _check_stack_line(slices, positions, dist, row, col, name, in_plane_slack(rounding, row, col))
            positions, dist, steps, med = _fitted(positions, normal, rounding, slack, notes)
        line = positions[-1] - positions[0]
        cosang = abs(float(np.dot(line, normal))) / max(float(np.linalg.norm(line)), 1e-9)
        tilt = math.degrees(math.acos(min(1.0, cosang)))
        if tilt > 0.5:
            notes.append(f"gantry tilt / sheared stack: slice line is {tilt:.1f} deg from the slice normal")
        if irregular:
            notes.append("irregular slice steps: " + describe_steps(steps, grid_segments(dist, slack)
                                                                    if slack else None))
        else:  # an irregular stack is split into runs, which check their own lines (node.series.runs)
            if not fitted:  # a fitted stack was checked above, with the rounding's allowance
                _check_stack_line(slices, positions, dist, row, col, name)
            _check_one_thickness(slices, name)
    else:
        med = float(slices[0].thickness or 1.0)
    vol = SeriesVolume(
        data=data,
        spacing=(med if med > 0 else 1.0, dy, dx),
        slice_thickness=_stated_thickness(slices, notes),
        modality=modality,
        positions=positions,
        row_cosine=row,
        col_cosine=col,
        normal=normal,
        datasets=InputHeaders([s.ds for s in slices], records=[_record(s) for s in slices]),
        series_uid=series_uid,
        sop_class_uid=str(header_value(first, "sop_class")),
        frame_numbers=[s.frame + 1 for s in slices] if slices[0].frame >= 0 else [],
        rescale_slope=slices[0].slope,
        rescale_intercept=slices[0].intercept,
        value_range=vrange,
        rescale_type=unit,
        formats=formats,
        names=names,
        steps=steps,
        irregular=irregular,
        tilt_deg=tilt,
        notes=notes,
        position_rounding=rounding,
    )
    log.info("%s%s", vol.describe(), ("; " + "; ".join(notes)) if notes else "")
    return vol


def _fitted(positions: np.ndarray, normal: np.ndarray, rounding: float, slack: float,
            notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(positions, distances along the normal, steps, step) of a regular stack whose positions are written rounded
    to ``rounding`` mm: on the straight line fitted through them (``steps.fitted_positions``), so that the step and
    every derived position come from the stack, not from one slice's rounding; a note says so when it moved one."""
    fit = fitted_positions(positions)
    moved = float(np.max(np.linalg.norm(fit - positions, axis=1)))
    dist = fit @ normal
    steps = np.diff(dist)
    step = float(np.mean(steps))
    if moved > 1e-6:
        notes.append(f"ImagePositionPatient written to {rounding:g} mm: slice positions taken from the regular "
                     f"stack fitted through them (step {step:.4f} mm; rounding moved a position up to {moved:.3f} mm, "
                     f"{slack:.3f} mm allowed along the normal)")
    return fit, dist, steps, step


def _check_stack_line(slices: list[Slice], positions: np.ndarray, dist: np.ndarray, row: np.ndarray,
                      col: np.ndarray, name: str, slack: float = 0.0) -> None:
    """Refuse a regular stack whose slices do not lie on one straight (or sheared) line within half a pixel
    (``steps.off_line``; plus ``slack`` mm for positions written rounded): a slice (or part of the stack) moved
    in-plane off that line is an image of another place, and interpolating through it would blend anatomy from
    two places."""
    tol = 0.5 * min(slices[0].spacing) + slack
    worst, where = off_line(positions, row, col)
    if worst > tol:
        s = slices[where]
        which = s.name + (f", frame {s.frame + 1}" if s.frame >= 0 else "")
        raise VolumeError(off_line_message(name, where, len(slices), which, worst, tol))


def _stated_thickness(slices: list[Slice], notes: list[str]) -> float:
    """The stack's SliceThickness (mm; 0 when no slice states one): the first slice's, or, when it states none
    (absent or empty) and the slices that state one agree (``steps.thickness_groups``), theirs, with a note (it
    was taken from the first slice alone: the derived series said nothing of its thickness and the engine had no
    slice profile). Slices stating different ones (an irregular stack's runs): the first's, 0 when it has none
    (each run takes its own: ``node.series.runs``)."""
    if slices[0].thickness > 0:
        return float(slices[0].thickness)
    groups = thickness_groups([(float(s.thickness or 0.0), s.where) for s in slices])
    if len(groups) != 1:
        return 0.0
    value = next(iter(groups))
    absent = [s.where for s in slices if not s.thickness or s.thickness <= 0]
    notes.append(f"SliceThickness absent on {len(absent)} image(s) ({', '.join(absent[:4])}"
                 f"{', ...' if len(absent) > 4 else ''}): {value:g} mm, as the other {len(slices) - len(absent)} "
                 "state")
    return float(value)


def _check_one_thickness(slices: list[Slice], name: str) -> None:
    """Refuse a regular stack whose slices state different SliceThickness values (absent ones aside): two
    reconstructions or acquisitions under one SeriesInstanceUID, interleaved; one slice profile cannot describe
    them and every derived slice would be labelled with one of them. (An irregular stack's runs may differ: the
    tilted GE head's 4 and 7 mm.)"""
    groups = thickness_groups([(float(s.thickness or 0.0),
                                s.name + (f", frame {s.frame + 1}" if s.frame >= 0 else "")) for s in slices])
    if len(groups) > 1:
        raise VolumeError(thickness_message(name, groups))


def _record(s: Slice) -> SliceHeader:
    """Slice ``s``'s record: taken when its header was let go of (with the file's stamp), else made from the held
    header (a frame of a multi-frame object or a mosaic tile: no stamp, never read again)."""
    return s.value("record", _held_record)  # type: ignore[no-any-return]


def _held_record(s: Slice) -> SliceHeader:
    ds = s.header
    file = s.file or (Path(ds.filename) if isinstance(getattr(ds, "filename", None), str) else None)
    return SliceHeader.of(ds, s.frame, file)


def _read(path: Path) -> tuple[Dataset, FileStamp]:
    """The whole file and its stamp, read once; VolumeError names the file when it cannot be read or is not
    DICOM."""
    try:
        return read_stamped(path)
    except (OSError, EOFError, *MALFORMED) as exc:
        raise VolumeError(f"{path.name}: not a readable DICOM file ({dicom_read_problem(exc)})") from exc


def _format_of(s: Slice) -> StoredFormat:
    return stored_format(s.header, s.slope, s.intercept)


# what the load reads of a slice's header after it was read: taken before a single-frame header is let go of
_TAKEN: tuple[tuple[str, Callable[[Slice], Any]], ...] = (
    *HEADER_VALUES.items(),
    *(d.reader for d in (*DIMENSIONS, IMAGE_KIND, STACK)),
    ("format", _format_of),
)


def _image_slices(path: Path, ds: Dataset) -> tuple[list[Slice], bool]:
    """The slices of one kept file (one per frame of a multi-frame object, one per tile of a Siemens mosaic) and
    whether it is a mosaic; VolumeError for a non-image object, an image without pixel data or a header value that
    cannot be read."""
    try:
        uid = sop_class_of(ds)
        if not is_image_sop_class(uid):
            raise VolumeError(f"{path.name}: SOP class {uid or '(none)'} is not an image "
                              "(report, presentation state, RT or other non-image object)")
        if "PixelData" not in ds:
            floats = [kw for kw in ("FloatPixelData", "DoubleFloatPixelData") if kw in ds]
            raise VolumeError(f"{path.name}: " + (f"holds {floats[0]} (floating-point pixels: a parametric map or "
                                                  "other computed image, not a CT or MR acquisition); not "
                                                  "super-resolved" if floats else "has no pixel data"))
        if is_mosaic(ds):
            tiles = split_mosaic(ds, path.name)
            out: list[Slice] = []
            for k, t in enumerate(tiles):
                out.extend(slices_of(t, tile_name(path.name, k, len(tiles))))
            return out, True
        made = slices_of(ds, path.name)
    except MALFORMED as exc:
        raise VolumeError(f"{path.name}: a header value cannot be read ({type(exc).__name__}: {exc})") from exc
    for s in made:
        s.file = path
    return made, False


def _let_go(s: Slice, ds: Dataset, path: Path, stamp: FileStamp,
            inspect: Callable[[Dataset], object] | None) -> None:
    """Take from the single-frame header ``ds`` (read from ``path`` as ``stamp``) what the load reads later: its
    header values, its modality values (``modality_values``, float32, NaN for padding; or the error converting them
    raised, raised again when the volume is built), its record (``inspect``'s result in it, taken last: it may
    change the header), and let go of the header."""
    s.take(_TAKEN)
    try:
        s.values = modality_values(ds, s, decoded_pixels(ds, s.name)).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - raised again, as it was, where the volume's values are made
        s.values = exc

    def record(_s: Slice) -> SliceHeader:
        rec = SliceHeader.of(ds, -1, path, stamp)  # before ``inspect``, which may change the header
        return dataclasses.replace(rec, seen=inspect(ds)) if inspect is not None else rec

    s.take((("record", record),))
    s.ds = None


def _read_slices(paths: list[Path], inspect: Callable[[Dataset], object] | None) -> tuple[list[Slice], list[str]]:
    """Every image of the files (one per frame of a multi-frame object, one per tile of a Siemens mosaic), each
    instance once (``node.series.instances``), refusing non-image objects; and notes on what was done.

    The files are read one at a time and each single-frame image's header is let go of once read (``_let_go``).
    The refusals are those of reading every file first, then keeping one copy of each instance, then making the
    images, then checking each image's geometry and rescale, the first of the earliest step: an unreadable file
    refuses at once; a refusal of a later step waits, while the files after it are read for an earlier one."""
    unique = UniqueInstances(lambda p: _read(p)[0])
    slices: list[Slice] = []
    mosaics = 0
    renormed = 0  # images whose ImageOrientationPatient vectors were not of unit length
    failed: tuple[int, VolumeError] | None = None  # (step, refusal): the first refusal of the earliest step
    # shortest name first, so "IM0010 (1).dcm" is named as the copy of "IM0010.dcm"
    for p in sorted(paths, key=lambda p: (len(p.name), str(p))):
        ds, stamp = _read(p)  # step 1
        step = 2
        try:
            if failed and failed[0] <= step or not unique.add(p, ds):
                continue
            step = 3
            if failed and failed[0] <= step:
                continue
            made, mosaic = _image_slices(p, ds)
            mosaics += mosaic
            step = 4
            if failed and failed[0] <= step:
                continue
            for s in made:
                renormed += _check_slice(s)
        except VolumeError as exc:
            failed = (step, exc)
            continue
        for s in made:
            if s.frame < 0 and not mosaic:
                _let_go(s, ds, p, stamp, inspect)
        slices.extend(made)
        del ds
    if failed:
        raise failed[1]
    notes = unique.notes
    if mosaics:
        notes.append(f"{mosaics} Siemens mosaic image(s) split into their slices (CSA header)")
    if renormed:
        notes.append(f"ImageOrientationPatient of {renormed} image(s) written with vectors not of unit length: "
                     "taken as the unit vectors of their directions")
    return slices, notes


def _check_slice(s: Slice) -> bool:
    """VolumeError when one image's geometry or rescale cannot place or convert it (PS3.3 C.7.6.2 Image Plane:
    ImageOrientationPatient is two orthogonal unit vectors; C.11.1 Modality LUT: a slope of 0 maps every stored
    value to one, a Modality LUT Sequence is not applied). Two orthogonal directions of another norm are made unit
    vectors in ``s.iop``; returns whether they were written with a norm off 1 beyond rounding."""
    if not all(math.isfinite(v) and v > 0 for v in s.spacing):
        raise VolumeError(f"{s.where}: PixelSpacing {list(s.spacing)} is not two positive numbers")
    if not all(math.isfinite(float(v)) for v in s.ipp):
        raise VolumeError(f"{s.where}: ImagePositionPatient {[float(v) for v in s.ipp]} is not three finite numbers")
    # two orthogonal directions written with another norm (a vendor's 0.9999, or 2.0): the directions are what
    # they say; taken as unit vectors, so that every measure and the derived ImageOrientationPatient is (the
    # 0.9999 was copied into the derived series, which dciodvfy rejects)
    s.iop, renormed = unit_orientation(s.iop, s.where)
    if _modality_lut(s):
        # PS3.3 C.11.1: a Modality LUT Sequence maps stored values through a table instead of a rescale; read as
        # stored values (slope 1, intercept 0) the derived image was up to the table's range off (30510 for a
        # table of 16 x stored), valid to every check. Applying the table is not done (yet): refused.
        raise VolumeError(f"{s.where}: has a Modality LUT Sequence (0028,3000): its stored values become modality "
                          "values through a lookup table, which srnode does not apply (only RescaleSlope / "
                          "RescaleIntercept); not super-resolved")
    if not math.isfinite(s.slope) or s.slope == 0 or not math.isfinite(s.intercept):
        why = ("a slope of 0 maps every pixel to one value" if s.slope == 0 else "not finite numbers")
        raise VolumeError(f"{s.where}: RescaleSlope {s.slope:g} / RescaleIntercept {s.intercept:g} cannot convert "
                          f"stored values to modality values ({why})")
    return renormed


def _named_groups(groups: list[list[Slice]], most: int = 5) -> str:
    """The images of each group (one per value of an attribute), the largest group first: "6 image(s) (CT0001.dcm,
    CT0002.dcm, ...); 2 image(s) (CT0004.dcm, CT0007.dcm)" -- which images differ, never the values."""
    out = []
    for g in sorted(groups, key=lambda g: (-len(g), min(s.where for s in g))):
        names = sorted(s.where for s in g)
        out.append(f"{len(g)} image(s) ({', '.join(names[:most])}{', ...' if len(names) > most else ''})")
    return "; ".join(out)


def _modality_lut(s: Slice) -> bool:
    """Whether the image states a Modality LUT Sequence with an item: at its top level, or (a frame of an enhanced
    object) in the frame's Pixel Value Transformation functional group."""
    ds = s.header
    items = [ds]
    if s.frame >= 0:
        pvt = frame_group_item(ds, "PixelValueTransformationSequence", s.frame)
        items += [pvt] if pvt is not None else []
    return any(len(it.get("ModalityLUTSequence") or []) > 0 for it in items)


# what a refusal of a series whose images disagree on one of these asks of the user (a series has one of each)
_WHAT_TO_DO = {
    "FrameOfReferenceUID": (
        " (positions in two frames of reference are not comparable even where they look continuous: the patient "
        "may have moved, or the table been set again, between them). If these images are one acquisition whose "
        "FrameOfReferenceUID a de-identifier, archive or converter rewrote image by image, restore the original "
        "value and send the series again; otherwise send the images of each frame of reference as a series of "
        "their own"),
}


def _check_one_series(slices: list[Slice], series_uid: str) -> None:
    """VolumeError unless the slices belong to one series, one frame of reference, one modality and one grey-scale
    polarity, and are not all localizer images (the reasons count values, never quote them; localizers beside
    other images are set aside by ``_set_aside``)."""
    uids = {str(header_value(s, "SeriesInstanceUID")) for s in slices}
    if len(uids) > 1:
        raise VolumeError(f"files belong to {len(uids)} different series ({', '.join(sorted(uids))}); "
                          "send one series at a time")
    for keyword, what in (("FrameOfReferenceUID", "frames of reference (their positions are not in one "
                                                   "coordinate system)"),
                          ("Modality", "modalities"),
                          ("PhotometricInterpretation", "photometric interpretations (MONOCHROME1 slices would "
                                                        "display inverted beside MONOCHROME2 ones)")):
        by_value: dict[str, list[Slice]] = {}
        for s in slices:
            by_value.setdefault(str(header_value(s, keyword)).strip(), []).append(s)
        if len(by_value) > 1:
            raise VolumeError(f"series {series_uid}: its images have {len(by_value)} different {keyword} values: "
                              f"{len(by_value)} {what}; by value: {_named_groups(list(by_value.values()))}; "
                              f"they cannot be stacked into one volume{_WHAT_TO_DO.get(keyword, '')}")
    if all(header_value(s, "localizer") for s in slices):
        raise VolumeError(f"series {series_uid}: is a localizer (scout) series; not super-resolved")


def _set_aside(slices: list[Slice], series_uid: str) -> tuple[list[Slice], list[tuple[Slice, str]]]:
    """The slices that form the series' volumes, and the images set aside, each with why (``SeriesVolume.
    set_aside``: named in the report by file, never by a header value).

    A scanner or a PACS export often files a scout into the axial series: localizer images (ImageType LOCALIZER)
    beside others are set aside (a series of localizers only is refused by ``_check_one_series``). So is a single
    stray plane: once they are gone, an image alone in its matrix / pixel spacing / orientation while at least
    twice as many images share one (a slice re-acquired at another matrix, a stray oblique image without
    LOCALIZER in its ImageType). Groups of two or more images, or strays as many as half the stack, stay a
    refusal (``_check_one_stack``): which of them is the series cannot be told."""
    aside: list[tuple[Slice, str]] = []
    kept = [s for s in slices if not header_value(s, "localizer")]
    if len(kept) < len(slices):
        aside += [(s, "a localizer (scout) image (ImageType LOCALIZER) filed in the series: not stacked with its "
                      "slices") for s in slices if header_value(s, "localizer")]
    groups = plane_groups(kept)
    if len(groups) > 1:
        main = max(groups, key=len)
        strays = [g[0] for g in groups if g is not main]
        if all(len(g) == 1 for g in groups if g is not main) and len(main) >= 2 * len(strays):
            ref = main[0]
            step = slice_step(main)
            for s in strays:
                why = []
                if (header_value(s, "Rows"), header_value(s, "Columns")) != \
                        (header_value(ref, "Rows"), header_value(ref, "Columns")):
                    why.append(f"matrix {header_value(s, 'Rows')}x{header_value(s, 'Columns')} (the others "
                               f"{header_value(ref, 'Rows')}x{header_value(ref, 'Columns')})")
                if any(abs(x - y) > SPACING_REL_TOL * max(abs(x), abs(y)) for x, y in zip(s.spacing, ref.spacing,
                                                                                          strict=True)):
                    why.append(f"pixel spacing {s.spacing[0]:.6g}/{s.spacing[1]:.6g} mm (the others "
                               f"{ref.spacing[0]:.6g}/{ref.spacing[1]:.6g})")
                gap = slice_gap(ref, s, step)
                if not gap.same:
                    why.append(f"orientation {gap.angle_deg:.3g} deg from the others' (moving its pixels by up to "
                               f"{gap.in_plane_px:.2g} px in-plane, {gap.through_mm:.2g} mm through-plane)")
                aside.append((s, f"a stray plane: its {', '.join(why)} differs from the {len(main)} other images "
                                 "of the series; not stacked with them"))
            gone = {id(s) for s in strays}
            kept = [s for s in kept if id(s) not in gone]
    if aside:
        log.warning("series %s: %d image(s) set aside, in no derived series: %s", series_uid, len(aside),
                    "; ".join(f"{s.where} ({why})" for s, why in aside))
    return kept, aside


# RescaleType defined terms (PS3.3 C.11.1.1.2 and C.8.2.1.1.11 for CT: HU, and the enhanced objects' terms)
RESCALE_TYPES = frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"})


def _check_one_unit(slices: list[Slice], name: str) -> None:
    """VolumeError when the slices of one volume state different RescaleType values (absent ones aside): their
    modality values are in different units (HU beside US, say), and one volume of them would mix the two."""
    counts: dict[str, int] = {}
    for s in slices:
        unit = str(header_value(s, "RescaleType"))
        if unit:
            counts[unit] = counts.get(unit, 0) + 1
    if len(counts) > 1:
        # only the standard's defined terms are quoted (a value is a header string, never echoed as it is)
        said = ", ".join(f"{u if u in RESCALE_TYPES else 'another value'} x{n}" for u, n in sorted(counts.items()))
        raise VolumeError(f"{name}: its images state {len(counts)} different RescaleType values ({said}): their "
                          "values are in different units and cannot be stacked into one volume")


def _check_rescale_stated(slices: list[Slice], name: str) -> None:
    """VolumeError when RescaleSlope or RescaleIntercept is stated on some images of one volume and absent (or
    empty) on others: the absent one would be taken as 1 / 0 (PS3.3 C.11.1 has no default for an image that
    states a rescale beside images that do not), so those images' values would differ by the other images'
    intercept (a CT with RescaleIntercept -1024 on all but two slices: those two 1024 HU off, written without a
    word). The images without it are named (file, and frame of a multi-frame object), never a header value.

    Absent on every image of a CT or PET volume (``_rescale_required``: Type 1 in their IODs; an enhanced object's
    frames without a Pixel Value Transformation group or a top-level rescale): refused too, the values would be
    the stored ones taken as HU (a CT stored 0..4095 for -1024..3071 derived 1024 HU off, exit 0, and the derived
    object, stating slope 1 / intercept 0, valid to dciodvfy). An MR states none: its stored values are its
    values."""
    for i, keyword in enumerate(("RescaleSlope", "RescaleIntercept")):
        absent = [s for s in slices if not s.stated[i]]
        if len(absent) == len(slices) and _rescale_required(slices[0]):
            which = ", ".join(s.where for s in absent[:3]) + (", ..." if len(absent) > 3 else "")
            raise VolumeError(f"{name}: {keyword} is absent on all {len(slices)} of its images ({which}), "
                              f"which a {_rescale_required(slices[0])} image must state (Type 1 in its IOD): its "
                              "stored values cannot be read as modality values (a default of slope 1 / intercept 0 "
                              "would be a guess); not super-resolved")
        if absent and len(absent) < len(slices):
            which = ", ".join(s.where for s in absent[:6]) + (", ..." if len(absent) > 6 else "")
            raise VolumeError(f"{name}: {keyword} is stated on {len(slices) - len(absent)} of its {len(slices)} "
                              f"images and absent on {len(absent)} ({which}): their values cannot be converted "
                              "alike (a default would put them off the others by the stated rescale); "
                              "not super-resolved")


# SOP classes whose IOD makes RescaleSlope / RescaleIntercept Type 1 (PS3.3 C.8.2.1 CT Image, C.8.9.4 PET Image;
# the enhanced and legacy converted enhanced CT / PET objects in their Pixel Value Transformation functional group,
# C.7.6.16.2.9b / C.8.15.3.10 / C.8.22.5), and what each is called in a refusal
_RESCALE_REQUIRED = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.128": "PET",  # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.130": "PET",  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1": "PET",  # Legacy Converted Enhanced PET Image Storage
}


def _rescale_required(s: Slice) -> str:
    """"CT" / "PET" when the image's values are CT or PET values that only a stated rescale gives: its SOP class's
    IOD requires RescaleSlope and RescaleIntercept (``_RESCALE_REQUIRED``), or its Modality is CT or PT (a
    Secondary Capture saying CT would be derived as a CT Image object stating Hounsfield units); "" otherwise (MR:
    no rescale is the identity, PS3.3 C.8.3.1 has none)."""
    by_class = _RESCALE_REQUIRED.get(str(header_value(s, "sop_class")))
    if by_class:
        return by_class
    return {"CT": "CT", "PT": "PET"}.get(str(header_value(s, "Modality")).strip().upper(), "")


def _check_one_stack(slices: list[Slice], name: str) -> None:
    """VolumeError unless the slices share one matrix, pixel spacing and orientation (within tolerance)."""
    groups = plane_groups(slices)
    if len(groups) > 1:
        raise VolumeError(f"{name}: slices differ in matrix, orientation or pixel spacing "
                          f"({describe_plane_groups(groups)}); they do not form one volume")


def _modality_values(slices: list[Slice], hounsfield: bool) -> tuple[np.ndarray, list[StoredFormat], list[str]]:
    """(Z, Y, X) float32 modality values of the sorted slices, each slice's stored format, and remarks.

    Every slice is converted with its own RescaleSlope / Intercept (Philips MR and some CT store one per slice);
    padding voxels (PixelPaddingValue) become air for values in HU (``hounsfield``: a CT stating no other
    RescaleType), else the lowest value of the series. A slice whose
    header was let go of was converted as it was read (``_let_go``): its values are copied in and dropped. A held
    single-frame header's (a mosaic tile's) PixelData is dropped once its slice is converted (a multi-frame
    object's stays: several volumes may share it; the job releases it after all are built).
    """
    first = slices[0]
    formats: list[StoredFormat] = [s.value("format", _format_of) for s in slices]
    data = np.empty((len(slices), int(header_value(first, "Rows")), int(header_value(first, "Columns"))),
                    dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    notes: list[str] = []
    for z, s in enumerate(slices):
        if s.ds is None:  # converted when it was read (``_let_go``): its values, or why they could not be made
            if isinstance(s.values, BaseException):
                raise s.values
            data[z] = s.values
            s.values = None
            continue
        key = id(s.ds)
        if key not in decoded:
            decoded[key] = decoded_pixels(s.ds, s.name)
        data[z] = modality_values(s.ds, s, decoded[key])
        if s.frame < 0:  # a single-frame header is this slice's alone: its stored and decoded pixels are done with
            del decoded[key]  # (a long series held every slice's twice until the volume was built; issue #15 item 5)
            if "PixelData" in s.ds:
                del s.ds.PixelData  # pydicom drops its decoded copy with it
    _check_precision(data, slices)
    if np.isnan(data).any():
        lowest = min(f.value_range[0] for f in formats)
        fill = -1000.0 if hounsfield else float(np.nanmin(data)) if np.isfinite(data).any() else 0.0
        fill = max(fill, lowest)
        notes.append(f"PixelPaddingValue voxels ({int(np.isnan(data).sum())}) set to {fill:g}")
        np.nan_to_num(data, copy=False, nan=fill)
    if len({(f.slope, f.intercept) for f in formats}) > 1:
        notes.append("rescale slope/intercept vary between slices (converted per slice)")
    if len({(f.bits_stored, f.signed) for f in formats}) > 1:
        notes.append("BitsStored / PixelRepresentation vary between slices (converted per slice)")
    return data, formats, notes


def _check_precision(data: np.ndarray, slices: list[Slice]) -> None:
    """VolumeError when the (Z, Y, X) float32 volume ``data`` (NaN: padding) cannot hold a slice's stored steps:
    one step of a slice is |RescaleSlope| modality units, and it must stay at least one float32 step (2^-23
    relative) both at the volume's largest magnitude (values stored as they are) and across its whole value range
    (the engines normalise the volume by that range). A huge RescaleIntercept (values near 1e9 whose detail is a
    few units) or slopes that differ by orders of magnitude between slices (a slope-1 slice beside a slope-1e11
    one) otherwise round the detail away silently: the derived image would be wrong yet valid. The range is taken
    by reductions, not a copy of the finite values (a long series' volume again; issue #15 item 5)."""
    lo, hi = float(np.fmin.reduce(data, axis=None)), float(np.fmax.reduce(data, axis=None))  # NaN skipped
    if not (math.isfinite(lo) and math.isfinite(hi)):  # padding only, or (never after check_range) infinities
        finite = data[np.isfinite(data)]
        if not finite.size:
            return
        lo, hi = float(finite.min()), float(finite.max())
    needed = max(float(np.spacing(np.float32(max(abs(lo), abs(hi))))), (hi - lo) * 2.0 ** -23)
    for s in slices:
        if abs(s.slope) < needed:
            raise VolumeError(f"{s.where}: RescaleSlope {s.slope:g} / RescaleIntercept {s.intercept:g}: its steps of "
                              f"{abs(s.slope):g} cannot be held in 32-bit floats beside the series' values from "
                              f"{lo:g} to {hi:g} (they would round away); the series is not super-resolved")
