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
