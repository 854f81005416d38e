"""The ``diffusion`` engine: few-step conditional diffusion over the cubic upsample, σ from K samples.

Method (ResShift-style residual shifting, in residual space):
- the network predicts the residual r0 = truth - cubic(lr) (normalised), conditioned on cubic(lr);
- forward process x_t = (1 - eta_t) r0 + kappa sqrt(eta_t) eps, eta_1 ~ 0 .. eta_T ~ 1 (T <= 15 steps), so the
  chain starts from kappa-scaled noise around the cubic upsample and ends on the restored residual;
- trained self-supervised on the series' own through-plane pairs (``models.degrade.make_pairs``: in-plane
  pixels degraded with the slice profile and step), starting from the shipped prior
  models/weights/diffusion_prior.pt when present (fine-tuned ``finetune_steps``; ``fast`` skips fine-tuning);
- applied on coronal and sagittal stacks, fused; each of the K samples is projected so that re-degrading it
  reproduces the acquired slices exactly (``models.internal.dc_matrices``: minimum-norm, D x = lr); σ is the
  spread of the K projected samples, scaled by a conformal factor fitted on internal held-out pairs (95 %
  interval covers 95 %), plus selfsup's term for the finer grid's noise that no sample can show;
- self-check: internal held-out gain over cubic below ``min_gain_db`` returns cubic with a fallback reason.
In-plane factors > 1 are done by cubic B-spline plus exact block-mean consistency (reported as such).
torch + numpy only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.calibration import bracket_floor
from models.cubic import CubicEngine, resample_axis, upsample
from models.degrade import DegradationModel, degrade_in_plane, make_pairs
from models.engine import (
    EngineError,
    EngineOptions,
    EngineResult,
    Factors,
    VolumeInput,
    output_shape,
)
from models.internal import dc_matrices, missing_noise, noise_sigma
from models.nets_diffusion import CondUNet, UNetConfig

log = logging.getLogger(__name__)

PRIOR = Path(__file__).parent / "weights" / "diffusion_prior.pt"
STEPS = 15
KAPPA = 1.0
SMALL = UNetConfig(cond_channels=1, base=16, mults=(1, 2), blocks=1, temb=64)  # no prior: train from scratch
PATCH = 64


def eta_schedule(steps: int = STEPS, p: float = 0.3, sqrt_eta_1: float = 0.04, sqrt_eta_t: float = 0.999) -> np.ndarray:
    """ResShift's eta_1..eta_T: sqrt(eta) grows geometrically in a warped time ((t-1)/(T-1))^p."""
    if steps == 1:
        return np.array([sqrt_eta_t**2])
    b0 = math.exp(math.log(sqrt_eta_t / sqrt_eta_1) / (steps - 1))
    beta = ((np.arange(steps) / (steps - 1)) ** p) * (steps - 1)
    return (sqrt_eta_1 * b0**beta) ** 2


# ------------------------------------------------------------------------------------------ training pairs


@dataclass
class Pairs:
    """Full-size training images, normalised: cond = cubic(lr) and res = (truth - cond) / r_scale, (H, W) each."""

    cond: list[np.ndarray]
    res: list[np.ndarray]
    lr: list[np.ndarray]  # the degraded rows (for the consistency projection of held-out samples)
    r_scale: float


def through_pairs(vol_n: np.ndarray, dm: DegradationModel, spacing: tuple[float, float, float], slices: np.ndarray,
                  r_scale: float | None = None) -> Pairs:
    """Pairs from axial slices ``slices`` of the normalised volume, degraded along y and along x."""
    _, dy, dx = spacing
    cond: list[np.ndarray] = []
    res: list[np.ndarray] = []
    lrs: list[np.ndarray] = []
    for imgs, src in ((vol_n[slices], dy), (np.swapaxes(vol_n[slices], 1, 2), dx)):
        lr, hr = make_pairs(imgs, dm, src_spacing=src)  # (B, n_lr, W), (B, n', W)
        if lr.shape[1] < 2:
            continue
        cub = resample_axis(lr, 1, np.arange(hr.shape[1]) / dm.factor).astype(np.float32)
        for b in range(hr.shape[0]):
            cond.append(cub[b])
            res.append(hr[b] - cub[b])
            lrs.append(lr[b])
    if not cond:
        raise ValueError("in-plane matrix too small for through-plane training pairs")
    if r_scale is None:
        r_scale = float(np.sqrt(np.mean([np.mean(r**2) for r in res]))) or 1.0
    return Pairs(cond, [r / r_scale for r in res], lrs, r_scale)


def sample_patches(pairs: Pairs, n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random (size x size) patches (cond, res), (n, 1, s, s) each; random flips along W."""
    c_out = np.zeros((n, 1, size, size), np.float32)
    r_out = np.zeros_like(c_out)
    for i in range(n):
        j = int(rng.integers(len(pairs.cond)))
        c, r = pairs.cond[j], pairs.res[j]
        h, w = c.shape
        y0 = int(rng.integers(max(1, h - size + 1)))
        x0 = int(rng.integers(max(1, w - size + 1)))
        cp, rp = c[y0 : y0 + size, x0 : x0 + size], r[y0 : y0 + size, x0 : x0 + size]
        if rng.random() < 0.5:
            cp, rp = cp[:, ::-1], rp[:, ::-1]
        c_out[i, 0, : cp.shape[0], : cp.shape[1]] = cp
        r_out[i, 0, : rp.shape[0], : rp.shape[1]] = rp
    return c_out, r_out


def train(net: CondUNet, pairs: Pairs, steps: int, device: torch.device, seed: int, lr: float = 2e-4,
          batch: int = 16, size: int = PATCH, max_seconds: float = 0.0) -> list[float]:
    """x0-prediction training of the residual diffusion; returns the loss per step (stops after max_seconds)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    eta = torch.tensor(eta_schedule(), dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    net.train()
    losses: list[float] = []
    t_end = time.perf_counter() + max_seconds if max_seconds > 0 else math.inf
    for _ in range(steps):
        if time.perf_counter() > t_end:
            break
        c, r = sample_patches(pairs, batch, size, rng)
        t = torch.randint(0, len(eta), (batch,), generator=gen)
        e = eta[t][:, None, None, None]
        r0 = torch.from_numpy(r)
        x_t = (1 - e) * r0 + KAPPA * e.sqrt() * torch.randn(r0.shape, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = net(x_t.to(device), torch.from_numpy(c).to(device), ((t + 1) / len(eta)).to(device))
        loss = F.mse_loss(pred.float(), r0.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


# ------------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample(net: CondUNet, cond: torch.Tensor, gen: torch.Generator, steps: int = STEPS) -> torch.Tensor:
    """One reverse chain per image: cond (B, C, H, W) -> normalised residual x0 (B, 1, H, W), float32."""
    eta = eta_schedule(steps)
    b, _, h, w = cond.shape
    dev = cond.device
    x = KAPPA * math.sqrt(eta[-1]) * torch.randn((b, 1, h, w), generator=gen, device=dev)
    x0 = x
    for t in range(steps - 1, -1, -1):
        tt = torch.full((b,), (t + 1) / steps, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            x0 = net(x, cond, tt).float()
        if t == 0:
            break
        alpha = eta[t] - eta[t - 1]
        mean = (eta[t - 1] / eta[t]) * x + (alpha / eta[t]) * x0
        std = KAPPA * math.sqrt(eta[t - 1] / eta[t] * alpha)
        x = mean + std * torch.randn((b, 1, h, w), generator=gen, device=dev)
    return x0


def sample_stack(net: CondUNet, cond: np.ndarray, k: int, seed: int, device: torch.device, budget: int) -> np.ndarray:
    """Sample ``k`` (one chain per image) on a stack of images (N, H, W); batches of ``budget`` pixels, each with
    its own generator seeded from (seed, k, batch), so results do not depend on anything but the options."""
    n, h, w = cond.shape
    per = max(1, budget // (h * w))
    out = np.empty_like(cond)
    for bi, s in enumerate(range(0, n, per)):
        gen = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, k, bi]).generate_state(1)[0]))
        c = torch.from_numpy(cond[s : s + per, None]).to(device)
        if device.type == "cuda":
            c = c.contiguous(memory_format=torch.channels_last)
        out[s : s + per] = sample(net, c, gen)[:, 0].cpu().numpy()
    return out


def project(vol: np.ndarray, lr: np.ndarray, d: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Smallest change along axis 0 that makes D vol == lr exactly (mean-preserving over each slice profile)."""
    shp = vol.shape
    v = vol.reshape(shp[0], -1).astype(np.float64)
    v += p @ (lr.reshape(lr.shape[0], -1) - d @ v)
    return v.reshape(shp).astype(np.float32)


# ------------------------------------------------------------------------------------------------ weights


def load_net(path: Path | None, device: torch.device) -> tuple[CondUNet, dict[str, Any]]:
    """The prior at ``path`` (or a fresh small net when there is none); meta says which."""
    if path is not None and path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ck, dict) and ck.get("kind") == "diffusion":
            net = CondUNet(UNetConfig.from_dict(json.loads(ck["config"])))
            net.load_state_dict(ck["state"])
            return net.to(device).eval(), {"prior": path.name, "prior_sha": str(ck.get("sha", ""))}
        log.warning("%s is not a diffusion checkpoint; training from scratch", path)
    return CondUNet(SMALL).to(device).eval(), {"prior": ""}


def save_net(net: CondUNet, path: Path, provenance: dict[str, Any]) -> None:
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).cpu()
             for k, v in net.state_dict().items()}
    torch.save({"kind": "diffusion", "config": json.dumps(net.cfg.to_dict()), "state": state}, path)
    path.with_suffix(".json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------------------ engine


def _psnr(err: np.ndarray, peak: float) -> float:
    return float(10 * math.log10(peak**2 / max(float(np.mean(err**2)), 1e-12)))


class DiffusionEngine:
    name = "diffusion"
    # as ``SelfSupEngine.version``. 2: a gap acquisition's pairs and data consistency keep every f-th output slice
    # (``DegradationModel.dc_fwhm_px``, ``target_mm``; 2026-12-03), which changed its pixels on gap series
    version = "2"

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        o = self.options
        want_cuda = o.device == "cuda" or (o.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        self.budget = o.max_voxels_per_tile or (1 << 24 if self.device.type == "cuda" else 1 << 19)
        # weights: "none" trains a small net from scratch; a path naming a diffusion checkpoint replaces the
        # shipped prior; anything else (e.g. the selfsup weights of a shared [engine] section) is not ours
        self.weights: Path | None = PRIOR
        if o.weights == "none":
            self.weights = None
        elif o.weights and "diffusion" in Path(o.weights).name:
            self.weights = Path(o.weights)

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        """Any internal failure becomes an ``EngineError`` (the node then falls back to cubic and says why)."""
        if not np.isfinite(volume.data).all():
            raise EngineError("diffusion: the volume holds NaN or infinite values")
        try:
            return self._upscale(volume, factors)
        except EngineError:
            raise
        except (ValueError, RuntimeError, np.linalg.LinAlgError, MemoryError) as exc:
            raise EngineError(f"diffusion: {type(exc).__name__}: {exc}") from exc

    def _upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        t0 = time.perf_counter()
        o = self.options
        torch.manual_seed(o.seed)
        f = factors.through_plane
        dz, dy, dx = volume.spacing
        data = volume.data.astype(np.float32)
        c0, s = float(data.mean()), float(data.std()) or 1.0
        report: dict[str, Any] = {"steps": STEPS, "samples": max(1, o.samples), "device": self.device.type}
        if f == 1 or data.shape[0] < 3:
            return self._cubic(volume, factors, "no through-plane factor" if f == 1 else "fewer than 3 slices",
                               report, t0)
        dm = DegradationModel.from_volume(volume, factors)
        report["degradation"] = dm.describe()
        vol_n = (data - c0) / s
        z = data.shape[0]
        val_idx = np.arange(z)[2::5][:6] if z >= 10 else np.array([z // 2])
        train_idx = np.setdiff1d(np.arange(z), val_idx)
        rng = np.random.default_rng(o.seed)
        train_idx = np.sort(rng.choice(train_idx, size=min(48, train_idx.size), replace=False))
        tp = through_pairs(vol_n, dm, volume.spacing, train_idx)
        vp = through_pairs(vol_n, dm, volume.spacing, val_idx, tp.r_scale)
        net, meta = load_net(self.weights, self.device)
        report.update(meta)
        steps = 0 if (o.fast and meta["prior"]) else max(o.finetune_steps, 0)
        t1 = time.perf_counter()
        losses = train(net, tp, steps, self.device, o.seed, lr=1e-4 if meta["prior"] else 1e-3) if steps else []
        report["train_steps"], report["train_seconds"] = steps, round(time.perf_counter() - t1, 2)
        if losses:
            report["train_loss_last"] = round(float(np.mean(losses[-10:])), 4)
        gain, scale, stats = self._validate(net, vp, dm)
        report.update(stats)
        if gain < o.min_gain_db:
            return self._cubic(volume, factors, f"internal gain {gain:.2f} dB < {o.min_gain_db} dB", report, t0)
        t2 = time.perf_counter()
        mean, sd = self._sample_volume(net, vol_n, dm, tp.r_scale)
        report["sample_seconds"] = round(time.perf_counter() - t2, 2)
        out = mean * s + c0
        # the noise of the finer grid, which no sample can show (selfsup's term, on its normalisation)
        lo, hi = (float(v) for v in np.percentile(data[:: max(1, z // 16)], [0.5, 99.5]))
        extra = missing_noise(noise_sigma((data - lo) / max(hi - lo, 1e-6)), dm, min(dy, dx)) * max(hi - lo, 1e-6)
        report["sigma_target_noise"] = round(extra, 3)
        sigma = np.sqrt((sd * scale * s) ** 2 + extra**2)
        d, p = dc_matrices(z, dm)
        if volume.value_range is not None:  # alternate clip and projection: in range *and* consistent
            for _ in range(20):
                np.clip(out, volume.value_range[0], volume.value_range[1], out=out)
                out = project(out, data, d, p)
                if out.min() >= volume.value_range[0] - 0.5 and out.max() <= volume.value_range[1] + 0.5:
                    break
            np.clip(out, volume.value_range[0], volume.value_range[1], out=out)
        sigma = np.ascontiguousarray(sigma, dtype=np.float32)  # between two slices: reaches their range (selfsup's)
        raised = bracket_floor(torch.from_numpy(sigma), torch.from_numpy(np.asarray(out, np.float32)),
                               torch.from_numpy(data), f)
        report["sigma_bracket_raised"] = int(raised)
        out, sigma = self._in_plane(out, sigma, factors.in_plane, report)
        lr_check = degrade_in_plane(out, factors.in_plane) if factors.in_plane > 1 else out
        resid = (d @ lr_check.reshape(lr_check.shape[0], -1)).reshape(data.shape) - data
        report["consistency_max_abs"] = round(float(np.abs(resid).max()), 4)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        assert out.shape == output_shape(data.shape, factors)  # type: ignore[arg-type]
        log.info("diffusion x%d: internal gain %.2f dB, sigma scale %.2f, %.1f s", f, gain, scale, report["seconds"])
        return EngineResult(out.astype(np.float32), sigma.astype(np.float32),
                            (dz / f, dy / factors.in_plane, dx / factors.in_plane), self.name, report=report)

    def _validate(self, net: CondUNet, vp: Pairs, dm: DegradationModel) -> tuple[float, float, dict[str, Any]]:
        """K samples on held-out pairs: gain over cubic (dB) and the σ scale that makes 95 % intervals cover 95 %."""
        k = max(2, self.options.samples)
        errs_c, errs_e, ratios = [], [], []
        for j, (c, r, lr) in enumerate(zip(vp.cond, vp.res, vp.lr, strict=True)):
            w0 = max(0, (c.shape[1] - 128) // 2)
            c, r = c[:, w0 : w0 + 128], r[:, w0 : w0 + 128]
            d, p = dc_matrices(lr.shape[0], dm)
            lr_res = (lr[:, w0 : w0 + 128] - d @ c) / vp.r_scale  # the acquired rows, in residual space
            # the K samples of one held-out image run as one batch (each its own noise)
            smp = sample_stack(net, np.repeat(c[None], k, axis=0), 0, self.options.seed + 7919 * (j + 1),
                               self.device, self.budget)
            smp = np.stack([project(x, lr_res, d, p) for x in smp])
            m, sd = smp.mean(0), smp.std(0, ddof=1)
            errs_c.append(r.ravel())
            errs_e.append((m - r).ravel())
            ratios.append((np.abs(m - r) / np.maximum(sd, 1e-6)).ravel())
        ec, ee = np.concatenate(errs_c) * vp.r_scale, np.concatenate(errs_e) * vp.r_scale
        gain = _psnr(ee, 1.0) - _psnr(ec, 1.0)
        scale = float(np.quantile(np.concatenate(ratios), 0.95) / 1.96)
        scale = float(min(max(scale, 0.1), 100.0))
        return gain, scale, {"internal_gain_db": round(gain, 3), "sigma_scale": round(scale, 3),
                             "r_scale": round(vp.r_scale, 5)}

    def _sample_volume(self, net: CondUNet, vol_n: np.ndarray, dm: DegradationModel,
                       r_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and spread of K fused (coronal + sagittal), projected samples, normalised units."""
        f, z = dm.factor, vol_n.shape[0]
        cond = resample_axis(vol_n, 0, np.arange((z - 1) * f + 1) / f).astype(np.float32)  # (Z', Y, X)
        d, p = dc_matrices(z, dm)
        cor = np.ascontiguousarray(cond.transpose(1, 0, 2))  # (Y, Z', X)
        sag = np.ascontiguousarray(cond.transpose(2, 0, 1))  # (X, Z', Y)
        k = max(1, self.options.samples)
        mean = np.zeros_like(cond, dtype=np.float64)
        m2 = np.zeros_like(mean)
        for i in range(k):
            rc = sample_stack(net, cor, i, self.options.seed, self.device, self.budget).transpose(1, 0, 2)
            rs = sample_stack(net, sag, i, self.options.seed + 1, self.device, self.budget).transpose(1, 2, 0)
            x = project(cond + 0.5 * r_scale * (rc + rs), vol_n, d, p)
            delta = x - mean
            mean += delta / (i + 1)
            m2 += delta * (x - mean)
        sd = np.sqrt(m2 / max(k - 1, 1))
        return mean.astype(np.float32), sd.astype(np.float32)

    def _in_plane(self, out: np.ndarray, sigma: np.ndarray, g: int, report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """In-plane ×g by cubic B-spline, then the exact block-mean consistency (each g×g block keeps its mean)."""
        if g == 1:
            return out, sigma
        up = upsample(out, Factors(1, g))
        err = out - degrade_in_plane(up, g)
        up += np.repeat(np.repeat(err, g, axis=1), g, axis=2)
        report["in_plane"] = f"x{g} cubic B-spline + block-mean consistency (diffusion is through-plane only)"
        return up, np.repeat(np.repeat(sigma, g, axis=1), g, axis=2)

    def _cubic(self, volume: VolumeInput, factors: Factors, why: str, report: dict[str, Any], t0: float) -> EngineResult:
        res = CubicEngine(self.options).upscale(volume, factors)
        res.fallback = why
        res.report = {**report, **res.report, "seconds": round(time.perf_counter() - t0, 2)}
        log.info("diffusion: returning cubic: %s", why)
        return res

