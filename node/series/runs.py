"""Slice steps: when a stack is a regular grid, how to describe it when not, and splitting it into regular runs.

Decision for irregular stacks (the tilted GE head: 4.0 mm x13, one 1.08 mm step, 7.0 mm x13): nothing is
resampled across a step change. ``regular_runs`` cuts the stack where the step changes; each run of at least
``MIN_SLICES_THROUGH_PLANE`` slices is super-resolved through-plane as its own derived series ("run 1/2", ...).
A lone odd step between two runs belongs to neither. ``check_through_plane`` refuses, with the steps in the
message, a stack that is still irregular.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from node.errors import VolumeError
from node.series.steps import MIN_SLICES_THROUGH_PLANE, describe_steps, step_segments
from node.series.volume import SeriesVolume


def regular_runs(vol: SeriesVolume) -> list[SeriesVolume]:
    """A regular volume as itself; an irregular one cut into regular runs (``run = (index, count)``)."""
    if not vol.irregular:
        return [vol]
    runs: list[SeriesVolume] = []
    last = -1  # last slice already in a run
    for i, j in step_segments(vol.steps):
        a, b = max(i, last + 1), j + 1  # steps i..j join slices i..j+1
        if b - a < 1 or (j == i and len(vol.steps) > 1):
            continue  # nothing left, or a lone odd step between runs
        runs.append(_subvolume(vol, a, b))
        last = b
    for k, r in enumerate(runs):
        r.run = (k + 1, len(runs))
        r.part = vol.part + k
    return runs


def _subvolume(vol: SeriesVolume, a: int, b: int) -> SeriesVolume:
    """Slices a..b (inclusive) of ``vol`` as a regular volume of their own."""
    sl = slice(a, b + 1)
    steps = vol.steps[a:b]
    med = float(np.median(steps)) if len(steps) else vol.spacing[0]
    thick = vol.slice_thickness
    hdr = vol.datasets[a]
    if "SliceThickness" in hdr and not vol.multiframe:
        thick = float(hdr.SliceThickness or 0)
    return dataclasses.replace(
        vol,
        data=vol.data[sl],
        spacing=(med, vol.spacing[1], vol.spacing[2]),
        slice_thickness=thick,
        positions=vol.positions[sl],
        datasets=vol.datasets[sl],
        frame_numbers=vol.frame_numbers[sl] if vol.frame_numbers else [],
        steps=steps,
        irregular=False,
        notes=vol.notes + [f"regular run of slices {a + 1}..{b + 1} at {med:.2f} mm"],
    )


def check_through_plane(vol: SeriesVolume, factor: int) -> None:
    """VolumeError when ``vol`` cannot be super-resolved through-plane by ``factor``."""
    if factor <= 1:
        return
    if vol.shape[0] < MIN_SLICES_THROUGH_PLANE:
        raise VolumeError(f"{vol.name}: {vol.shape[0]} slice(s); through-plane super-resolution "
                          f"needs at least {MIN_SLICES_THROUGH_PLANE}")
    if vol.irregular:
        raise VolumeError(f"{vol.name}: slice steps are irregular ({describe_steps(vol.steps)}); "
                          "they do not lie on one regular grid")
