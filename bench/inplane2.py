"""In-plane x2 by learning from the volume's own finer axis (z), SMORE style (issue #13 item 2; helper inplane2).

Offline measurement, not the engine. For each series (a ``.npz`` of devcarry/eval): simulate the in-plane x f input
exactly as ``srnode eval --axis in`` does (``node.bench.eval.simulate``: f x f block means), then on that input only

- train a 1D net (``SRNet`` fz=f, fx=1, area-aligned rows) on pairs made along z: (z, y) and (z, x) planes of the
  input, block-meaned by f along z, the other axis coarse as in use (held-out: every 5th plane);
- apply it along y on the axial slices (x coarse), then along x (variants below), 4 flips each, with the 1D
  block-mean projection after each pass (so the result re-degrades to the input exactly);

and compare with cubic and with the shipped engine (``selfsup`` fast: the prior's 2D ZSSR net, 4 views), body-masked
metrics of ``srnode eval`` (``node.bench.eval.evaluate`` pieces: ``models.evaluate.fidelity``).

Variants: ``yx`` (y first, then x on the y-refined slices), ``xy`` (the other order), ``avg`` (mean of both),
``ens`` (mean of ``avg`` and the shipped engine's output), ``casc`` (cascade: the second pass by a second net trained on z pairs of the first pass's output, whose other axis
is then fine as in its use; both orders averaged).

Usage: python bench/inplane2.py SERIES.npz ... [--steps N] [--init prior|scratch] [--casc] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import internal as il  # noqa: E402
from models.cubic import upsample  # noqa: E402
from models.engine import Device, EngineOptions, get_engine, upscale  # noqa: E402
from models.evaluate import body_mask, data_range, fidelity  # noqa: E402
from models.nets import SRNet  # noqa: E402
from models.prior import DEFAULT_WEIGHTS, load_prior, make_net  # noqa: E402
from node.app.volume_file import load_volume  # noqa: E402
from node.bench.eval import simulate  # noqa: E402


def block_rows(a: np.ndarray, f: int) -> np.ndarray:
    """(B, H, W) -> (B, H // f, W): mean of f rows (cropped to a multiple of f)."""
    b, h, w = a.shape
    h2 = (h // f) * f
    return a[:, :h2].reshape(b, h2 // f, f, w).mean(2)


def z_pairs(vol: np.ndarray, f: int, every: int = 5, held: bool = False) -> list[il.PairSet]:
    """Pairs along z of a normalised (Z, Y, X) volume: (z, y) planes (one per x) and (z, x) planes (one per y),
    z block-meaned by f; planes i % every == 2 are held out (``held``: those only)."""
    zc = (vol.shape[0] // f) * f
    task = il.Task(f, 1, False)
    out = []
    for planes in (vol[:zc].transpose(2, 0, 1), vol[:zc].transpose(1, 0, 2)):  # (X, Z, Y), (Y, Z, X)
        idx = np.arange(planes.shape[0])
        keep = idx[idx % every == 2] if held else idx[idx % every != 2]
        hr = np.ascontiguousarray(planes[keep], dtype=np.float32)
        lr = block_rows(hr, f).astype(np.float32)
        out.append(il.PairSet(torch.from_numpy(lr), torch.from_numpy(hr), task=task))
    return out


@torch.no_grad()
def along_rows(net: SRNet, x: np.ndarray, f: int, chunk: int = 16) -> np.ndarray:
    """(B, H, W) -> (B, H f, W): the 1D net along rows, mean of 4 flips, then the row block-mean projection."""
    task = il.Task(f, 1, False)
    out = np.empty((x.shape[0], x.shape[1] * f, x.shape[2]), np.float32)
    for b0 in range(0, x.shape[0], chunk):
        xb = torch.from_numpy(np.ascontiguousarray(x[b0 : b0 + chunk], dtype=np.float32))
        r = torch.stack([il.residual(net, xb, task, fl) for fl in il.FLIPS]).mean(0)
        y = task.base(xb) + r
        b, h, w = y.shape
        y = y + (xb - y.view(b, h // f, f, w).mean(2)).repeat_interleave(f, 1)
        out[b0 : b0 + chunk] = y.numpy()
    return out


def along_y(net: SRNet, v: np.ndarray, f: int) -> np.ndarray:
    return along_rows(net, v, f)


def along_x(net: SRNet, v: np.ndarray, f: int) -> np.ndarray:
    return along_rows(net, np.ascontiguousarray(v.transpose(0, 2, 1)), f).transpose(0, 2, 1)


def fit(vol: np.ndarray, f: int, steps: int, init: str, prior: dict[str, Any], seed: int) -> tuple[SRNet, dict]:
    t = time.perf_counter()
    sets, val = z_pairs(vol, f), z_pairs(vol, f, held=True)
    net, from_prior = make_net(prior if init == "prior" else {}, "through", f, 1, torch.device("cpu"))
    loss = il.train(net, sets, steps, 3e-4 if from_prior else 1e-3, seed)
    gains = []
    with torch.no_grad():
        for s in val:
            r = torch.stack([il.residual(net, s.lr, s.task, fl) for fl in il.FLIPS]).mean(0)
            e_n = float(((s.base + r - s.hr) ** 2).mean())
            e_c = float(((s.base - s.hr) ** 2).mean())
            gains.append(10 * np.log10(e_c / max(e_n, 1e-12)))
    return net, {"loss": round(loss, 5), "heldout_z_gain_db": [round(g, 3) for g in gains],
                 "from_prior": from_prior, "train_s": round(time.perf_counter() - t, 1)}


def one(path: Path, f: int, steps: int, init: str, casc: bool, seed: int) -> dict[str, Any]:
    lo_ = load_volume(path)
    vin, truth, factors = simulate(lo_, "in", f)
    torch.manual_seed(seed)
    data = np.asarray(vin.data, np.float32)
    sample = data[:: max(1, data.shape[0] // 16)].ravel()
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    scale = max(hi - lo, 1e-6)
    vol = (data - lo) / scale
    prior = load_prior(DEFAULT_WEIGHTS)
    mask, drange = body_mask(truth, vin.modality), data_range(truth)

    def denorm(y: np.ndarray) -> np.ndarray:
        out = y * scale + lo
        if vin.value_range is not None:
            out = np.clip(out, *vin.value_range)
        return out.astype(np.float32)

    doc: dict[str, Any] = {"series": path.stem, "input_shape": list(data.shape),
                           "input_spacing": [round(float(s), 4) for s in vin.spacing], "steps": steps, "init": init}
    doc["cubic"] = fidelity(upsample(data, factors), truth, mask, drange)
    t = time.perf_counter()
    res = upscale(get_engine("selfsup", EngineOptions(device=Device.CPU, fast=True, seed=seed)), vin, factors)
    doc["shipped_fast"] = fidelity(res.data, truth, mask, drange) | {"seconds": round(time.perf_counter() - t, 1)}
    net, info = fit(vol, f, steps, init, prior, seed)
    doc["net1"] = info
    t = time.perf_counter()
    vy = along_y(net, vol, f)  # (Z, Yf, X)
    vx = along_x(net, vol, f)  # (Z, Y, Xf)
    yx = along_x(net, vy, f)
    xy = along_y(net, vx, f)
    doc["apply_s"] = round(time.perf_counter() - t, 1)
    for name, y in (("yx", yx), ("xy", xy), ("avg", 0.5 * (yx + xy))):
        doc[name] = fidelity(denorm(y), truth, mask, drange)
    doc["ens"] = fidelity(0.5 * (denorm(0.5 * (yx + xy)) + res.data), truth, mask, drange)  # + the shipped 2D net
    if casc:  # second nets trained on the first pass's output, whose other axis is fine as in their use
        net_x, info_x = fit(np.ascontiguousarray(vy), f, steps, init, prior, seed)  # (z, x) planes: y fine
        net_y, info_y = fit(np.ascontiguousarray(vx), f, steps, init, prior, seed)  # (z, y) planes: x fine
        doc["net2_after_y"], doc["net2_after_x"] = info_x, info_y
        c_yx, c_xy = along_x(net_x, vy, f), along_y(net_y, vx, f)
        doc["casc_yx"] = fidelity(denorm(c_yx), truth, mask, drange)
        doc["casc_xy"] = fidelity(denorm(c_xy), truth, mask, drange)
        doc["casc"] = fidelity(denorm(0.5 * (c_yx + c_xy)), truth, mask, drange)
    c = doc["cubic"]["psnr_db"]
    doc["gain_db"] = {k: round(doc[k]["psnr_db"] - c, 3) for k in
                      ("shipped_fast", "yx", "xy", "avg", "ens", "casc_yx", "casc_xy", "casc") if k in doc}
    print(path.stem, json.dumps(doc["gain_db"]), doc["net1"], flush=True)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("series", nargs="+", type=Path)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--init", choices=["prior", "scratch"], default="prior")
    ap.add_argument("--casc", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    docs = [one(p, a.factor, a.steps, a.init, a.casc, a.seed) for p in a.series]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"command": " ".join(sys.argv), "machine": "2-core CPU shared with other helpers",
                                  "results": docs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
