"""The degradation model: how the scanner turned a fine object into the slices we were given.

Everything the self-supervised engines learn rests on this model matching the acquisition, so it is explicit,
logged (``DegradationModel.describe``) and built from the series geometry only:

- through-plane: each acquired slice is the object convolved along z with the slice profile (a box or a Gaussian
  whose FWHM is SliceThickness), sampled every slice step (from the positions); gaps and overlaps follow from
  thickness != step;
- in-plane (low matrix): each acquired pixel is the mean of an f x f block of fine pixels (area sampling), which
  matches the pixel-centre convention of ``models.engine``.

Public helpers (used by ``selfsup`` and the diffusion engine): ``slice_profile``, ``blur_axis``,
``degrade_through_plane``, ``degrade_in_plane``, ``resample_profile``, ``make_pairs``, ``DegradationModel``.
numpy (+ ``models.cubic``) only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from models.cubic import mirror_index, resample_axis
from models.engine import Factors, VolumeInput

log = logging.getLogger(__name__)

PROFILES = ("box", "gaussian")
# the output slices' FWHM for a gap acquisition (``DegradationModel.target_mm``): "per_slice" (thickness / f, as
# for contiguous slabs; the in-plane pixels the pairs come from carry their own blur) or "thickness" (the stated
# thickness; measured, not kept: -1.03 dB on the decimated phantom, +0.07 dB on the abdomen; docs/engines.md
# 2026-12-03)
GAP_TARGET = "per_slice"


def slice_profile(fwhm_px: float, kind: str = "box") -> np.ndarray:
    """Discrete slice profile: the continuous profile (FWHM ``fwhm_px`` samples) integrated over unit sample bins.

    Odd length, centred, sums to 1. A box of FWHM 1 is the identity; a box of FWHM 2 is (1/4, 1/2, 1/4).
    """
    if kind not in PROFILES:
        raise ValueError(f"slice profile {kind!r} is not one of {PROFILES}")
    if fwhm_px <= 1e-6:
        return np.ones(1)
    if kind == "box":
        half = fwhm_px / 2.0
        r = int(math.ceil(half - 0.5 + 1e-9))
        edges = np.arange(-r, r + 2) - 0.5  # bin edges of samples -r..r
        clipped = np.clip(edges, -half, half)
        w = np.diff(clipped)
    else:
        sigma = fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        r = max(1, int(math.ceil(3.5 * sigma)))
        edges = (np.arange(-r, r + 2) - 0.5) / (sigma * math.sqrt(2.0))
        cdf = 0.5 * (1.0 + np.array([math.erf(e) for e in edges]))
        w = np.diff(cdf)
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def blur_axis(data: np.ndarray, axis: int, kernel: np.ndarray, at: np.ndarray | None = None) -> np.ndarray:
    """Convolve ``data`` along ``axis`` with a centred odd ``kernel`` (mirror boundaries), float64 math.

    ``at``: only the output samples at these indices along ``axis`` (the same values, less work)."""
    if kernel.size == 1:
        return np.array(data if at is None else np.take(data, at, axis=axis), dtype=np.float32, copy=True)
    x = np.moveaxis(np.asarray(data, dtype=np.float64), axis, 0)
    n, r = x.shape[0], kernel.size // 2
    base = np.arange(n) if at is None else np.asarray(at)
    out = np.zeros((base.size, *x.shape[1:]), dtype=np.float64)
    for j, w in enumerate(kernel):
        out += w * x[mirror_index(base + j - r, n)]
    return np.moveaxis(out, 0, axis).astype(np.float32)


def degrade_through_plane(
    vol: np.ndarray, factor: int, thickness: float, axis: int = 0, profile: str = "box"
) -> np.ndarray:
    """Thick slices from fine ones: blur along ``axis`` with the profile (FWHM ``thickness`` in fine samples),
    keep samples 0, f, 2f, ... (node-aligned: the engine's output slice k*f lies at the kept slice k).

    (N,...) -> ((N-1)//f + 1, ...), float32. The step is ``factor`` fine samples; thickness != factor models
    gaps (thickness < step) or overlap (thickness > step).
    """
    idx = np.arange(0, vol.shape[axis], factor)
    return blur_axis(vol, axis, slice_profile(thickness, profile), at=idx)


def degrade_in_plane(img: np.ndarray, factor: int) -> np.ndarray:
    """Low matrix from a fine one: mean of f x f blocks over the last two axes (cropped to multiples of f)."""
    if factor == 1:
        return np.asarray(img, dtype=np.float32)
    *lead, h, w = img.shape
    h2, w2 = (h // factor) * factor, (w // factor) * factor
    x = np.asarray(img[..., :h2, :w2], dtype=np.float64)
    x = x.reshape(*lead, h2 // factor, factor, w2 // factor, factor).mean(axis=(-3, -1))
    return x.astype(np.float32)


def through_plane_matrix(n_lr: int, factor: int, thickness: float, profile: str = "box") -> np.ndarray:
    """The linear map D (n_lr x n_fine) of ``degrade_through_plane`` along one axis of n_fine=(n_lr-1)*f+1."""
    n = (n_lr - 1) * factor + 1
    k = slice_profile(thickness, profile)
    r = k.size // 2
    d = np.zeros((n_lr, n))
    for i in range(n_lr):
        for j, w in enumerate(k):
            d[i, mirror_index(np.array([i * factor + j - r]), n)[0]] += w
    return d


def resample_profile(
    img: np.ndarray, axis: int, src_spacing: float, fwhm_mm: float, out_spacing: float, profile: str = "box"
) -> np.ndarray:
    """Image of a physical slice profile: blur along ``axis`` with FWHM ``fwhm_mm`` (measured on the source grid
    of ``src_spacing`` mm), then sample every ``out_spacing`` mm from the first sample (cubic B-spline)."""
    blurred = blur_axis(img, axis, slice_profile(fwhm_mm / src_spacing, profile))
    n = img.shape[axis]
    length = (n - 1) * src_spacing
    pos = np.arange(0.0, length + 1e-6, out_spacing) / src_spacing
    if np.allclose(pos, np.round(pos)) and abs(out_spacing - src_spacing) < 1e-9:
        return blurred
    return resample_axis(blurred, axis, pos).astype(np.float32)


@dataclass(frozen=True)
class DegradationModel:
    """Through-plane: profile of FWHM ``thickness_mm`` sampled every ``step_mm``; output grid ``step_mm / factor``.
    In-plane: f x f block means of pixels ``pixel_mm``."""

    factor: int
    in_factor: int
    step_mm: float
    thickness_mm: float
    pixel_mm: float  # finest in-plane spacing, the source of through-plane training pairs
    profile: str = "box"

    @classmethod
    def from_volume(cls, volume: VolumeInput, factors: Factors) -> DegradationModel:
        dz, dy, dx = volume.spacing
        thick = volume.slice_thickness if volume.slice_thickness > 0 else dz
        return cls(factors.through_plane, factors.in_plane, dz, thick, min(dy, dx), volume.profile)

    @property
    def fine_mm(self) -> float:
        return self.step_mm / self.factor

    @property
    def thickness_fine_px(self) -> float:
        """Slice FWHM in samples of the output grid (what data consistency re-applies)."""
        return self.thickness_mm / self.fine_mm

    @property
    def gap(self) -> bool:
        """Whether the slices leave gaps: the stated thickness is under the step between them (beyond 1 %)."""
        return self.step_mm - self.thickness_mm > max(1e-3, 0.01 * self.thickness_mm)

    @property
    def target_mm(self) -> float:
        """FWHM (mm) of the output slices the engine aims at, and of the training pairs' targets: thickness / f
        (``GAP_TARGET`` "thickness": the stated thickness itself for a gap acquisition)."""
        if self.gap and GAP_TARGET == "thickness":
            return self.thickness_mm
        return self.thickness_mm / self.factor

    @property
    def dc_fwhm_px(self) -> float:
        """FWHM in output samples of the discrete profile D that maps the output slices to the acquired ones (what
        data consistency re-applies, and what makes the training pairs' inputs from their targets): the thickness
        for contiguous or overlapping slabs; 0 for a gap acquisition (thickness < step), whose acquired slices are
        output slices as they are (D picks every f-th one). It was a box of the thickness there too, as if the
        slab filled its step: data consistency then moved each acquired slice by what its neighbours differ
        (35 HU on a 2 mm / 3 mm DICOM phantom) and the self-check's pairs had blurred inputs the series has not
        (the decimated abdomen: self-check +1.65 dB, output 2.23 dB under cubic; docs/engines.md 2026-12-03)."""
        return 0.0 if self.gap else self.thickness_fine_px

    def describe(self) -> str:
        gap = self.step_mm - self.thickness_mm
        tol = max(1e-3, 0.01 * self.thickness_mm)  # a step within 1 % of the thickness touches (4.002 mm / 4 mm)
        kind = (f"gap {gap:.3g} mm" if gap > tol else f"overlap {-gap:.3g} mm" if gap < -tol else "contiguous")
        return (
            f"through-plane x{self.factor}: {self.profile} profile FWHM {self.thickness_mm:.3g} mm, step "
            f"{self.step_mm:.4g} mm ({kind}), output grid {self.fine_mm:.3g} mm of FWHM {self.target_mm:.3g} mm; "
            "training pairs from in-plane "
            f"pixels {self.pixel_mm:.3g} mm; in-plane x{self.in_factor}: {self.in_factor}x{self.in_factor} "
            "block means"
        )


def make_pairs(
    images: np.ndarray, model: DegradationModel, src_spacing: float | None = None, lr_profile: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Through-plane training pairs from fine in-plane images (B, H, W): degrade along axis 1 (H).

    hr: the object on the output grid (step/f) seen through a profile of FWHM ``model.target_mm`` (thickness/f,
    what a scanner would give at the output spacing);
    lr = ``degrade_through_plane(hr, f, model.dc_fwhm_px)``: exactly the operator that data consistency re-applies
    (thickness / fine step; for a gap acquisition every f-th target slice as it is). Returns lr (B, n, W) and
    hr (B, (n-1)*f + 1, W), float32. To train along W as well, pass the images transposed.
    ``lr_profile`` (one of ``PROFILES``): lr made instead from ``images`` themselves through a profile of that kind
    and FWHM ``model.thickness_mm`` on their own (finer) grid, sampled every ``model.step_mm`` (row k at hr row k*f):
    the thick slices as a scanner with that profile would integrate them. With the model's own kind this equals D's
    output on contiguous box slabs (a 2-sample box of 1-sample boxes is a 2-sample box); with another kind of the
    same FWHM the pairs' errors include the engine's error under a slice profile other than it assumes
    (``selfsup.VAL_PAIRS_LR``).
    """
    src = model.pixel_mm if src_spacing is None else src_spacing
    f = model.factor
    hr = resample_profile(images, 1, src, model.target_mm, model.fine_mm, model.profile)
    n_lr = (hr.shape[1] - 1) // f + 1
    hr = hr[:, : (n_lr - 1) * f + 1]
    lr = degrade_through_plane(hr, f, model.dc_fwhm_px, axis=1, profile=model.profile)
    if lr_profile is not None:  # the end rows stay D's: the two mirror their ends differently (only the first and
        # last row differ on a smooth image, by up to 6 % of its range)
        lr[:, 1:-1] = resample_profile(images, 1, src, model.thickness_mm, model.step_mm, lr_profile)[:, 1 : n_lr - 1]
    return np.ascontiguousarray(lr), np.ascontiguousarray(hr)
