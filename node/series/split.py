"""Several volumes in one series: fMRI time points, echoes, magnitude + phase, diffusion b-values and directions,
stacks and dimension indices of enhanced multi-frame objects. Each becomes a volume of its own.

Decision: a series is split where its images repeat a slice position (two images at one position cannot be
one stack), where an enhanced object names several stacks (StackID), or where echo, diffusion or temporal
position take several values even without repeats (``DISTINCT_VOLUMES``: interleaved volumes). The split uses the standard dimensions,
read per image (classic attributes, or the frame's functional groups for enhanced objects):

=================  ===========================================================================================
image type         ImageType (classic), with GE's image component (0043,102F); FrameType + ComplexImageComponent
                   (enhanced): M vs P, ...
echo               EchoNumbers, EchoTime / EffectiveEchoTime
diffusion          DiffusionBValue + DiffusionGradientOrientation (classic, MR Diffusion Sequence, or the
                   Siemens MR header (0019,100C)/(0019,100E), GE (0043,1039)/(0019,10BB-BD) on EPI images,
                   Philips (2001,1003)/(2005,10B0-B2))
temporal position  TemporalPositionIdentifier (classic), TemporalPositionIndex (enhanced Frame Content)
trigger time       TriggerTime (classic), NominalCardiacTriggerDelayTime (enhanced Cardiac Synchronization)
cardiac phase      the rank of the trigger time among the images at one position (a cine whose TriggerTimes
                   change with the heart rate from position to position: ``_cardiac_phases``); inferred, so
                   preferred last: a stated dimension explaining the repeats with as many volumes wins
acquisition        AcquisitionNumber
dimension index    enhanced DimensionIndexValues, less the in-stack position / position / stack indices
=================  ===========================================================================================

Of the dimensions that vary, the smallest set (1, then 2, then 3 dimensions) whose value combinations leave no
two images at one position wins; among sets of one size, the one giving the fewest volumes (then the order of
the table). So a dimension that changes with every slice (an AcquisitionNumber per slice) never fragments a
stack while a coarser one explains the repeats; a split leaving most of its images in volumes of one is no split.
Each volume the repeats were told apart by is split again as a series without repeats: images of two kinds
(``IMAGE_KIND``: M and P, ORIGINAL and a DERIVED MIP), echoes, b-values or time points are two volumes even at
positions of their own. Numbers are compared with a tolerance, never by rounding.
When nothing explains the repeats the series is truly ambiguous and is refused, naming the files.

An attribute absent on some images is no value of its own (``_column``): an image without it (or, for an echo,
without EchoNumbers but with its EchoTime) whose stated parts fit exactly one value the series states takes that
value (a single-echo stack with EchoNumbers missing on a few slices stays one stack; an echo is told by its
EchoTime). When its parts fit several values (a 2-echo series, EchoNumbers and EchoTime both absent on a slice;
two time points, TemporalPositionIdentifier absent) the volume it belongs to cannot be told: the series is
refused naming the attribute and the files, unless another complete dimension splits the series with each volume
holding one value of it. A value per image (a counter of the slices) names no volumes, absent values or not.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from node.errors import VolumeError
from node.series.dimensions import (
    DIMENSIONS,
    IMAGE_KIND,
    STACK,
    Dimension,
    canonical,
    consistent,
    is_partial,
    order,
)
from node.series.slices import Slice, header_value, stored_pixels
from node.series.steps import STEP_ABS_TOL, STEP_REL_TOL

# images whose centres lie within this distance (mm) along the slice normal share one slice position
SAME_POSITION_MM = 0.01


@dataclass
class VolumeGroup:
    """The images of one volume of a series, and how a reader tells it from its siblings."""

    slices: list[Slice]
    label: str = ""  # "echo 2", "time 3", "b=1000 dir 2", "type P", ...; "" when the series is one volume
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- attribute access


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

    Frames of multi-frame (enhanced) objects beside single-frame images are two encodings (``_by_encoding``):
    each is split on its own, its labels prefixed "multi-frame" / "single-frame", never stacked together.
    """
    single = [s for s in slices if s.frame < 0]
    if single and len(single) < len(slices):
        return _by_encoding(slices, single, series)
    return _split_stacks(slices, series)


def _by_encoding(slices: list[Slice], single: list[Slice], series: str) -> list[VolumeGroup]:
    """series14: an enhanced multi-frame object and classic single-frame images under one SeriesInstanceUID were
    split by StackID into "stack 1" (the object's frames) and "stack ?" (the classic images, which have none). They
    are two encodings, of the same acquisition (the same positions: the data twice, e.g. a scanner sending both the
    enhanced object and its legacy images) or not (positions that interleave or lie apart: stacking them into one
    volume would be a guess). Each encoding is its own volume (or volumes), labelled by it, with a note saying
    what the series holds and how their positions relate."""
    multi = [s for s in slices if s.frame >= 0]
    objects = sorted({s.name for s in multi})
    note = (f"{series} holds two encodings: {len(objects)} multi-frame object(s) ({_listed(objects)}, "
            f"{len(multi)} frame(s)) and {len(single)} single-frame image(s) ({_listed(sorted(s.name for s in single))}); "
            f"{_relation(multi, single)}; each encoding is super-resolved as its own volume, never stacked with the other")
    out: list[VolumeGroup] = []
    for label, part in (("multi-frame", multi), ("single-frame", single)):
        for g in _split_stacks(part, f"{series} {label}"):
            out.append(VolumeGroup(g.slices, " ".join(x for x in (label, g.label) if x), [note, *g.notes]))
    return out


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _relation(multi: list[Slice], single: list[Slice]) -> str:
    """How the positions of two encodings relate, in words."""
    groups = position_groups(multi + single)
    n = len(multi)
    shared = sum(1 for g in groups if any(i < n for i in g) and any(i >= n for i in g))
    if shared and shared == len({tuple(g) for g in groups}):
        return f"they repeat the same {shared} position(s) (likely the same data twice)"
    if shared:
        return f"{shared} of their positions coincide"
    first = [k for k, g in enumerate(groups) if g[0] < n]
    second = [k for k, g in enumerate(groups) if g[0] >= n]
    if max(first) < min(second) or max(second) < min(first):
        return "they cover different ranges of positions"
    return "their positions interleave (one volume in two encodings, or two acquisitions: it cannot be told)"


def _split_stacks(slices: list[Slice], series: str) -> list[VolumeGroup]:
    """``split_volumes`` of images of one encoding: by StackID first, then ``_split``."""
    stacks = canonical([STACK.of(s) for s in slices])
    if len(set(stacks)) > 1:
        out: list[VolumeGroup] = []
        parts = _partition(slices, [(v,) for v in stacks])
        for (v,), part in sorted(parts.items(), key=lambda kv: order(kv[0][0])):
            label = STACK.label(v, [k for (k,) in parts])
            for g in _split(part, f"{series} {label}"):
                out.append(VolumeGroup(g.slices, " ".join(x for x in (label, g.label) if x), g.notes))
        return out
    return _split(slices, series)


# dimensions that always name different volumes, even when their images repeat no position (two echoes or time
# points whose positions are offset by a fraction of the step would otherwise stack into one volume of alternating
# contrast; so would magnitude and phase images at alternate positions, or a DERIVED MIP image one step past an
# ORIGINAL stack: the image kind, ``IMAGE_KIND``); acquisition number, trigger time and the vendor's flags in the
# full image type may change within one stack and split only repeats
DISTINCT_VOLUMES = ("image kind", "echo", "diffusion b-value/direction", "temporal position", "reconstruction kernel",
                    "contrast agent")


@dataclass
class _Column:
    """One dimension's value per image, an absent value taken as the one value it fits (``_column``)."""

    dim: Dimension
    values: list[Any]  # canonical; None where absent and fitting no value, or several (``ambiguous``)
    wholes: list[Any]  # the values stated whole (no part absent), each once, in order of appearance
    stating: int  # images that state one of ``wholes``
    ambiguous: list[int]  # images whose absent value fits several of ``wholes``
    filled: int  # images whose absent value was taken as the one value of ``wholes`` it fits

    @property
    def per_image(self) -> bool:
        """Whether the stated values count the images that state them one by one (>= 3 images, every value on
        one image): a per-slice counter (a TemporalPositionIdentifier or EchoNumbers per slice, absent on some
        slices or not), not volumes; split by it, the series would become volumes of one image each, none of
        which can be super-resolved."""
        return self.stating >= 3 and len(self.wholes) == self.stating


def _column(dim: Dimension, slices: Sequence[Slice]) -> _Column:
    """``dim``'s values of ``slices`` with absent ones filled: an image whose value is partial (``is_partial``:
    absent, or an echo without its number or time) takes the one whole value it is consistent with; with
    several it is ambiguous, with none it keeps its partial value (an echo time no whole value states: a value of
    its own). When no image states a whole value, the partial ones are the values and only absent ones fit."""
    raw = canonical([dim.of(s) for s in slices])
    wholes = list(dict.fromkeys(v for v in raw if not is_partial(dim, v)))
    if wholes:
        targets = [i for i, v in enumerate(raw) if is_partial(dim, v)]
    else:
        wholes = list(dict.fromkeys(v for v in raw if v is not None))
        targets = [i for i, v in enumerate(raw) if v is None]
    stating = sum(1 for v in raw if v in wholes)
    values, ambiguous, filled = list(raw), [], 0
    for i in targets:
        fits = [w for w in wholes if consistent(raw[i], w)]
        if len(fits) == 1:
            values[i], filled = fits[0], filled + 1
        elif len(fits) > 1:
            values[i] = None
            ambiguous.append(i)
    return _Column(dim, values, wholes, stating, ambiguous, filled)


def _varies(col: _Column) -> bool:
    return len({v for v in col.values if v is not None}) > 1


def _absent(col: _Column, slices: Sequence[Slice], series: str) -> VolumeError:
    """The refusal of a series some of whose images lack ``col``'s attribute where it tells volumes apart."""
    d, amb = col.dim, col.ambiguous
    stated = sorted({v for v in col.values if v is not None}, key=order)
    labels = ", ".join(d.label(v, stated) for v in stated[:6]) + (f" and {len(stated) - 6} more"
                                                                  if len(stated) > 6 else "")
    files = list(dict.fromkeys(slices[i].name.split(" (mosaic image")[0] for i in amb))
    named = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return VolumeError(f"{series}: {d.attributes} is absent on {len(amb)} of its {len(slices)} images (files "
                       f"{named}) while the others state {len(stated)} different values ({labels}): which {d.name} "
                       "those images belong to cannot be told, so the series is not split into volumes (a guess "
                       "could stack two of them, leaving them out would drop slices) and is not super-resolved; "
                       f"send the images with their {d.attributes.split(' (')[0]}")


def _interleaved_acquisitions(slices: list[Slice], series: str) -> list[Dimension]:
    """[the acquisition number dimension] when its values name interleaved volumes, else [].

    AcquisitionNumber may change within one stack: per slice (helical CT, some MR) or per block of slices
    (step-and-shoot CT, several table positions). Those are contiguous along the slice normal. Two acquisitions of
    the same place (two contrast phases) whose positions are offset by a fraction of the step are not: sorted by
    position, their numbers alternate. So the series is split by acquisition number when every number holds at
    least ``MIN_INTERLEAVED`` images and, along the normal, the number changes more often than contiguous blocks
    would (more than number of values - 1 times). Images without AcquisitionNumber take the one number of a single
    acquisition; beside interleaved acquisitions they cannot be placed and the series is refused, naming them."""
    dim = next(d for d in DIMENSIONS if d.name == "acquisition number")
    col = _column(dim, slices)
    if col.ambiguous:
        gone = set(col.ambiguous)
        kept = [i for i in range(len(slices)) if i not in gone]
        if _interleaved([slices[i] for i in kept], [col.values[i] for i in kept]):
            raise _absent(col, slices, series)
        return []
    return [dim] if _interleaved(slices, col.values) else []


def _interleaved(slices: list[Slice], values: list[Any]) -> bool:
    """Whether acquisition numbers ``values`` (one per slice) name interleaved acquisitions (see above)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) < 2 or None in counts or min(counts.values()) < MIN_INTERLEAVED:
        return False
    groups = position_groups(slices)  # no repeats here: one image per position
    along = [values[g[0]] for g in groups]
    changes = sum(1 for a, b in itertools.pairwise(along) if a != b)
    return changes > len(counts) - 1 and not _passes_of_one_mr_stack(slices, groups)


def _passes_of_one_mr_stack(slices: list[Slice], groups: list[list[int]]) -> bool:
    """Whether interleaved acquisition numbers are the passes of one 2D MR acquisition: slices too many for one TR
    are acquired in two or more passes, odd slices in the first and even ones in the second (GE 'interleaved'
    acquisitions, zero gap against crosstalk), each pass its own AcquisitionNumber. Their slices touch or leave
    gaps (the stack's step >= SliceThickness); two acquisitions of one place offset by a fraction of the step
    overlap (step < thickness) and are still split. CT is always split (thin slices every 5 or 10 mm, HRCT, may
    leave gaps in each of two phases)."""
    if any(str(header_value(s, "Modality") or "").upper() != "MR" for s in slices):
        return False
    thick = [float(s.thickness or 0.0) for s in slices]
    if min(thick) <= 0:
        return False
    iop = slices[0].iop
    normal = np.cross(iop[:3], iop[3:])
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    dist = np.array([float(np.dot(slices[g[0]].ipp, normal)) for g in groups])
    step = float(np.median(np.diff(dist)))
    return step >= float(np.median(thick)) * (1.0 - STEP_REL_TOL) - STEP_ABS_TOL


MIN_INTERLEAVED = 3  # images per acquisition number for an interleaved split (fewer: a rescanned slice or two)


def _filled_notes(cols: Sequence[_Column]) -> list[str]:
    return [f"{c.filled} image(s) without {c.dim.attributes} taken as the one {c.dim.name} value they fit"
            for c in cols if c.filled]


def _split(slices: list[Slice], series: str) -> list[VolumeGroup]:
    if not has_repeats(slices):
        cols = {d.name: _column(d, slices) for d in (IMAGE_KIND, *DIMENSIONS) if d.name in DISTINCT_VOLUMES}
        distinct = []
        for d in (IMAGE_KIND, *DIMENSIONS):
            c = cols.get(d.name)
            if c is None or c.per_image or not _varies(c):
                continue
            if c.ambiguous:
                raise _absent(c, slices, series)
            distinct.append(d)
        notes = _filled_notes([c for c in cols.values() if c.dim in distinct or not _varies(c)])
        if not distinct:
            distinct = _interleaved_acquisitions(slices, series)
            cols.update({d.name: _column(d, slices) for d in distinct})
            notes += _filled_notes([cols[d.name] for d in distinct])
        if not distinct:
            return [VolumeGroup(slices, notes=notes)]
        keys = list(zip(*(cols[d.name].values for d in distinct), strict=True))
        groups = _groups(tuple(distinct), _partition(slices, keys))
        for g in groups:
            g.notes.append(f"{g.label}: its slice positions differ from the other volumes' (interleaved), "
                           "still a volume of its own")
            g.notes.extend(notes)
        return groups
    cols = {d.name: _column(d, slices) for d in DIMENSIONS}
    dims = list(DIMENSIONS)
    phases, hint = _cardiac_phases(slices, cols["trigger time"])
    if phases is not None:
        # last: a rank is inferred, the other dimensions are stated; one that explains the repeats with as few
        # volumes wins (two acquisitions whose TriggerTimes run in opposite slice orders: ranked, each 'phase'
        # stacked slices of both acquisitions). The same trigger times at every position give no phases at all
        cols[CARDIAC_PHASE.name] = phases
        dims.append(CARDIAC_PHASE)
    varying = [d for d in dims if len(set(cols[d.name].values)) > 1]
    several = len(position_groups(slices)) > 1
    # dimensions some of whose images' values cannot be told (a counter of the images aside: it names no volumes)
    unsure = [cols[d.name] for d in varying if cols[d.name].ambiguous and not cols[d.name].per_image]
    for size in range(1, min(3, len(varying)) + 1):
        best: tuple[int, int, tuple[Dimension, ...], dict[tuple[Any, ...], list[Slice]]] | None = None
        for rank, combo in enumerate(itertools.combinations([d for d in varying if not cols[d.name].ambiguous],
                                                            size)):
            keys = list(zip(*(cols[d.name].values for d in combo), strict=True))
            parts = _partition(slices, keys)
            if any(has_repeats(p) for p in parts.values()):
                continue
            if several and 2 * sum(len(p) for p in parts.values() if len(p) == 1) > len(slices):
                # most images a value of their own (a counter of the images; cine TriggerTimes that change with the
                # heart rate from position to position): that names no volumes, and none of one image can be
                # super-resolved. Images, not volumes, are counted: slices rescanned one by one beside a whole
                # stack (each its own AcquisitionNumber: 2 of 3 volumes single) still split, the stack kept
                continue
            if best is None or len(parts) < best[0]:
                best = (len(parts), rank, combo, parts)
        if best is not None:
            index = {id(s): i for i, s in enumerate(slices)}
            for c in unsure:  # a complete dimension splits it: each volume must hold one echo, time, b-value
                if c.dim.name in DISTINCT_VOLUMES and any(len({c.values[index[id(s)]] for s in p} - {None}) > 1 for p in best[3].values()):
                    raise _absent(c, slices, series)
            out: list[VolumeGroup] = []
            for g in _groups(best[2], best[3]):
                g.notes.extend(_filled_notes([cols[d.name] for d in best[2]]))
                if CARDIAC_PHASE in best[2]:
                    g.notes.append(hint)
                # the repeats told apart, a volume may still hold images of two kinds, echoes, time points or
                # interleaved acquisitions at other positions (two acquisitions, each of two echoes offset by half a
                # step): split again, as a series that repeats no position
                for sub in _split(g.slices, f"{series} {g.label}"):
                    out.append(VolumeGroup(sub.slices, " ".join(x for x in (g.label, sub.label) if x),
                                           [*g.notes, *sub.notes]))
            return out
    if unsure:
        raise _absent(unsure[0], slices, series)
    raise _ambiguous(slices, series, varying, hint if phases is None else "")


def _cardiac_phase_label(value: Any, values: list[Any]) -> str:
    return f"phase {value}"


# the phase of a cine stack: the rank of an image's TriggerTime among those at its slice position (``_cardiac_phases``)
CARDIAC_PHASE = Dimension("cardiac phase", lambda s: None, _cardiac_phase_label,
                          "TriggerTime (its rank among the images at one slice position)")


def _cardiac_phases(slices: list[Slice], trigger: _Column) -> tuple[_Column | None, str]:
    """The cardiac phase of each image of a cine stack, and a note on it (or, when phases cannot be told, why).

    A retrospectively gated cine acquires each slice position over its own heart beats (one breath-hold each), its
    phases spread over that position's R-R interval: TriggerTime of phase k changes from position to position with
    the heart rate (800 ms R-R: 200 ms; 985 ms: 246 ms). Split by TriggerTime, every image would be a volume of
    its own. The phase is the rank of the image's TriggerTime among those at its position, when every position
    holds the same number (2 or more) of images with different TriggerTimes; otherwise (a phase missing at one
    position) ranks would stack images of two phases: (None, the reason). (None, "") when TriggerTime is absent
    on some image, the same at every position, or every position holds one image."""
    values = trigger.values
    if any(v is None for v in values):
        return None, ""
    groups = position_groups(slices)
    sizes = sorted({len(g) for g in groups})
    if sizes[-1] < 2 or any(len({values[i] for i in g}) < len(g) for g in groups):
        return None, ""
    per_position = [sorted(values[i] for i in g) for g in groups]
    if all(t == per_position[0] for t in per_position):
        return None, ""  # told by TriggerTime itself
    if len(sizes) > 1:
        return None, (f"its slice positions hold {sizes[0]} to {sizes[-1]} images of different TriggerTime (cardiac "
                      "phases whose TriggerTime changes with the heart rate from position to position?): with a "
                      "phase missing at some position, which phase each image is cannot be told")
    ranks: list[Any] = [0] * len(slices)
    for g in groups:
        for r, i in enumerate(sorted(g, key=lambda i: values[i]), start=1):
            ranks[i] = r
    spans = [(min(p[r] for p in per_position), max(p[r] for p in per_position)) for r in range(sizes[0])]
    note = (f"cardiac phases: the k-th of the {sizes[0]} TriggerTime values at each of the {len(groups)} slice "
            "positions is phase k (TriggerTime changes with the heart rate from position to position: "
            + ", ".join(f"phase {r + 1} {a:g}-{b:g} ms" for r, (a, b) in enumerate(spans[:4]))
            + (f" and {len(spans) - 4} more" if len(spans) > 4 else "") + ")")
    col = _Column(CARDIAC_PHASE, ranks, list(range(1, sizes[0] + 1)), len(slices), [], 0)
    return col, note


def _groups(combo: tuple[Dimension, ...], parts: dict[tuple[Any, ...], list[Slice]]) -> list[VolumeGroup]:
    keys = sorted(parts, key=lambda k: tuple(order(v) for v in k))
    out = []
    for k in keys:
        label = " ".join(d.label(v, [kk[i] for kk in keys]) for i, (d, v) in enumerate(zip(combo, k, strict=True)))
        note = f"volume {label}: split by {', '.join(d.name for d in combo)}"
        out.append(VolumeGroup(parts[k], label, [note]))
    return out


def _ambiguous(slices: list[Slice], series: str, varying: list[Dimension], hint: str = "") -> VolumeError:
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
            if varying else "") + (f"; {hint}" if hint else "")
    return VolumeError(f"{series}: {repeated} of its {len(slices)} images share a slice position with another "
                       f"(up to {len(worst)} at one position; files {named}); they are {what}. Checked: {checked}{vary}. "
                       "The series is ambiguous and is not super-resolved; send one copy of each image")


def _identical_pixels(slices: list[Slice]) -> bool:
    try:
        first = None
        for s in slices:
            img = stored_pixels(s)
            if first is None:
                first = img
            elif not np.array_equal(first, img):
                return False
        return True
    except Exception:  # noqa: BLE001 - only for the wording of a refusal
        return False
