"""Which slices lie in one plane family: same matrix, same pixel spacing and the same orientation, compared with
a tolerance (never by rounding, whose bucket edges split 0.99949960 from 0.99950040).

Scanners and converters write ImageOrientationPatient with jitter in the last digits (below 1e-6 between slices
of one stack is common); a real change of orientation between slices is at least a few hundredths of a degree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from node.series.slices import Slice, header_value

# direction cosines differing by at most this (each of the six) count as one orientation: 1e-4 is 0.0057 deg
IOP_TOL = 1e-4
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


def _same_plane_family(a: Slice, b: Slice) -> bool:
    if header_value(a, "Rows") != header_value(b, "Rows") or header_value(a, "Columns") != header_value(b, "Columns"):
        return False
    if any(abs(x - y) > SPACING_REL_TOL * max(abs(x), abs(y)) for x, y in zip(a.spacing, b.spacing, strict=True)):
        return False
    return orientation_difference(a.iop, b.iop)[0] <= IOP_TOL


def plane_groups(slices: Sequence[Slice]) -> list[list[Slice]]:
    """The slices grouped by matrix, pixel spacing and orientation (each within tolerance of the group's first
    slice), in order of first appearance. One group means the slices can form one stack."""
    groups: list[list[Slice]] = []
    for s in slices:
        for g in groups:
            if _same_plane_family(g[0], s):
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
    ref = groups[0][0].iop
    worst = max((orientation_difference(ref, g[0].iop) for g in groups[1:]), default=(0.0, 0.0))
    tail = ""
    if worst[0] > IOP_TOL:
        tail = (f"; orientations differ by up to {worst[0]:.3g} in a direction cosine ({worst[1]:.3g} deg; "
                f"tolerance {IOP_TOL:g})")
    return "; ".join(parts) + tail
