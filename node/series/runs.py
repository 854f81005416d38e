"""Slice steps: splitting an irregular stack into regular runs, and saying which slices no run holds.

Decision for irregular stacks (the tilted GE head: 4.0 mm x13, one 1.08 mm step, 7.0 mm x13): nothing is
resampled across a step change. ``split_runs`` cuts the stack where the step changes; every run of at least
``MIN_SLICES_THROUGH_PLANE`` (2) slices is super-resolved through-plane as its own derived series ("run 1/2", ...).
Stretches of two or more equal steps claim their slices first (a slice shared by two stretches goes to the longer
one, to the earlier on a tie). A lone step proves no regularity by itself: it joins two slices into a 2-slice run
only when neither is in a longer run and its step and slice line are those of a longer stretch of the series, i.e.
a slice is missing from a regular stack (the 5 mm phantom missing its 3rd slice: steps 5, 10, 5 x24 give runs of 2
and 25 slices; steps 5, 32, 4 give none). A slice that ends in no run is returned with its file name and the
reason, for the job report: nothing is left out without a word.
Positions written rounded (one or two decimals, ``node.series.steps``): a stretch is slices on one regular grid
within the rounding's error, and each run takes its positions from the line fitted through its slices.
``check_through_plane`` refuses, with the steps in the message, a stack that is still irregular.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from node.errors import VolumeError
from node.series.steps import (
    MIN_SLICES_THROUGH_PLANE,
    describe_steps,
    fitted_positions,
    grid_fit,
    grid_segments,
    in_plane_slack,
    off_line,
    off_line_message,
    rounding_slack,
    same_step,
    step_segments,
    thickness_groups,
    thickness_message,
)
from node.series.volume import SeriesVolume

MAX_LINE_ANGLE_DEG = 0.5  # a 2-slice stretch must lie on a line parallel to its longer stretch's (as tilt notes)


@dataclass(frozen=True)
class LeftOut:
    """An input slice that is in no derived series: which one (1-based position along the stack of ``of``
    slices, 0 for an image in no stack; file name, SOPInstanceUID) and why, in words."""

    index: int
    of: int
    file: str
    sop_instance_uid: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @property
    def where(self) -> str:
        """"slice 4/10 CT0004.dcm", or "image LOC.dcm" for an image set aside before any stack was made
        (``index`` 0: a localizer filed in the series, a stray plane; ``SeriesVolume.set_aside``)."""
        return f"slice {self.index}/{self.of} {self.file}" if self.index else f"image {self.file}"


@dataclass
class RunSplit:
    """The regular runs of a volume (slice order) and the slices none of them holds."""

    runs: list[SeriesVolume]
    left_out: list[LeftOut]


def split_runs(vol: SeriesVolume) -> RunSplit:
    """A regular volume as itself; an irregular one cut into regular runs of >= 2 slices (``run = (index,
    count)``, ``run_slices`` = 1-based input slices) plus the slices that belong to no run, each with why."""
    if not vol.irregular:
        return RunSplit([vol], [])
    n = vol.shape[0]
    slack = _slack(vol)  # > 0: positions written rounded, judged on a grid within the rounding's error
    dist = vol.positions @ vol.normal
    segs = grid_segments(dist, slack) if slack else step_segments(vol.steps)  # steps i..j (slices i..j+1) equal
    steps_said = describe_steps(vol.steps, segs if slack else None)  # for the slices left out, found once
    taken = np.zeros(n, dtype=bool)
    spans: list[tuple[int, int]] = []
    anchors: list[tuple[float, np.ndarray]] = []  # (step, slice-line direction) of the stretches of >= 2 steps
    for i, j in sorted((sg for sg in segs if sg[1] > sg[0]), key=lambda sg: (sg[0] - sg[1], sg[0])):
        a, b = i, j + 1  # longest first, then earliest
        while a <= b and taken[a]:
            a += 1
        while b >= a and taken[b]:
            b -= 1
        if b - a + 1 >= MIN_SLICES_THROUGH_PLANE and not taken[a:b + 1].any():
            taken[a:b + 1] = True
            spans.append((a, b))
            if slack:
                line = fitted_positions(vol.positions[i:j + 2])
                d = (line[-1] - line[0]) / max(float(np.linalg.norm(line[-1] - line[0])), 1e-12)
                anchors.append((grid_fit(dist[i:j + 2])[1], d))
            else:
                anchors.append((float(np.median(vol.steps[i:j + 1])), _direction(vol, i, j + 1)))
    for i, j in segs:
        # one lone step proves no regularity by itself: two slices form a run only when their step and slice line
        # are those of a longer stretch of the series (a slice missing from a regular stack), else they are named
        if j == i and not taken[i] and not taken[i + 1] and any(_same_stretch(vol, i, st, d, slack)
                                                                 for st, d in anchors):
            taken[i:i + 2] = True
            spans.append((i, i + 1))
    spans.sort()
    tol = 0.5 * min(vol.spacing[1], vol.spacing[2])
    if slack:
        tol += in_plane_slack(vol.position_rounding, vol.row_cosine, vol.col_cosine)
    for a, b in spans:  # a run with a slice moved in-plane off its line is no stack (as load refuses a regular one)
        worst, where = off_line(vol.positions[a:b + 1], vol.row_cosine, vol.col_cosine)
        if worst > tol:
            z = a + where
            raise VolumeError(off_line_message(f"series {vol.series_uid}", z, n, vol.names[z] if z < len(vol.names)
                                               else f"slice {z + 1}", worst, tol))
        if not vol.multiframe:  # two thicknesses interleaved in a run are refused as in a regular stack (load)
            groups = thickness_groups([(vol.datasets.record(z).slice_thickness,
                                        vol.names[z] if z < len(vol.names) else f"slice {z + 1}")
                                       for z in range(a, b + 1)])
            if len(groups) > 1:
                raise VolumeError(thickness_message(f"series {vol.series_uid} run of slices {a + 1}..{b + 1}",
                                                    groups))
    runs = [_subvolume(vol, a, b, fitted=bool(slack)) for a, b in spans]
    for k, r in enumerate(runs):
        r.run = (k + 1, len(runs))
        r.part = vol.part + k
    left = [_left_out(vol, z, steps_said) for z in range(n) if not taken[z]]
    return RunSplit(runs, left)


def _slack(vol: SeriesVolume) -> float:
    """``steps.rounding_slack`` of ``vol``'s positions (0.0: not written rounded, or too coarsely for its step)."""
    if not vol.position_rounding or len(vol.steps) == 0:
        return 0.0
    return rounding_slack(vol.position_rounding, vol.normal, float(np.median(vol.steps)))


def _same_stretch(vol: SeriesVolume, i: int, step: float, direction: np.ndarray, slack: float) -> bool:
    """Whether the step from slice i to i + 1 is ``step`` along ``direction`` (a longer stretch's): within the step
    tolerance and MAX_LINE_ANGLE_DEG, or for positions written rounded (``slack`` > 0) within the rounding at
    each end (``slack`` along the normal, the rounding's length sideways)."""
    if not slack:
        return same_step(float(vol.steps[i]), step) and _angle_deg(direction, _direction(vol, i, i + 1)) \
            <= MAX_LINE_ANGLE_DEG
    vec = vol.positions[i + 1] - vol.positions[i]
    sideways = float(np.linalg.norm(vec - direction * float(np.dot(vec, direction))))
    return (abs(float(vol.steps[i]) - step) <= 2 * slack
            and sideways <= vol.position_rounding * float(np.sqrt(3.0)) + np.radians(MAX_LINE_ANGLE_DEG) * abs(step))


def _direction(vol: SeriesVolume, a: int, b: int) -> np.ndarray:
    """(3,) unit vector from slice a's position to slice b's."""
    d = vol.positions[b] - vol.positions[a]
    return d / max(float(np.linalg.norm(d)), 1e-12)  # type: ignore[no-any-return]


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(float(np.dot(u, v)), -1.0, 1.0))))


def regular_runs(vol: SeriesVolume) -> list[SeriesVolume]:
    """The regular runs of ``split_runs`` (``split_runs(vol).left_out`` names the slices in none)."""
    return split_runs(vol).runs


def _left_out(vol: SeriesVolume, z: int, steps_said: str) -> LeftOut:
    n = vol.shape[0]
    around = [f"{float(vol.steps[z - 1]):.2f} mm to slice {z}" if z > 0 else "",
              f"{float(vol.steps[z]):.2f} mm to slice {z + 2}" if z < n - 1 else ""]
    reason = (f"isolated between irregular slice steps ({', '.join(s for s in around if s)}; the stack steps "
              f"{steps_said}): no regular run of {MIN_SLICES_THROUGH_PLANE} or more slices on the "
              "series' step holds it, so it is not super-resolved through-plane")
    name = vol.names[z] if z < len(vol.names) else f"slice {z + 1}"
    return LeftOut(z + 1, n, name, vol.datasets.record(z).sop_instance_uid, reason)


def _subvolume(vol: SeriesVolume, a: int, b: int, fitted: bool = False) -> SeriesVolume:
    """Slices a..b (inclusive) of ``vol`` as a regular volume of their own; ``fitted``: positions written rounded,
    taken from the line fitted through the run's slices (``steps.fitted_positions``)."""
    sl = slice(a, b + 1)
    n = vol.shape[0]
    positions = fitted_positions(vol.positions[sl]) if fitted else vol.positions[sl]
    steps = np.diff(positions @ vol.normal) if fitted else vol.steps[a:b]
    med = (float(np.mean(steps)) if fitted else float(np.median(steps))) if len(steps) else vol.spacing[0]
    thick = vol.slice_thickness
    if not vol.multiframe:
        # the run's own SliceThickness (single-frame headers; None when absent, 0 when empty): its first slice's,
        # else the one its other slices agree on (a first slice without it took the stack's, or none)
        own = [t for t in (vol.datasets.record(k).slice_thickness for k in range(a, b + 1)) if t]
        groups = thickness_groups([(t, "") for t in own])
        first = vol.datasets.record(a).slice_thickness
        if first:
            thick = first
        elif len(groups) == 1:
            thick = next(iter(groups))
    return dataclasses.replace(
        vol,
        data=vol.data[sl],
        spacing=(med, vol.spacing[1], vol.spacing[2]),
        slice_thickness=thick,
        positions=positions,
        datasets=vol.datasets[sl],
        frame_numbers=vol.frame_numbers[sl] if vol.frame_numbers else [],
        formats=vol.formats[sl],
        names=vol.names[sl],
        steps=steps,
        irregular=False,
        run_slices=(a + 1, b + 1, n),
        notes=vol.notes + [f"regular run of slices {a + 1}..{b + 1} at {med:.2f} mm"],
    )


def check_through_plane(vol: SeriesVolume, factor: int) -> None:
    """VolumeError when ``vol`` cannot be super-resolved through-plane by ``factor``: fewer than
    ``MIN_SLICES_THROUGH_PLANE`` slices, or irregular steps. A ``factor`` of 1 always passes."""
    if factor <= 1:
        return
    if vol.shape[0] < MIN_SLICES_THROUGH_PLANE:
        raise VolumeError(f"{vol.name}: {vol.shape[0]} slice(s); through-plane super-resolution "
                          f"needs at least {MIN_SLICES_THROUGH_PLANE}")
    if vol.irregular:
        raise VolumeError(f"{vol.name}: slice steps are irregular ({describe_steps(vol.steps)}); "
                          "they do not lie on one regular grid")
