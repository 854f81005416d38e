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


def describe_steps(steps: np.ndarray, segments: list[tuple[int, int]] | None = None) -> str:
    """``steps`` (Z-1,) mm in words, one median per segment (``step_segments``, or ``segments`` given: those of a
    stack with rounded positions, ``grid_segments``): '4.00 mm x13, 1.08 mm, 7.00 mm x13'."""
    return ", ".join(f"{float(np.median(steps[i:j + 1])):.2f} mm" + (f" x{j - i + 1}" if j > i else "")
                     for i, j in (step_segments(steps) if segments is None else segments))


# ---------------------------------------------------------------------------------------------- rounded positions
# Some scanners and anonymisers write ImagePositionPatient (DS) with one or two decimals. Rounding each component to
# r moves a position by up to r/2 per component: r/2 * (|nx| + |ny| + |nz|) along the slice normal n, 0.087 mm for
# r = 0.1 on an oblique normal; a 1 mm stack's steps then read 0.83..1.17 mm, no longer one step within 1 % /
# 0.02 mm. Decision: positions whose every component is a multiple of 0.1 or 0.01 mm are "written rounded"; their
# stack is regular when one regular grid (offset, step) holds every position within the rounding's error (plus
# POSITION_JITTER_MM), the worst case fitted exactly (minimax); the volume then takes its positions from the
# straight line fitted through them (least squares), so the derived series is exactly regular and never carries the
# rounding on. The rounding is used only while its error is below a fifth of the step: a missing slice moves the
# best grid by about half a step, so it still shows (a 0.3 mm oblique stack written to 0.1 mm is judged as before).

POSITION_ROUNDINGS_MM = (0.1, 0.01)  # decimals written: one or two (finer ones are below the step tolerances)
POSITION_JITTER_MM = 0.01  # a position's own scatter beyond its rounding (half of STEP_ABS_TOL per step)


def position_rounding(positions: np.ndarray) -> float:
    """The coarsest of ``POSITION_ROUNDINGS_MM`` that every component of ``positions`` (N, 3) is a multiple of (a
    value written with that many decimals), else 0.0."""
    if len(positions) == 0:
        return 0.0
    for r in POSITION_ROUNDINGS_MM:
        q = np.asarray(positions, dtype=np.float64) / r
        if bool(np.all(np.abs(q - np.round(q)) <= 1e-6)):
            return r
    return 0.0


def rounding_slack(rounding: float, normal: np.ndarray, step: float) -> float:
    """How far (mm) a position written rounded to ``rounding`` may lie from its place along ``normal``:
    rounding/2 x (|nx| + |ny| + |nz|) + POSITION_JITTER_MM; 0.0 when nothing is rounded or when that reaches a fifth
    of ``step`` (too coarse to tell a missing slice from the rounding)."""
    if rounding <= 0:
        return 0.0
    slack = rounding / 2 * float(np.sum(np.abs(normal))) + POSITION_JITTER_MM
    return slack if slack < abs(step) / 5 else 0.0


def in_plane_slack(rounding: float, row: np.ndarray, col: np.ndarray) -> float:
    """What rounding to ``rounding`` may add to a position's in-plane distance from a line fitted through the
    stack (``off_line``): the rounding error along the row or column direction, twice (the fit carries it too)."""
    return rounding * max(float(np.sum(np.abs(row))), float(np.sum(np.abs(col)))) if rounding > 0 else 0.0


def grid_fit(dist: np.ndarray) -> tuple[float, float, float]:
    """(offset, step, worst |dist[i] - offset - step i|) of the regular grid nearest, in the worst case (minimax),
    to the sorted distances ``dist`` (>= 2 values, mm). The worst deviation is convex in the step and smallest
    between the smallest and largest measured step: found there by golden-section search."""
    d = np.asarray(dist, dtype=np.float64)
    idx = np.arange(len(d), dtype=np.float64)

    def spread(b: float) -> float:
        r = d - b * idx
        return float(r.max() - r.min())

    diffs = np.diff(d)
    lo, hi = float(diffs.min()), float(diffs.max())
    g = (np.sqrt(5.0) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = spread(x1), spread(x2)
    for _ in range(200):
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            break
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = spread(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = spread(x2)
    b = (lo + hi) / 2
    r = d - b * idx
    return float((r.max() + r.min()) / 2), b, float(r.max() - r.min()) / 2


def on_grid(dist: np.ndarray, slack: float) -> bool:
    """Whether the sorted distances ``dist`` (mm) lie on one regular grid within ``slack`` mm each."""
    return len(dist) < 3 or grid_fit(dist)[2] <= slack


def grid_segments(dist: np.ndarray, slack: float) -> list[tuple[int, int]]:
    """``step_segments`` for rounded positions: maximal ranges [i, j] of steps (slices i..j+1) whose slices lie on
    one regular grid within ``slack`` (``on_grid``), from the first slice on."""
    segs: list[tuple[int, int]] = []
    n, i = len(dist), 0
    while i < n - 1:
        j = i + 1  # slices i..j
        while j + 1 < n and on_grid(dist[i:j + 2], slack):
            j += 1
        segs.append((i, j - 1))
        i = j
    return segs


def fitted_positions(positions: np.ndarray) -> np.ndarray:
    """(N, 3) positions on the straight line fitted (least squares, each component against the slice index)
    through ``positions``: equal steps, the slice line (and a gantry tilt's shear) kept."""
    pos = np.asarray(positions, dtype=np.float64)
    if len(pos) < 2:
        return pos.copy()
    idx = np.arange(len(pos), dtype=np.float64)
    design = np.stack([np.ones(len(pos)), idx - idx.mean()], axis=1)
    coef, *_ = np.linalg.lstsq(design, pos, rcond=None)
    return design @ coef  # type: ignore[no-any-return]


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
