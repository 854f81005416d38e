"""In-plane x f (ZSSR) pieces of ``selfsup``: pairs, the finer grid's noise, the sigma scale, and inference.

The in-plane net sees each low-matrix axial slice (``CONTEXT`` = 1, the shipped setting). With ``CONTEXT`` = 3 it
also sees the neighbours along z (z-1, z, z+1, mirrored at the ends) and the ZSSR pairs use the block means of the
same neighbours; that 2.5D variant is kept as an option because a 2.5D prior measured -1.3 dB on the phantom. On
square pixels the test-time ensemble is the 8 symmetries of the square (4 flips x transpose). torch + numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from models.cubic import mirror_index
from models.degrade import degrade_in_plane
from models.internal import PairSet, Task, TTAOp, noise_sigma, residual
from models.nets import SRNet

CONTEXT = 1  # input slices of the in-plane net: 1 = plain 2D ZSSR; 3 = 2.5D (z-1, z, z+1)


def square_pixels(spacing: tuple[float, float, float]) -> bool:
    """(dz, dy, dx) with dy == dx (to 0.1 %): the transposed slice is a valid view and training symmetry."""
    return abs(spacing[1] - spacing[2]) <= 1e-3 * spacing[2]


def context_index(z: np.ndarray, n: int, c: int) -> np.ndarray:
    """(len(z), c) slice indices z - c//2 .. z + c//2 of a stack of n slices, mirrored at the ends."""
    return mirror_index(np.asarray(z)[:, None] + np.arange(c)[None, :] - c // 2, n)


def in_plane_pairs(vol: np.ndarray, factor: int, z_idx: np.ndarray, device: torch.device, context: int = 1,
                   square: bool = False) -> list[PairSet]:
    """ZSSR pairs: the acquired axial slices ``z_idx`` of a normalised (Z, Y, X) volume (cropped to multiples of
    f) and their f x f block means; with ``context`` > 1, the block means of the neighbouring slices too."""
    task = Task(factor, factor, False)
    h, w = (vol.shape[1] // factor) * factor, (vol.shape[2] // factor) * factor
    hr = np.ascontiguousarray(vol[z_idx, :h, :w])  # (B, H, W)
    lr = degrade_in_plane(hr, factor)  # (B, h, w)
    ctx = None
    if context > 1:
        near = vol[context_index(z_idx, vol.shape[0], context), :h, :w]  # (B, C, H, W)
        ctx = torch.from_numpy(degrade_in_plane(near, factor)).to(device)  # (B, C, h, w)
    noise = (in_plane_noise(vol, factor)[1],)
    return [PairSet(torch.from_numpy(lr).to(device), torch.from_numpy(hr).to(device), task=task, noise=noise,
                    ctx=ctx, square=square)]


def in_plane_noise(vol: np.ndarray, factor: int) -> tuple[float, float]:
    """In-plane x f: sd of the noise error no engine can avoid, (on the x f target grid, on the ZSSR pairs).

    White noise of sd s on the acquired pixels means s * f on pixels f times finer (block means average f^2 of
    them); scanners' noise is often correlated (zero-filled or filtered reconstructions), and then finer pixels
    carry hardly more. The gain g = noise(acquired) / noise(their f x f block means), clipped to 1..f, measures
    that one scale down and is assumed one scale up: target error s * sqrt(g^2 - 1), pairs' error
    s * sqrt(1 - 1 / g^2) (a pixel minus its block mean).
    """
    sub = vol[:: max(1, vol.shape[0] // 16)]
    h, w = (sub.shape[1] // factor) * factor, (sub.shape[2] // factor) * factor
    sd = noise_sigma(sub)
    if h < 4 * factor or w < 4 * factor or sd <= 0:
        return 0.0, 0.0
    sd_v = noise_sigma(degrade_in_plane(np.ascontiguousarray(sub[:, :h, :w]), factor))
    g = float(np.clip(sd / max(sd_v, 1e-12), 1.0, factor))
    return sd * math.sqrt(g * g - 1.0), sd * math.sqrt(1.0 - 1.0 / (g * g))


@torch.no_grad()
def infer(net: SRNet, x: torch.Tensor, task: Task, ops: tuple[TTAOp, ...], chunk: int,
          max_pixels: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per chunk of axial slices of x (Z, Y, X): (first slice, cubic base, data-consistent output, spread of the
    residual over ``ops``), each (b, Y*f, X*f); the net sees ``net.cfg.in_ch`` slices around each one."""
    c = net.cfg.in_ch
    for b0 in range(0, x.shape[0], chunk):
        b1 = min(x.shape[0], b0 + chunk)
        xb = x[b0:b1]  # (b, Y, X)
        xin = xb if c == 1 else x[torch.from_numpy(context_index(np.arange(b0, b1), x.shape[0], c)).to(x.device)]
        rs = torch.stack([residual(net, xin, task, fl, max_pixels, tr) for fl, tr in ops])  # (n, b, Y*f, X*f)
        base = task.base(xb)
        y = task.project(base + rs.mean(0), xb)
        std = rs.std(0, unbiased=False) if len(ops) > 1 else torch.zeros_like(y)
        yield b0, base, y, std


def scale_difficulty(vol: np.ndarray, factor: int, body: float = 0.05) -> float:
    """How the x f step to the finer grid compares with the internal pairs' step, by self-similarity across
    scales: e_s = RMS body error of cubic x f from block means of block means (s times) to s - 1 times (e_1: the
    pairs). The target step's e_0 is extrapolated with the ratio r_1 = e_1 / e_2 changing geometrically across
    scales: e_0 / e_1 = r_1^2 / r_2 (r_1 alone when the matrix is too small for e_3), clipped to 0.25..4. Images
    are smoother the finer the scale when the acquisition resolves them, and then the pairs overstate the errors;
    the sigma scale from the pairs is multiplied by this ratio (1.0 when the matrix is too small to tell)."""
    sub = vol[:: max(1, vol.shape[0] // 16)]
    task = Task(factor, factor, False)

    def cubic_rms(hr: np.ndarray) -> float:  # hr (B, H, W) -> RMS of cubic(block means) - hr inside the body
        h, w = (hr.shape[1] // factor) * factor, (hr.shape[2] // factor) * factor
        if h < 8 * factor or w < 8 * factor:
            return 0.0
        hr = np.ascontiguousarray(hr[:, :h, :w])
        up = task.base(torch.from_numpy(degrade_in_plane(hr, factor))).numpy()
        m = hr > body
        return float(np.sqrt(np.mean((up - hr)[m] ** 2))) if m.sum() > 100 else 0.0

    e = [cubic_rms(sub)]
    for _ in range(2):
        sub = degrade_in_plane(sub, factor)
        e.append(cubic_rms(sub))
    if e[0] <= 0 or e[1] <= 0:
        return 1.0
    r1 = e[0] / e[1]
    ratio = r1 * r1 / (e[1] / e[2]) if e[2] > 0 else r1
    return float(np.clip(ratio, 0.25, 4.0))
