"""Slice-profile width from the data: the through-plane FWHM that makes in-plane lines look like z lines.

SMORE / ECLARE's premise is that the object is (statistically) isotropic, so the spectrum along z of the acquired
thick slices equals the spectrum along y or x of the in-plane images after the same slice profile and sampling.
``estimate_fwhm`` tries candidate FWHMs (a box or Gaussian of width ``ratio`` x SliceThickness), degrades central
in-plane lines with each one exactly as ``models.degrade.resample_profile`` does for the training pairs, and picks
the width whose mean Welch power spectrum (Hann windows of the z length) matches the z spectrum best in shape
(least squares of the log spectra above the lowest bins, after removing the best constant: anatomy may differ in
contrast between axes, not in how fast detail fades). numpy (+ ``models.degrade``) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.degrade import resample_profile

RATIOS = tuple(float(r) for r in np.round(np.arange(0.5, 1.81, 0.1), 2))  # candidate FWHM / SliceThickness


@dataclass(frozen=True)
class ProfileFit:
    """``fwhm_mm``: the chosen FWHM; ``ratio``: it over the assumed thickness; ``cost``: per candidate ratio."""

    fwhm_mm: float
    ratio: float
    cost: dict[float, float]


def _welch(lines: np.ndarray, n: int) -> np.ndarray:
    """Mean power spectrum (n // 2 + 1 bins) of the length-n Hann-windowed, de-meaned segments of ``lines``
    (L, M), M >= n: segments start every n // 2 samples."""
    win = np.hanning(n + 2)[1:-1]
    segs = [lines[:, s : s + n] for s in range(0, lines.shape[1] - n + 1, max(1, n // 2))]
    x = np.concatenate(segs, axis=0).astype(np.float64)
    x = (x - x.mean(axis=1, keepdims=True)) * win
    return (np.abs(np.fft.rfft(x, axis=1)) ** 2).mean(axis=0)


def estimate_fwhm(
    vol: np.ndarray, spacing: tuple[float, float, float], thickness_mm: float, profile: str = "box",
    ratios: tuple[float, ...] = RATIOS, n_slices: int = 12, lo_bin: int = 2,
) -> ProfileFit:
    """The slice FWHM (mm) of a (Z, Y, X) volume with slice step ``spacing[0]`` mm and in-plane pixels
    ``spacing[1:]`` mm, among ``ratios`` x ``thickness_mm``. Needs Z >= 8 and in-plane extents >= 2 Z steps
    (else ValueError). Uses the central half of the matrix (background-free in most series), ``n_slices``
    axial slices spread over Z, lines along y and along x."""
    z, y, x = vol.shape
    dz, dy, dx = spacing
    if z < 8:
        raise ValueError(f"profile estimation needs >= 8 slices, got {z}")
    cy, cx = slice(y // 4, y - y // 4), slice(x // 4, x - x // 4)
    core = np.asarray(vol[:, cy, cx], dtype=np.float64)
    zlines = core.reshape(z, -1).T  # (columns, Z)
    p_zs: dict[int, np.ndarray] = {}
    idx = np.unique(np.linspace(0, z - 1, min(n_slices, z)).round().astype(int))
    imgs = np.asarray(vol[idx], dtype=np.float32)
    band = slice(lo_bin, None)
    cost: dict[float, float] = {}
    for r in ratios:
        fw = r * thickness_mm
        lines = []
        for arr, axis, src in ((imgs[:, :, cx], 1, dy), (imgs[:, cy, :], 2, dx)):
            lr = resample_profile(arr, axis, src, fw, dz, profile)  # sampled every dz mm along axis
            lr = np.moveaxis(lr, axis, -1)
            lines.append(lr.reshape(-1, lr.shape[-1]))
        m = min(ln.shape[1] for ln in lines)
        n = min(z, m, 64)  # Welch segment length (samples of dz)
        if n < 8:
            raise ValueError(f"in-plane extent ({m} samples at {dz} mm) too short for a spectrum")
        p_z = p_zs.setdefault(n, _welch(zlines, n))
        p_xy = _welch(np.concatenate([ln[:, :m] for ln in lines]), n)
        d = np.log(p_xy[band] + 1e-20) - np.log(p_z[band] + 1e-20)
        cost[r] = float(np.mean((d - d.mean()) ** 2))
    best = min(cost, key=lambda k: cost[k])
    return ProfileFit(best * thickness_mm, best, cost)
