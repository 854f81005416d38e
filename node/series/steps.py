"""Slice steps: when measured steps between slice centres count as one regular grid, and how to describe them."""

from __future__ import annotations

import numpy as np

MIN_SLICES_THROUGH_PLANE = 2  # a regular run of 2 slices is processed (the cubic spline interpolates any n >= 2)
STEP_REL_TOL = 0.01  # steps within 1 % (or 0.02 mm) of each other count as one regular grid
STEP_ABS_TOL = 0.02  # mm


def same_step(a: float, b: float) -> bool:
    """Whether step ``a`` equals reference step ``b`` (mm) within max(0.02 mm, 1 % of ``b``)."""
    return abs(a - b) <= max(STEP_ABS_TOL, STEP_REL_TOL * abs(b))


def step_segments(steps: np.ndarray) -> list[tuple[int, int]]:
    """Maximal ranges [i, j] (inclusive indices into ``steps``, shape (Z-1,), mm) of consecutive steps equal
    (within tolerance) to the first of the range."""
    segs: list[tuple[int, int]] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and same_step(float(steps[j + 1]), float(steps[i])):
            j += 1
        segs.append((i, j))
        i = j + 1
    return segs


def describe_steps(steps: np.ndarray) -> str:
    """``steps`` (Z-1,) mm in words, one median per segment: '4.00 mm x13, 1.08 mm, 7.00 mm x13'."""
    return ", ".join(f"{float(np.median(steps[i:j + 1])):.2f} mm" + (f" x{j - i + 1}" if j > i else "")
                     for i, j in step_segments(steps))


def off_line(positions: np.ndarray, row: np.ndarray, col: np.ndarray) -> tuple[float, int]:
    """How far (mm) the slice positions leave one straight (or sheared) stack, and which slice leaves it most:
    each slice's in-plane offset along ``row`` and ``col`` must follow its distance along the normal linearly (0
    for a straight stack, tan(tilt) per mm for a gantry tilt), fitted by least squares. (0.0, 0) for < 3 slices."""
    if len(positions) < 3:
        return 0.0, 0
    normal = np.cross(row, col)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    rel = positions - positions[0]
    design = np.stack([np.ones(len(positions)), rel @ normal], axis=1)
    worst, where = 0.0, 0
    for axis in (row, col):
        off = rel @ axis
        coef, *_ = np.linalg.lstsq(design, off, rcond=None)
        res = np.abs(off - design @ coef)
        if float(res.max()) > worst:
            worst, where = float(res.max()), int(np.argmax(res))
    return worst, where


def off_line_message(name: str, where: int, n: int, which: str, worst: float, tol: float) -> str:
    return (f"{name}: slice {where + 1}/{n} ({which}) lies {worst:.2f} mm in-plane off the line through the other "
            f"slice positions (tolerance {tol:.2f} mm, half a pixel): its ImagePositionPatient moves it sideways, so "
            "the slices are not one straight or sheared stack and cannot be interpolated through")


def thickness_groups(items: list[tuple[float | None, str]]) -> dict[float, list[str]]:
    """Image names grouped by stated SliceThickness (``items``: (thickness mm or None/0 when absent, name)),
    values within max(0.01 mm, 0.1 %) of a group's first one in that group; absent ones aside."""
    groups: dict[float, list[str]] = {}
    for t, name in items:
        if t is None or t <= 0:
            continue
        key = next((k for k in groups if abs(k - t) <= max(0.01, 1e-3 * t)), t)
        groups.setdefault(key, []).append(name)
    return groups


def thickness_message(name: str, groups: dict[float, list[str]]) -> str:
    parts = "; ".join(f"{k:g} mm x{len(v)} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                      for k, v in sorted(groups.items()))
    return (f"{name}: its slices state {len(groups)} different SliceThickness values ({parts}): two "
            "reconstructions or acquisitions under one SeriesInstanceUID; one slice profile cannot "
            "describe them, so they are not super-resolved as one volume")
