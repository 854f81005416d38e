"""Self-supervised denoising (Noise2Self / blind-spot), trained on the series itself: no clean data needed.

``denoise(volume, options) -> (data, sigma, report)`` is a pipeline step (``denoise = true`` on a rule), run
before super-resolution or instead of it.

- A small 2.5D CNN sees three adjacent slices and predicts the centre one. Training is J-invariant: on a random
  grid of 1 pixel in 4 the centre slice's value is replaced by the mean of its 8 neighbours, and the loss is
  taken on those pixels only, so the net cannot copy a pixel's own noise and learns E[pixel | surroundings];
  the output is assembled J-invariantly too (4 passes, each predicting one grid phase from a masked input).
- Means are preserved: the low frequencies of what the net removed (Gaussian, ``MEAN_SIGMA_PX``) are added back,
  so every region larger than a few pixels keeps its HU mean exactly up to the removed high-frequency noise.
- σ: the held-out J-invariant error, less the input's noise variance (MAD of pixel differences), gives the denoiser's mean squared error against the unknown clean image
  (E(f_J(x) - x)^2 = E(f - clean)^2 + σ_noise^2); it is spread over voxels in proportion to the local noise level.
torch + numpy only.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.engine import EngineOptions, VolumeInput

log = logging.getLogger(__name__)

MEAN_SIGMA_PX = 3.0  # scale above which the output keeps the input's local mean
GRID = 2  # one masked pixel per GRID x GRID block (GRID^2 passes make the J-invariant output)
PATCH = 64


class BlindNet(nn.Module):
    """(B, 3, H, W) adjacent slices (centre masked during training) -> (B, 1, H, W) centre slice."""

    def __init__(self, width: int = 24, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:2] + self.body(x)  # residual over the centre slice, whose J pixels are masked


_NEIGHBOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]).view(1, 1, 3, 3) / 8.0


def _mask(x: torch.Tensor, gen: torch.Generator | None, phase: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a 1-in-GRID^2 grid of centre-slice pixels (random phase with ``gen``) by their 8-neighbour mean;
    returns (input, mask). The output at masked pixels never sees their own values (J-invariance)."""
    b, _, h, w = x.shape
    py, px = (int(v) for v in torch.randint(0, GRID, (2,), generator=gen)) if gen is not None else phase
    m = torch.zeros((1, 1, h, w), dtype=x.dtype)
    m[..., py::GRID, px::GRID] = 1.0
    m = m.to(x.device)
    centre = x[:, 1:2]
    ring = F.conv2d(F.pad(centre, (1, 1, 1, 1), mode="reflect"), _NEIGHBOURS.to(x.device, x.dtype))
    masked = centre * (1 - m) + ring * m
    return torch.cat([x[:, :1], masked, x[:, 2:]], dim=1), m.expand(b, 1, h, w)


def _stack(vol: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(len(idx), 3, Y, X): slices idx-1, idx, idx+1 (edges repeated)."""
    z = vol.shape[0]
    return np.stack([vol[np.clip(idx - 1, 0, z - 1)], vol[idx], vol[np.clip(idx + 1, 0, z - 1)]], axis=1)


def _patches(vol: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    z, h, w = vol.shape
    s = min(PATCH, h, w)
    out = np.empty((n, 3, s, s), np.float32)
    for i in range(n):
        k = int(rng.integers(z))
        y0, x0 = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        out[i] = _stack(vol[:, y0 : y0 + s, x0 : x0 + s], np.array([k]))[0]
    return out


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes (reflect), float32."""
    r = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    out = np.asarray(x, dtype=np.float32)
    for axis in (-2, -1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for j in range(2 * r + 1):
            acc += k[j] * np.take(p, np.arange(j, j + n), axis=axis)
        out = acc
    return out


def _noise_var(vol: np.ndarray) -> float:
    """Robust white-noise variance: MAD of horizontal pixel differences (edges are rare, so the median ignores them)."""
    d = (vol[:, :, 1:] - vol[:, :, :-1]).ravel() / math.sqrt(2.0)
    d = d[np.abs(d) > 0] if np.any(np.abs(d) > 0) else d  # padding / clipped air would pull the MAD to 0
    return float((np.median(np.abs(d - np.median(d))) / 0.6745) ** 2)


def denoise(volume: VolumeInput, options: EngineOptions) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Denoised data (same grid, modality units), its 1-σ error per voxel, and a report for the job record."""
    t0 = time.perf_counter()
    want_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if want_cuda else "cpu")
    torch.manual_seed(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    data = volume.data.astype(np.float32)
    c0, s = float(data.mean()), float(data.std()) or 1.0
    vol = (data - c0) / s
    z = vol.shape[0]
    steps = max(1, min(100, options.finetune_steps) if options.fast else options.finetune_steps)
    net = BlindNet().to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    held = _patches(vol, 8, np.random.default_rng(options.seed + 1))  # fixed patches for the held-out error
    for _ in range(steps):
        x = torch.from_numpy(_patches(vol, 8, rng)).to(dev)
        inp, m = _mask(x, gen)
        loss = ((net(inp) - x[:, 1:2]) ** 2 * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(held).to(dev)
        errs = []
        for _ in range(4):
            inp, m = _mask(x, gen)
            errs.append(float((((net(inp) - x[:, 1:2]) ** 2 * m).sum() / m.sum()).cpu()))
        mse_j = float(np.mean(errs))  # ~ mse(f, clean) + σ_noise^2, normalised units
        out = np.empty_like(vol)
        per = max(1, (1 << 21) // (vol.shape[1] * vol.shape[2]))
        for a in range(0, z, per):
            idx = np.arange(a, min(z, a + per))
            x = torch.from_numpy(_stack(vol, idx)).to(dev)
            acc = torch.zeros_like(x[:, 1:2])
            for phase in [(i, j) for i in range(GRID) for j in range(GRID)]:
                inp, m = _mask(x, None, phase)
                acc += net(inp) * m
            out[idx] = acc[:, 0].cpu().numpy()
    # J-invariant blend (Noise2Self calibration, per voxel): for f_J independent of a pixel's noise,
    # E(x + w (f_J - x) - clean)^2 = (1 - w)^2 s2 + w^2 e2 with e2 = E(f_J - clean)^2 = E(f_J - x)^2 - s2, smallest at
    # w = s2 / (s2 + e2); e2 estimated locally, so edges the net cannot follow keep the input
    s2 = _noise_var(vol)
    e2 = np.maximum(_gauss((out - vol) ** 2, 2.0) - s2, 0.0)
    w = s2 / (s2 + e2 + 1e-12)
    blended = vol + w * (out - vol)
    blended += _gauss(vol - blended, MEAN_SIGMA_PX)  # keep local means: only high frequencies leave
    err_map = (1 - w) ** 2 * s2 + w**2 * e2
    sigma = np.sqrt(err_map) * s
    result = blended * s + c0
    report_extra = {"mean_weight": round(float(w.mean()), 3), "heldout_mse_j": round(mse_j * s * s, 2)}
    noise_var = s2
    err_var = float(np.mean(err_map))
    if volume.value_range is not None:
        np.clip(result, volume.value_range[0], volume.value_range[1], out=result)
    report = {"denoise_steps": steps, "noise_sigma": round(math.sqrt(noise_var) * s, 3),
              "residual_sigma": round(math.sqrt(err_var) * s, 3), "device": dev.type,
              "seconds": round(time.perf_counter() - t0, 2), **report_extra}
    log.info("denoise: noise %.1f -> residual %.1f (modality units), %.1f s", report["noise_sigma"],
             report["residual_sigma"], report["seconds"])
    return result.astype(np.float32), sigma.astype(np.float32), report
