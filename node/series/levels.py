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

That ratio reads a scaling; it misses an offset. A CT slice whose values all lie 1024 HU above its neighbours' (a
RescaleIntercept of 0 stated where the others state -1024, the stored values alike) brings its air into the body
mask and read 1.20x (not reported), +500 HU 0.67x, and +200 HU 0.37x (reported as darker). So a second measure reads
the shift itself: the median over the slice's 5th..95th percentiles (``QUANTILES``) of their difference from the
mean of its two neighbours' percentiles, as a fraction of the volume's floor-to-99th-percentile range; a slice is an
offset jump when that is at least ``SHIFT_FRACTION`` (0.08) and its two neighbours' percentiles agree within
``NEIGHBOUR_SPREAD`` of the range. Measured on the 11 shared series (field19): at most 0.029 (the EPI mosaic) but
for the GE slice 66 (0.376); +1024 HU on a slice of the 5 mm phantom 0.59, +200 HU 0.12. The note of a slice both
measures flag in the same direction is the ratio's; a ratio flagging the other direction than the shift, or the
shift alone, gives the shift's note: "x times its neighbours'" when a line through the percentiles has a gain off 1
(an MR slice scaled 1.5x or 0.6x, under the ratio's 2x bar: 0.128 / -0.105 of the range on the shared MPRAGE), else
an offset in modality units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

JUMP_RATIO = 2.0  # a slice's level over (or under 1 /) its neighbours' mean that is reported
NEIGHBOUR_AGREEMENT = 1.2  # the two neighbours' levels within this ratio of each other (a smooth stack there)
MASK_FRACTION = 0.1  # voxels above floor + this x (99th percentile - floor) count towards a slice's level
QUANTILES = np.linspace(0.05, 0.95, 19)  # the percentiles whose shift from the neighbours' is an offset jump
SHIFT_FRACTION = 0.08  # the median shift, over the volume's floor-to-99th-percentile range, that is reported
QUANTILE_SAMPLES = 16384  # about this many pixels of a slice (every k-th row and column) give its percentiles
GAIN_OFF = 0.15  # a shifted slice whose percentiles are this far from 1x its neighbours' is said to be scaled
NEIGHBOUR_SPREAD = 0.05  # the two neighbours' percentiles agree within this fraction of that range


def level_jumps(data: np.ndarray, names: Sequence[str]) -> list[str]:
    """Notes naming each slice of ``data`` ((Z, Y, X) modality values, NaN allowed) whose level is ``JUMP_RATIO``
    times (or under 1 / ``JUMP_RATIO`` of) its two agreeing neighbours', or whose values are shifted from theirs
    by ``SHIFT_FRACTION`` of the volume's range (``names[z]``: slice z's file, or file and frame). Empty for fewer than 3 slices. Values only are read; nothing is changed."""
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
    quant = np.full((data.shape[0], QUANTILES.size), np.nan)
    step = max(1, int(np.ceil(np.sqrt(data.shape[1] * data.shape[2] / QUANTILE_SAMPLES))))
    for z in range(data.shape[0]):
        sample = data[z, ::step, ::step].astype(np.float64)  # every step-th pixel: percentiles, not details
        if np.isfinite(sample).any():
            quant[z] = np.nanquantile(sample, QUANTILES)
    span = top - floor
    notes = []
    for z in range(1, data.shape[0] - 1):
        shift = float(np.median(quant[z] - 0.5 * (quant[z - 1] + quant[z + 1])))
        spread = float(np.median(np.abs(quant[z - 1] - quant[z + 1])))
        offset = np.isfinite(shift) and np.isfinite(spread) and abs(shift) >= SHIFT_FRACTION * span and \
            spread <= NEIGHBOUR_SPREAD * span
        a, b, c = levels[z - 1], levels[z], levels[z + 1]
        ratio = float("nan")
        if np.all(np.isfinite([a, b, c])) and min(a, c) > 0 and max(a, c) <= NEIGHBOUR_AGREEMENT * min(a, c):
            ratio = b / (0.5 * (a + c))
        scaled = ratio >= JUMP_RATIO or ratio <= 1.0 / JUMP_RATIO
        # a slice brighter by an offset can read darker by the ratio (its air enters the body mask): the shift says
        disagree = scaled and np.isfinite(shift) and abs(shift) >= NEIGHBOUR_SPREAD * span and \
            (ratio > 1) != (shift > 0)
        if disagree or (offset and not scaled):
            notes.append(_shift_note(names[z], shift, quant[z], 0.5 * (quant[z - 1] + quant[z + 1])))
        elif scaled:
            notes.append(f"image {names[z]}: its level is {ratio:.1f}x its two neighbours' (as stored, after its own "
                         "rescale): a slice-level intensity jump (an artefact, or a scaling its header does not "
                         "state) that the derived slices around it carry")
    return notes


def _shift_note(name: str, shift: float, own: np.ndarray, theirs: np.ndarray) -> str:
    """The note of a slice whose percentiles ``own`` lie ``shift`` (median, modality units) from ``theirs`` (its
    two neighbours' mean): worded as a scaling when a line through them (own = g x theirs + o) has a gain g off 1
    by more than ``GAIN_OFF`` and explains most of the shift (an MR slice 1.5x its neighbours'), else as an
    offset (a CT slice 1024 HU off: g about 1)."""
    gain, off = np.polyfit(theirs, own, 1) if np.ptp(theirs) > 0 else (1.0, shift)
    if abs(gain - 1.0) > GAIN_OFF and abs(off) < 0.5 * abs(shift):
        return (f"image {name}: its values are {gain:.2g}x its two neighbours' across the slice (its 5th to 95th "
                "percentiles against theirs; as stored, after its own rescale): a slice-level intensity jump (an "
                "artefact, or a scaling its header does not state) that the derived slices around it carry")
    return (f"image {name}: its values lie {shift:+.4g} (modality units) from its two neighbours' across the slice "
            "(the median shift of its 5th to 95th percentiles; as stored, after its own rescale): a slice-level "
            "offset (a rescale intercept its header states wrongly, an artefact) that the derived slices around it "
            "carry")
