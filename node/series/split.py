"""Several volumes in one series: fMRI time points, echoes, magnitude + phase, diffusion b-values and directions,
stacks and dimension indices of enhanced multi-frame objects. Each becomes a volume of its own.

Decision: a series is split only where its images repeat a slice position (two images at one position cannot be
one stack), or where an enhanced object names several stacks (StackID). The split uses the standard dimensions,
read per image (classic attributes, or the frame's functional groups for enhanced objects):

=================  ===========================================================================================
image type         ImageType (classic); FrameType + ComplexImageComponent (enhanced): M vs P, ...
echo               EchoNumbers, EchoTime / EffectiveEchoTime
diffusion          DiffusionBValue + DiffusionGradientOrientation (classic, MR Diffusion Sequence, or the
                   Siemens MR header (0019,100C)/(0019,100E))
temporal position  TemporalPositionIdentifier (classic), TemporalPositionIndex (enhanced Frame Content)
trigger time       TriggerTime (classic), NominalCardiacTriggerDelayTime (enhanced Cardiac Synchronization)
acquisition        AcquisitionNumber
dimension index    enhanced DimensionIndexValues, less the in-stack position / position / stack indices
=================  ===========================================================================================

Of the dimensions that vary, the smallest set (1, then 2, then 3 dimensions) whose value combinations leave no
two images at one position wins; among sets of one size, the one giving the fewest volumes (then the order of
the table). So a dimension that changes with every slice (an AcquisitionNumber per slice) never fragments a
stack while a coarser one explains the repeats. Numbers are compared with a tolerance, never by rounding.
When nothing explains the repeats the series is truly ambiguous and is refused, naming the files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.errors import VolumeError
from node.series.mosaic import SIEMENS_MR_HEADER
from node.series.slices import Slice

# images whose centres lie within this distance (mm) along the slice normal share one slice position
SAME_POSITION_MM = 0.01
# numeric dimension values within this (absolute, in the attribute's unit) count as one value
VALUE_TOL = 1e-3


@dataclass
class VolumeGroup:
    """The images of one volume of a series, and how a reader tells it from its siblings."""

    slices: list[Slice]
    label: str = ""  # "echo 2", "time 3", "b=1000 dir 2", "type P", ...; "" when the series is one volume
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- attribute access


def _item(ds: Dataset, seq: str, frame: int) -> Dataset | None:
    """Functional group ``seq``'s item for ``frame`` (per-frame first, then shared), or None."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is not None and len(g) > idx and seq in g[idx] and len(g[idx][seq].value) > 0:
            return g[idx][seq].value[0]  # type: ignore[no-any-return]
    return None


def _frame_value(s: Slice, seq: str, keyword: str) -> Any:
    """``keyword`` inside functional group ``seq`` of the slice's frame (enhanced objects only), else None."""
    if s.frame < 0:
        return None
    item = _item(s.ds, seq, s.frame)
    return item.get(keyword) if item is not None else None


def _present(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, (list, tuple)) and len(value) == 0)


def _first(value: Any) -> Any:
    """The first value of a multi-valued attribute (a single value as it is)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    seq = list(value)
    return seq[0] if seq else None


def _num(value: Any) -> float | None:
    try:
        v = float(_first(value))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _nums(value: Any) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if out and all(np.isfinite(out)) else None


def _siemens(ds: Dataset, offset: int) -> Any:
    try:
        return ds.private_block(0x0019, SIEMENS_MR_HEADER)[offset].value
    except (KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- dimensions


def _image_type(s: Slice) -> Hashable:
    if s.frame >= 0:
        for seq in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
            ft = _frame_value(s, seq, "FrameType")
            if _present(ft):
                comp = _frame_value(s, seq, "ComplexImageComponent")
                return tuple(str(v).upper() for v in ft) + ((str(comp).upper(),) if _present(comp) else ())
    it = s.ds.get("ImageType")
    return tuple(str(v).upper() for v in it) if _present(it) else None


def _echo(s: Slice) -> Hashable:
    number = s.ds.get("EchoNumbers")
    te = _frame_value(s, "MREchoSequence", "EffectiveEchoTime") if s.frame >= 0 else None
    if not _present(te):
        te = s.ds.get("EchoTime")
    n = _num(number) if _present(number) else None
    t = _num(te) if _present(te) else None
    return None if n is None and t is None else (n, t)


def _diffusion(s: Slice) -> Hashable:
    b: Any = None
    g: Any = None
    if s.frame >= 0:
        b = _frame_value(s, "MRDiffusionSequence", "DiffusionBValue")
        item = _item(s.ds, "MRDiffusionSequence", s.frame)
        seq = item.get("DiffusionGradientDirectionSequence") if item is not None else None
        if seq:
            g = seq[0].get("DiffusionGradientOrientation")
    if not _present(b):
        b = s.ds.get("DiffusionBValue")
        g = s.ds.get("DiffusionGradientOrientation")
        if not _present(b) and s.ds.get("MRDiffusionSequence"):
            item = s.ds.MRDiffusionSequence[0]
            b = item.get("DiffusionBValue")
            seq = item.get("DiffusionGradientDirectionSequence")
            g = seq[0].get("DiffusionGradientOrientation") if seq else None
    if not _present(b):
        b, g = _siemens(s.ds, 0x0C), _siemens(s.ds, 0x0E)
    bv = _num(b) if _present(b) else None
    if bv is None:
        return None
    gv = _nums(g) if _present(g) else None
    return (bv, gv)


def _temporal(s: Slice) -> Hashable:
    v = _frame_value(s, "FrameContentSequence", "TemporalPositionIndex") if s.frame >= 0 else None
    if not _present(v):
        v = s.ds.get("TemporalPositionIdentifier")
    return _num(v) if _present(v) else None


def _trigger(s: Slice) -> Hashable:
    v = _frame_value(s, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime") if s.frame >= 0 else None
    if not _present(v):
        v = s.ds.get("TriggerTime")
    return _num(v) if _present(v) else None


def _acquisition(s: Slice) -> Hashable:
    v = s.ds.get("AcquisitionNumber")
    return _num(v) if _present(v) else None


_POSITION_POINTERS = {Tag("InStackPositionNumber"), Tag("ImagePositionPatient"), Tag("StackID")}


def _dimension_index(s: Slice) -> Hashable:
    values = _frame_value(s, "FrameContentSequence", "DimensionIndexValues")
    dims = s.ds.get("DimensionIndexSequence")
    if not _present(values) or not dims:
        return None
    values = [values] if isinstance(values, int) else list(values)
    keep = [int(v) for d, v in zip(dims, values, strict=False)
            if Tag(d.get("DimensionIndexPointer", 0)) not in _POSITION_POINTERS]
    return tuple(keep) if keep else None


def _stack(s: Slice) -> Hashable:
    v = _frame_value(s, "FrameContentSequence", "StackID")
    return str(v) if _present(v) else None


@dataclass(frozen=True)
class Dimension:
    """One way images of a series can differ, its value per image and a reader's label per value."""

    name: str
    key: Callable[[Slice], Hashable]
    label: Callable[[Any, list[Any]], str]  # (this volume's value, every volume's value) -> "echo 2"


def _rank(value: Any, values: list[Any]) -> int:
    uniq = sorted({v for v in values if v is not None}, key=_order)
    return uniq.index(value) + 1 if value in uniq else 0


def _type_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "type none"
    others = [v for v in values if v is not None and v != value]
    differing = [c for i, c in enumerate(value) if any(i >= len(o) or o[i] != c for o in others)]
    return "type " + "/".join(differing or value)


def _echo_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "echo ?"
    n, te = value
    numbers = {v[0] for v in values if v is not None}
    if n is not None and len(numbers) == len({v for v in values if v is not None}):
        return f"echo {n:g}"
    return f"echo {_rank(value, values)}" + (f" TE {te:g}" if te is not None else "")


def _diffusion_label(value: Any, values: list[Any]) -> str:
    if value is None:
        return "b=?"
    b, g = value
    same_b = [v for v in values if v is not None and v[0] == b]
    if len({v[1] for v in same_b}) > 1:
        return f"b={b:g} dir {_rank(value, same_b)}"
    return f"b={b:g}"


def _simple(prefix: str, unit: str = "") -> Callable[[Any, list[Any]], str]:
    def label(value: Any, values: list[Any]) -> str:
        if value is None:
            return f"{prefix} ?"
        return f"{prefix} {value:g}{unit}" if isinstance(value, float) else f"{prefix} {value}"
    return label


def _index_label(value: Any, values: list[Any]) -> str:
    return "index " + ("?" if value is None else ".".join(str(v) for v in value))


# in order of preference when two explain the repeats equally well
DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("image type", _image_type, _type_label),
    Dimension("echo", _echo, _echo_label),
    Dimension("diffusion b-value/direction", _diffusion, _diffusion_label),
    Dimension("temporal position", _temporal, _simple("time")),
    Dimension("trigger time", _trigger, _simple("trigger", " ms")),
    Dimension("acquisition number", _acquisition, _simple("acquisition")),
    Dimension("dimension index", _dimension_index, _index_label),
)
STACK = Dimension("stack", _stack, _simple("stack"))


# ---------------------------------------------------------------------------------------------- values


def _order(v: Any) -> tuple[Any, ...]:
    """Sort key of a dimension value (None last; numbers by value, the rest by text)."""
    if v is None:
        return (2,)
    if isinstance(v, (int, float)):
        return (0, float(v))
    if isinstance(v, tuple):
        return (1, tuple(_order(x) for x in v))
    return (1, ((1, str(v)),))


def _close(a: Any, b: Any) -> bool:
    """Equal, numbers within VALUE_TOL (tuples element by element)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= VALUE_TOL
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def canonical(values: Sequence[Any]) -> list[Any]:
    """``values`` with each replaced by the first earlier value it is close to (numbers within VALUE_TOL)."""
    reps: list[Any] = []
    out = []
    for v in values:
        for r in reps:
            if _close(r, v):
                out.append(r)
                break
        else:
            reps.append(v)
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- positions


def position_groups(slices: Sequence[Slice]) -> list[list[int]]:
    """Indices of ``slices`` grouped by slice position (centres within SAME_POSITION_MM along the first slice's
    normal), sorted along the normal; a group of more than one is a repeat."""
    if not slices:
        return []
    iop = slices[0].iop
    normal = np.cross(iop[:3], iop[3:])
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    dist = np.array([float(np.dot(s.ipp, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and dist[i] - dist[groups[-1][0]] <= SAME_POSITION_MM:
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def has_repeats(slices: Sequence[Slice]) -> bool:
    return any(len(g) > 1 for g in position_groups(slices))


# ---------------------------------------------------------------------------------------------- splitting


def _partition(slices: list[Slice], keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], list[Slice]]:
    parts: dict[tuple[Any, ...], list[Slice]] = {}
    for s, k in zip(slices, keys, strict=True):
        parts.setdefault(k, []).append(s)
    return parts


def split_volumes(slices: list[Slice], series: str) -> list[VolumeGroup]:
    """The volumes of one series' images (each free of repeated positions), in order of their dimension values.

    ``series``: how messages name the series. One group with an empty label when the series is one volume.
    Raises VolumeError, naming the files, when images repeat a position and no dimension tells them apart.
    """
    stacks = canonical([STACK.key(s) for s in slices])
    if len(set(stacks)) > 1:
        out: list[VolumeGroup] = []
        parts = _partition(slices, [(v,) for v in stacks])
        for (v,), part in sorted(parts.items(), key=lambda kv: _order(kv[0][0])):
            label = STACK.label(v, [k for (k,) in parts])
            for g in _split(part, f"{series} {label}"):
                out.append(VolumeGroup(g.slices, " ".join(x for x in (label, g.label) if x), g.notes))
        return out
    return _split(slices, series)


def _split(slices: list[Slice], series: str) -> list[VolumeGroup]:
    if not has_repeats(slices):
        return [VolumeGroup(slices)]
    columns = {d.name: canonical([d.key(s) for s in slices]) for d in DIMENSIONS}
    varying = [d for d in DIMENSIONS if len(set(columns[d.name])) > 1]
    for size in range(1, min(3, len(varying)) + 1):
        best: tuple[int, int, tuple[Dimension, ...], dict[tuple[Any, ...], list[Slice]]] | None = None
        for rank, combo in enumerate(itertools.combinations(varying, size)):
            keys = list(zip(*(columns[d.name] for d in combo), strict=True))
            parts = _partition(slices, keys)
            if any(has_repeats(p) for p in parts.values()):
                continue
            if best is None or len(parts) < best[0]:
                best = (len(parts), rank, combo, parts)
        if best is not None:
            return _groups(best[2], best[3])
    raise _ambiguous(slices, series, varying)


def _groups(combo: tuple[Dimension, ...], parts: dict[tuple[Any, ...], list[Slice]]) -> list[VolumeGroup]:
    keys = sorted(parts, key=lambda k: tuple(_order(v) for v in k))
    out = []
    for k in keys:
        label = " ".join(d.label(v, [kk[i] for kk in keys]) for i, (d, v) in enumerate(zip(combo, k, strict=True)))
        note = f"volume {label}: split by {', '.join(d.name for d in combo)}"
        out.append(VolumeGroup(parts[k], label, [note]))
    return out


def _ambiguous(slices: list[Slice], series: str, varying: list[Dimension]) -> VolumeError:
    groups = [g for g in position_groups(slices) if len(g) > 1]
    repeated = sum(len(g) for g in groups)
    worst = max(groups, key=len)
    files = list(dict.fromkeys(slices[i].name.split(" (mosaic image")[0] for g in groups for i in g))
    named = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    same = _identical_pixels([slices[i] for i in worst])
    what = ("copies of one image (identical pixels) under different SOPInstanceUIDs" if same
            else "repeats that no dimension tells apart")
    checked = ", ".join(d.name for d in DIMENSIONS)
    vary = (f"; of these only {', '.join(d.name for d in varying)} vary, and not in a way that separates them"
            if varying else "")
    return VolumeError(f"{series}: {repeated} of its {len(slices)} images share a slice position with another "
                       f"(up to {len(worst)} at one position; files {named}); they are {what}. Checked: {checked}{vary}. "
                       "The series is ambiguous and is not super-resolved; send one copy of each image")


def _identical_pixels(slices: list[Slice]) -> bool:
    try:
        first = None
        for s in slices:
            arr = s.ds.pixel_array
            img = arr[s.frame] if s.frame >= 0 and arr.ndim == 3 else arr
            if first is None:
                first = img
            elif not np.array_equal(first, img):
                return False
        return True
    except Exception:  # noqa: BLE001 - only for the wording of a refusal
        return False
