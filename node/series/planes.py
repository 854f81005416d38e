"""Which slices lie in one plane family: same matrix, same pixel spacing and the same orientation, compared with
a tolerance (never by rounding, whose bucket edges split 0.99949960 from 0.99950040).

Scanners and converters write ImageOrientationPatient with jitter in the last digits (below 1e-6 between slices
of one stack is common, moloney/dcmstack #42; a few 1e-4 after some converters); a real change of orientation
between slices (a stray oblique image, a localizer) is tenths of a degree or more.

"One orientation" is a geometric test (``orientation_gap``), not a tolerance on the cosines: a slice stacked
under another orientation has its pixel (i, j) placed at IPP + j dx r0 + i dy c0 instead of IPP + j dx r + i dy c,
an error of j dx (r - r0) + i dy (c - c0): linear in (i, j), so largest at a corner of the image's own field of
view. Two orientations count as one when that largest error stays within ``IN_PLANE_PX_TOL`` pixel in-plane and
within ``THROUGH_STEP_TOL`` of the slice step through-plane (where the step is known), and the angle stays within
the hard cap ``MAX_ANGLE_DEG``: the same cosine jitter moves the pixels of a 512x512 CT of 0.45 mm pixels by more
pixels than those of a 64x64 MR of 4 mm pixels, and the cap keeps a clearly different plane (0.5 deg, a
localizer) apart however coarse the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from node.series.slices import Slice, header_value

# largest in-plane displacement (pixels, at the far corner of the field of view) an orientation difference may cause:
# half a pixel, the house's in-plane tolerance for a slice off the stack line (load._check_stack_line): each pixel
# stays nearer its own place than its neighbour's (a 512x512 CT of 0.45 mm pixels: 1e-3 rad; 5e-4 moves 0.36 px)
IN_PLANE_PX_TOL = 0.5
# largest through-plane displacement (fraction of the slice step, where known) an orientation difference may cause:
# a quarter step (a 0.5 deg tilt moves the far corner of a 230 mm field 2.8 mm: 0.57 of a 5 mm step)
THROUGH_STEP_TOL = 0.25
# hard cap on the angle between the row (or the column) directions (deg): beyond it, another plane whatever the
# field of view (a stray oblique image of 0.5 deg, a localizer at 90 deg)
MAX_ANGLE_DEG = 0.1
# pixel spacings within this fraction of each other count as one spacing
SPACING_REL_TOL = 1e-4


def orientation_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How far apart two ImageOrientationPatient values (6,) are.

    Returns (largest absolute difference of the six direction cosines, largest angle in degrees between the two
    row directions or the two column directions).
    """
    cos_diff = float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))))
    angles = []
    for u, v in ((a[:3], b[:3]), (a[3:], b[3:])):
        nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        c = float(np.dot(u, v)) / max(nu * nv, 1e-12)
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, c)))))
    return cos_diff, max(angles)


@dataclass(frozen=True)
class OrientationGap:
    """How far pixels move when an image of orientation ``b`` is placed with orientation ``a`` (``orientation_gap``).

    ``in_plane_px``: largest displacement within the plane of ``a``, in pixels (each axis in its own spacing), at a
    corner of the field of view; ``through_mm``: largest displacement along the normal of ``a`` (mm); ``step``: the
    slice step (mm) it is compared with, None when unknown; ``angle_deg``: largest angle between the row or the
    column directions; ``cos_diff``: largest difference of the six cosines (for the message only)."""

    in_plane_px: float
    through_mm: float
    step: float | None
    angle_deg: float
    cos_diff: float

    @property
    def same(self) -> bool:
        """True when the two orientations count as one (within every tolerance of the module docstring)."""
        if self.angle_deg > MAX_ANGLE_DEG or self.in_plane_px > IN_PLANE_PX_TOL:
            return False
        return self.step is None or self.step <= 0 or self.through_mm <= THROUGH_STEP_TOL * self.step

    def describe(self) -> str:
        """'0.0002 in a direction cosine (0.0115 deg): moves pixels by up to 0.15 px in-plane and 0.07 mm (0.014
        of the 5 mm slice step) through-plane at the far corner (tolerance ...)'."""
        through = f"{self.through_mm:.3g} mm" + (f" ({self.through_mm / self.step:.3g} of the {self.step:.3g} mm "
                                                 "slice step)" if self.step else "")
        return (f"{self.cos_diff:.3g} in a direction cosine ({self.angle_deg:.3g} deg): moves pixels by up to "
                f"{self.in_plane_px:.3g} px in-plane and {through} through-plane at the far corner (tolerance "
                f"{IN_PLANE_PX_TOL:g} px, {THROUGH_STEP_TOL:g} of the slice step, {MAX_ANGLE_DEG:g} deg"
                + (f"; over: {', '.join(self.exceeded())})" if self.exceeded() else ")"))

    def exceeded(self) -> list[str]:
        """The tolerances this gap is over, in words ([] when ``same``)."""
        over = []
        if self.in_plane_px > IN_PLANE_PX_TOL:
            over.append("the in-plane one")
        if self.step and self.step > 0 and self.through_mm > THROUGH_STEP_TOL * self.step:
            over.append("the through-plane one")
        if self.angle_deg > MAX_ANGLE_DEG:
            over.append("the angle cap")
        return over


def orientation_gap(a: np.ndarray, b: np.ndarray, rows: int, cols: int, spacing: tuple[float, float],
                    step: float | None = None) -> OrientationGap:
    """The largest displacement (``OrientationGap``) that placing an image of ImageOrientationPatient ``b`` (6,)
    with ``a`` (6,) causes within the image's field of view: ``rows`` x ``cols`` pixels of ``spacing`` (dy, dx)
    mm, the error j dx (rb - ra) + i dy (cb - ca) at the four corners (pivot: the first pixel, where
    ImagePositionPatient is stated). ``step``: the slice step (mm) through-plane displacement is compared with,
    None (or 0) when unknown."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    ra, ca = a[:3] / np.linalg.norm(a[:3]), a[3:] / np.linalg.norm(a[3:])
    rb, cb = b[:3] / np.linalg.norm(b[:3]), b[3:] / np.linalg.norm(b[3:])
    na = np.cross(ra, ca)
    na = na / max(float(np.linalg.norm(na)), 1e-12)
    dy, dx = float(spacing[0]), float(spacing[1])
    in_plane, through = 0.0, 0.0
    for i in (0, max(int(rows) - 1, 0)):
        for j in (0, max(int(cols) - 1, 0)):
            d = j * dx * (rb - ra) + i * dy * (cb - ca)
            px = math.hypot(float(d @ ra) / max(dx, 1e-9), float(d @ ca) / max(dy, 1e-9))
            in_plane, through = max(in_plane, px), max(through, abs(float(d @ na)))
    cos_diff, angle = orientation_difference(a, b)
    return OrientationGap(in_plane, through, step if step and step > 0 else None, angle, cos_diff)


def slice_gap(a: Slice, b: Slice, step: float | None = None) -> OrientationGap:
    """``orientation_gap`` of slice ``b``'s orientation against slice ``a``'s, in ``a``'s field of view."""
    return orientation_gap(a.iop, b.iop, int(header_value(a, "Rows") or 0), int(header_value(a, "Columns") or 0),
                           a.spacing, step)


def slice_step(slices: Sequence[Slice]) -> float | None:
    """The slice step (mm) of a set of slices: the median gap between their distinct positions along the first
    slice's normal (positions 1 um apart count as one); None with fewer than two distinct positions."""
    if not slices:
        return None
    iop = np.asarray(slices[0].iop, float)
    n = np.cross(iop[:3], iop[3:])
    nn = float(np.linalg.norm(n))
    if nn < 1e-6:
        return None
    d = np.unique(np.round(np.array([float(np.dot(s.ipp, n / nn)) for s in slices]), 3))
    return float(np.median(np.diff(d))) if len(d) > 1 else None


def mean_orientation(iops: Sequence[np.ndarray]) -> np.ndarray:
    """The orientation (6,) a stack of one plane family is written with: the first one when all are equal, else
    the mean row and the mean column direction, each of norm 1 (order-independent; halves the worst corner error
    of alternating jitter against taking the first slice's)."""
    first = np.asarray(iops[0], float)
    if all(np.array_equal(np.asarray(x, float), first) for x in iops[1:]):
        return first
    m = np.mean(np.stack([np.asarray(x, float) for x in iops]), axis=0)
    return np.concatenate([m[:3] / np.linalg.norm(m[:3]), m[3:] / np.linalg.norm(m[3:])])


def _same_plane_family(a: Slice, b: Slice, step: float | None) -> bool:
    if header_value(a, "Rows") != header_value(b, "Rows") or header_value(a, "Columns") != header_value(b, "Columns"):
        return False
    if any(abs(x - y) > SPACING_REL_TOL * max(abs(x), abs(y)) for x, y in zip(a.spacing, b.spacing, strict=True)):
        return False
    return slice_gap(a, b, step).same


def plane_groups(slices: Sequence[Slice]) -> list[list[Slice]]:
    """The slices grouped by matrix, pixel spacing and orientation (each within tolerance of the group's first
    slice; orientation by ``slice_gap`` against the step of all the slices' positions), in order of first
    appearance. One group means the slices can form one stack."""
    groups: list[list[Slice]] = []
    step = slice_step(slices)
    for s in slices:
        for g in groups:
            if _same_plane_family(g[0], s, step):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def describe_plane_groups(groups: Sequence[Sequence[Slice]]) -> str:
    """'14 slice(s) 512x512 spacing 0.4512/0.4512 mm orientation 1/0/0/0/0.9995/0.03163 (IM0001.dcm, ...); ...'
    followed by how far the orientations really are apart (largest cosine difference and angle)."""
    parts = []
    for g in groups:
        s = g[0]
        names = ", ".join(x.where for x in g[:3]) + (", ..." if len(g) > 3 else "")
        parts.append(f"{len(g)} slice(s) {header_value(s, 'Rows')}x{header_value(s, 'Columns')} spacing "
                     f"{s.spacing[0]:.6g}/{s.spacing[1]:.6g} mm orientation "
                     f"{'/'.join(f'{c:.8g}' for c in s.iop)} ({names})")
    ref = groups[0][0]
    step = slice_step([s for g in groups for s in g])
    gaps = [slice_gap(ref, g[0], step) for g in groups[1:]]
    worst = max((x for x in gaps if not x.same), key=lambda x: x.angle_deg, default=None)
    tail = f"; orientations differ by up to {worst.describe()}" if worst else ""
    return "; ".join(parts) + tail
