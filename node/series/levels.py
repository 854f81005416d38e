"""A slice whose intensity level jumps away from both of its neighbours (``level_jumps``): a spike or burst
artefact, a slice reconstructed or scaled apart from the rest (a rescale its header does not state), a slice from
another acquisition filed among these. The volume is derived as it is (the values are the stored ones, read with
each slice's own rescale), but its report says which image, since the derived slices around it carry the jump into
positions that were never acquired that way.

Measure (as ``bench/e18b_slice_outliers.py``): per slice, the mean of its values over the volume's floor plus
``MASK_FRACTION`` of the floor-to-99th-percentile range (the body, not the air); a slice is a jump when its mean is
``JUMP_RATIO`` times (or 1 / ``JUMP_RATIO`` of) the mean of its two neighbours' and those two agree within
``NEIGHBOUR_AGREEMENT``. Measured on the shared series: 4.01 for the GE 3D T1's InstanceNumber 66 (5x brighter as
stored), 1.01-1.25 for every other slice of every other series (bench/results/e18b-sliceoutliers-shared-20261203.json).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

JUMP_RATIO = 2.0  # a slice's level over (or under 1 /) its neighbours' mean that is reported
NEIGHBOUR_AGREEMENT = 1.2  # the two neighbours' levels within this ratio of each other (a smooth stack there)
MASK_FRACTION = 0.1  # voxels above floor + this x (99th percentile - floor) count towards a slice's level


def level_jumps(data: np.ndarray, names: Sequence[str]) -> list[str]:
    """Notes naming each slice of ``data`` ((Z, Y, X) modality values, NaN allowed) whose level is ``JUMP_RATIO``
    times (or under 1 / ``JUMP_RATIO`` of) its two agreeing neighbours' (``names[z]``: slice z's file, or file and
    frame). Empty for fewer than 3 slices. Values only are read; nothing is changed."""
    if data.shape[0] < 3 or not np.isfinite(data).any():
        return []
    floor = float(np.nanmin(data))
    top = float(np.nanpercentile(data, 99))
    if not top > floor:
        return []
    shifted = data - floor
    thr = MASK_FRACTION * (top - floor)
    levels = np.full(data.shape[0], np.nan)
    for z in range(data.shape[0]):
        s = shifted[z]
        body = s[s > thr]
        if body.size:
            levels[z] = float(body.mean())
    notes = []
    for z in range(1, data.shape[0] - 1):
        a, b, c = levels[z - 1], levels[z], levels[z + 1]
        if not np.all(np.isfinite([a, b, c])) or min(a, c) <= 0 or max(a, c) > NEIGHBOUR_AGREEMENT * min(a, c):
            continue
        ratio = b / (0.5 * (a + c))
        if ratio >= JUMP_RATIO or ratio <= 1.0 / JUMP_RATIO:
            notes.append(f"image {names[z]}: its level is {ratio:.1f}x its two neighbours' (as stored, after its own "
                         "rescale): a slice-level intensity jump (an artefact, or a scaling its header does not "
                         "state) that the derived slices around it carry")
    return notes
