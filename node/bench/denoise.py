"""``srnode bench denoise``: self-supervised denoising against Gaussian and bilateral baselines on real CT.

1. The 1 mm head phantom with added Gaussian noise of known level: SNR gain (dB, rms error before / after, body
   voxels) and HU bias against the series as acquired.
2. The real 5 mm reconstruction of the same acquisition as a low-noise reference for the 1 mm series: noise
   (std in flat tissue regions of the reference, measured as the difference to the reference after removing its
   local mean), the SNR gain that gives, and HU bias of each method against the 5 mm reference.
Figures go to bench/results/denoise-*.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.denoise import denoise
from models.engine import Device, EngineOptions, VolumeInput
from node.app.progress import bar_of
from node.bench.results import write_result

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repository


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench denoise`` options to ``parser``."""
    parser.add_argument("--data", default=str(DATA), help="the shared real-data folder")
    parser.add_argument("--crop", type=int, default=256, help="central in-plane crop (pixels)")
    parser.add_argument("--slices", type=int, default=30, help="central slices of the 1 mm series")
    parser.add_argument("--noise", type=float, nargs="+", default=[10.0, 25.0], help="added noise levels, HU")
    parser.add_argument("--steps", type=int, default=300, help="denoiser training steps")
    parser.add_argument("--device", choices=[d.value for d in Device], default="auto")


def _gauss(vol: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.asarray(gaussian_filter(vol, sigma=(0, sigma, sigma), mode="reflect"), dtype=np.float32)


def _bilateral(vol: np.ndarray, sigma_s: float, sigma_r: float, radius: int = 2) -> np.ndarray:
    """Per-slice bilateral filter (square window, reflect edges)."""
    p = np.pad(vol, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    h, w = vol.shape[1:]
    num = np.zeros_like(vol, dtype=np.float64)
    den = np.zeros_like(num)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            nb = p[:, radius + dy : radius + dy + h, radius + dx : radius + dx + w]
            wgt = math.exp(-(dy * dy + dx * dx) / (2 * sigma_s**2)) * np.exp(-((nb - vol) ** 2) / (2 * sigma_r**2))
            num += wgt * nb
            den += wgt
    return (num / den).astype(np.float32)


def _load(name: str, data: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    from node.series import load_series

    v = load_series(sorted(p for p in (data / name).rglob("*") if p.is_file()))
    return v.data, v.positions @ v.normal, v


def _methods(noisy: np.ndarray, sigma_n: float, args: argparse.Namespace) -> dict[str, tuple[np.ndarray, float]]:
    out: dict[str, tuple[np.ndarray, float]] = {}
    t = time.perf_counter()
    vol = VolumeInput(noisy, (1.0, 0.45, 0.45), 1.0, "CT", (-1024.0, 3071.0))
    d, _, rep = denoise(vol, EngineOptions(device=Device(args.device), finetune_steps=args.steps, seed=0))
    out["selfsup_n2s"] = (d, time.perf_counter() - t)
    t = time.perf_counter()
    out["gaussian_1px"] = (_gauss(noisy, 1.0), time.perf_counter() - t)
    t = time.perf_counter()
    out["bilateral"] = (_bilateral(noisy, 1.5, 2.0 * max(sigma_n, 1.0)), time.perf_counter() - t)
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench denoise``; returns the exit code. VolumeError when the shared series are absent."""
    data = Path(args.data)
    thin, pos1, _ = _load("ct_head_phantom_philips_1mm", data)
    c = args.crop
    y0, x0 = (thin.shape[1] - c) // 2, (thin.shape[2] - c) // 2
    z0 = (thin.shape[0] - args.slices) // 2
    sl = (slice(z0, z0 + args.slices), slice(y0, y0 + c), slice(x0, x0 + c))
    clean = thin[sl]
    body = clean > -500
    figures: dict[str, Any] = {"crop": list(clean.shape), "added_noise": {}}
    rng = np.random.default_rng(0)
    bar = bar_of(args)
    for level in args.noise:
        bar.stage(f"added noise {level:g} HU", len(args.noise) + 1)
        noisy = (clean + rng.normal(0.0, level, clean.shape)).astype(np.float32)
        before = float(np.sqrt(np.mean((noisy - clean)[body] ** 2)))
        row: dict[str, Any] = {}
        for name, (out, secs) in _methods(noisy, level, args).items():
            err = (out - clean)[body]
            row[name] = {"snr_gain_db": round(20 * math.log10(before / float(np.sqrt(np.mean(err**2)))), 2),
                         "hu_bias": round(float(err.mean()), 2), "seconds": round(secs, 1)}
        figures["added_noise"][f"{level:g}HU"] = row
        print(f"added noise {level:g} HU: " + ", ".join(f"{k} {v['snr_gain_db']:+.2f} dB bias {v['hu_bias']:+.2f} HU"
                                                    for k, v in row.items()), flush=True)
    # real: the 1 mm series against its own 5 mm reconstruction (low noise), at the 5 mm slice positions
    bar.stage("real 1 mm vs 5 mm")
    thick, pos5, _ = _load("ct_head_phantom_philips_5mm", data)
    near = [int(np.argmin(np.abs(pos1 - p))) for p in pos5]
    keep = [i for i, j in enumerate(near) if abs(pos1[j] - pos5[i]) < 0.05 and 2 <= j < thin.shape[0] - 2]
    keep = keep[len(keep) // 2 - 4 : len(keep) // 2 + 4]
    idx1 = np.array([near[i] for i in keep])
    stack = np.concatenate([thin[j - 2 : j + 3] for j in idx1])[:, y0 : y0 + c, x0 : x0 + c]  # 5 slices each
    ref = thick[keep][:, y0 : y0 + c, x0 : x0 + c]
    grad = np.hypot(*np.gradient(_gauss(ref, 2.0), axis=(1, 2)))
    flat = (ref > -300) & (ref < 300) & (grad < 2.0)
    centre = stack[2::5]
    hp_ref = ref - _gauss(ref, 3.0)
    noise_1mm = float(np.std(((centre - _gauss(centre, 3.0)) - hp_ref)[flat]))
    real: dict[str, Any] = {"flat_voxels": int(flat.sum()), "noise_1mm_hu": round(noise_1mm, 2),
                            "bias_1mm_vs_5mm_hu": round(float((centre - ref)[flat].mean()), 2)}
    for name, (out, secs) in _methods(stack, noise_1mm, args).items():
        o = out[2::5]
        n = float(np.std(((o - _gauss(o, 3.0)) - hp_ref)[flat]))
        real[name] = {"noise_hu": round(n, 2), "snr_gain_db": round(20 * math.log10(noise_1mm / n), 2),
                      "hu_bias_vs_5mm": round(float((o - ref)[flat].mean()), 2),
                      "hu_shift_vs_1mm": round(float((o - centre)[flat].mean()), 2), "seconds": round(secs, 1)}
    figures["real_5mm_reference"] = real
    print("real 1 mm vs 5 mm reference: " + ", ".join(
        f"{k} noise {v['noise_hu']} HU ({v['snr_gain_db']:+.2f} dB) bias {v['hu_bias_vs_5mm']:+.2f}"
        for k, v in real.items() if isinstance(v, dict)) + f"; 1 mm noise {noise_1mm:.1f} HU", flush=True)
    print(f"wrote {write_result('denoise', figures)}")
    return 0
