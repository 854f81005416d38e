"""Diffusion engine: export training/eval volumes, train the shipped prior (GPU), evaluate (CPU or GPU).

    python bench/diffusion_gpu.py export                      # here: ../shared/data -> devcarry/*.npz (int16)
    python bench/diffusion_gpu.py train --steps 6000 --out D  # device: prior -> D/diffusion_prior.pt + .json
    python bench/diffusion_gpu.py eval --device cuda --out D  # phantom x2 simulated and real 5 mm -> 1 mm

The prior is trained on the MPRAGE, the PET/CT body, the tilted GE head and the enhanced MR only; the Philips
head phantom (1 mm / 5 mm) is held out for evaluation. Data travel as int16 .npz, never as DICOM series.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.cubic import upsample  # noqa: E402
from models.degrade import DegradationModel, degrade_through_plane  # noqa: E402
from models.engine import EngineOptions, Factors, VolumeInput, get_engine  # noqa: E402

CARRY = ROOT / "devcarry" / "diffusion"
TRAIN_SERIES = {
    "mprage": "mr_t1_mprage_sag_siemens",
    "petct": "ct_body_j2k_siemens_petct",
    "ge_head": "ct_head_ge_tilted_irregular",
    "mr_xa30": "mr_t1_enhanced_multiframe_siemens_xa30",
}
EVAL_SERIES = {"phantom1": "ct_head_phantom_philips_1mm", "phantom5": "ct_head_phantom_philips_5mm"}


def export(args: argparse.Namespace) -> int:
    from node.series import load_series

    CARRY.mkdir(parents=True, exist_ok=True)
    data = ROOT.parent / "shared" / "data"
    for key, name in {**TRAIN_SERIES, **EVAL_SERIES}.items():
        v = load_series(sorted(p for p in (data / name).rglob("*") if p.is_file()))
        arr = v.data
        if key == "mprage":
            arr = arr[2:-2:3]  # first/last slices are noise; every 3rd slice is plenty for in-plane pairs
        pos = (v.positions @ v.normal).astype(np.float64)
        np.savez_compressed(CARRY / f"{key}.npz", data=np.round(arr).astype(np.int16), spacing=np.array(v.spacing),
                            thickness=v.slice_thickness, modality=v.modality, pos=pos)
        print(key, arr.shape, v.spacing, v.slice_thickness)
    return 0


def _load(key: str) -> tuple[np.ndarray, tuple[float, float, float], float, str, np.ndarray]:
    z = np.load(CARRY / f"{key}.npz")
    sp = tuple(float(s) for s in z["spacing"])
    return z["data"].astype(np.float32), sp, float(z["thickness"]), str(z["modality"]), z["pos"]  # type: ignore[return-value]


def train(args: argparse.Namespace) -> int:
    import torch

    from models.diffusion import PATCH, Pairs, save_net, through_pairs
    from models.diffusion import train as train_net
    from models.nets_diffusion import CondUNet, UNetConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    all_pairs = Pairs([], [], [], 1.0)
    used = []
    for key in TRAIN_SERIES:
        data, sp, thick, mod, _ = _load(key)
        c0, s = float(data.mean()), float(data.std()) or 1.0
        vol_n = (data - c0) / s
        for f in (2, 3, 4, 5):
            for prof in ("box", "gaussian"):
                # a thick acquisition of step f * pixel and FWHM (0.7 .. 1.3) x step, from the in-plane pixels
                step = f * min(sp[1], sp[2])
                ratio = float(rng.uniform(0.7, 1.3))
                v = VolumeInput(vol_n[:3], (step, sp[1], sp[2]), ratio * step, mod, profile=prof)
                dm = DegradationModel.from_volume(v, Factors(f, 1))
                idx = np.sort(rng.choice(data.shape[0], size=min(16, data.shape[0]), replace=False))
                p = through_pairs(vol_n, dm, v.spacing, idx)
                all_pairs.cond += p.cond
                all_pairs.res += p.res
                all_pairs.lr += p.lr
        used.append({"series": TRAIN_SERIES[key], "shape": list(data.shape), "spacing": list(sp)})
        print(key, len(all_pairs.cond), "pair images", flush=True)
    cfg = UNetConfig(cond_channels=1, base=32, mults=(1, 2, 2), blocks=1, temb=128)
    net = CondUNet(cfg).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    losses = train_net(net, all_pairs, args.steps, dev, seed=0, lr=3e-4, batch=args.batch, size=PATCH,
                       max_seconds=args.seconds)
    secs = time.perf_counter() - t0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = {"what": "diffusion engine prior (residual-shifting conditional UNet, x0-prediction)",
            "data": used, "held_out": list(EVAL_SERIES.values()), "factors": [2, 3, 4, 5],
            "profiles": ["box", "gaussian"], "thickness_over_step": [0.7, 1.3], "steps": len(losses),
            "batch": args.batch, "patch": PATCH, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "train_seconds": round(secs, 1), "loss_first100": float(np.mean(losses[:100])),
            "loss_last100": float(np.mean(losses[-100:])), "commit": commit, "config": cfg.to_dict(),
            "params": sum(p.numel() for p in net.parameters()), "stored": "float16"}
    save_net(net, out / "diffusion_prior.pt", prov)
    print(json.dumps(prov, indent=1))
    return 0


def metrics(out: np.ndarray, truth: np.ndarray, sigma: np.ndarray | None, modality: str) -> dict[str, Any]:
    """Body-masked PSNR (peak: truth range in the body), SSIM-free HU-MAE/bias, σ Spearman and 95 % coverage."""
    mask = truth > -500 if modality == "CT" else truth > 0.1 * float(np.percentile(truth, 99))
    err = (out - truth)[mask]
    peak = float(truth[mask].max() - truth[mask].min())
    r: dict[str, Any] = {"psnr_db": round(10 * math.log10(peak**2 / float(np.mean(err**2))), 3),
                         "hu_mae": round(float(np.mean(np.abs(err))), 3), "hu_bias": round(float(np.mean(err)), 3)}
    if sigma is not None and float(sigma[mask].max()) > 0:
        from scipy.stats import spearmanr

        s = sigma[mask]
        r["spearman"] = round(float(spearmanr(s, np.abs(err)).statistic), 3)
        r["coverage_95"] = round(float(np.mean(np.abs(err) <= 1.96 * s)), 4)
    return r


def _crop(a: np.ndarray, n: int) -> np.ndarray:
    if n <= 0:
        return a
    y0, x0 = (a.shape[1] - n) // 2, (a.shape[2] - n) // 2
    return a[:, y0 : y0 + n, x0 : x0 + n]


def evaluate(args: argparse.Namespace) -> int:
    opts = EngineOptions(device=args.device, samples=args.samples, finetune_steps=args.finetune_steps,
                         fast=args.fast, seed=0, weights=args.weights)
    results: dict[str, Any] = {"options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}}
    eng = get_engine(args.engine, opts)
    # 1) simulated: 1 mm phantom -> 2 mm box slices, restore x2
    thin, sp, _, mod, _ = _load("phantom1")
    thin = _crop(thin[: args.max_slices] if args.max_slices else thin, args.crop)
    thick = degrade_through_plane(thin, 2, 2.0)
    n_out = (thick.shape[0] - 1) * 2 + 1
    truth = thin[:n_out]
    v = VolumeInput(thick, (2 * sp[0], sp[1], sp[2]), 2 * sp[0], mod, (-1024.0, 3071.0))
    results["phantom_x2_simulated"] = _run(eng, v, Factors(2, 1), truth, mod)
    # 2) real: 5 mm phantom -> x5 at 1 mm, compared with the 1 mm series at matching positions
    d5, sp5, th5, _, pos5 = _load("phantom5")
    d1, _, _, _, pos1 = _load("phantom1")
    d5, d1 = _crop(d5, args.crop), _crop(d1, args.crop)
    f = int(round(sp5[0] / 1.0))
    grid = pos5[0] + np.arange((d5.shape[0] - 1) * f + 1) * sp5[0] / f
    match = [(i, int(np.argmin(np.abs(pos1 - g)))) for i, g in enumerate(grid) if np.min(np.abs(pos1 - g)) < 0.05]
    v5 = VolumeInput(d5, sp5, th5, mod, (-1024.0, 3071.0))
    oi, ti = zip(*match, strict=True)
    results["phantom_5mm_to_1mm_real"] = _run(eng, v5, Factors(f, 1), d1[list(ti)], mod, list(oi))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": f"eval-{args.engine}", "command": " ".join(["python", *sys.argv]), "figures": results}
    name = f"eval-{args.engine}-{args.device}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    (out / name).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps(doc, indent=1, default=str))
    return 0


def _run(eng: Any, v: VolumeInput, fac: Factors, truth: np.ndarray, mod: str, rows: list[int] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = eng.upscale(v, fac)
    secs = time.perf_counter() - t0
    cub = upsample(v.data, fac)
    sel = slice(None) if rows is None else rows
    r = {"shape_in": list(v.data.shape), "factor": fac.through_plane, "seconds": round(secs, 2),
         "engine": metrics(res.data[sel], truth, res.sigma[sel], mod), "cubic": metrics(cub[sel], truth, None, mod),
         "fallback": res.fallback, "report": res.report}
    r["gain_db"] = round(r["engine"]["psnr_db"] - r["cubic"]["psnr_db"], 3)
    print(json.dumps({k: r[k] for k in ("seconds", "engine", "cubic", "gain_db", "fallback")}), flush=True)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export")
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seconds", type=float, default=0.0, help="stop training after this many seconds")
    t.add_argument("--out", default="models/weights")
    e = sub.add_parser("eval")
    e.add_argument("--engine", default="diffusion")
    e.add_argument("--device", default="auto")
    e.add_argument("--samples", type=int, default=8)
    e.add_argument("--finetune-steps", type=int, default=200)
    e.add_argument("--fast", action="store_true")
    e.add_argument("--weights", default="")
    e.add_argument("--crop", type=int, default=0)
    e.add_argument("--max-slices", type=int, default=0)
    e.add_argument("--out", default="bench/results")
    a = p.parse_args()
    return {"export": export, "train": train, "eval": evaluate}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
