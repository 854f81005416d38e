"""Micro-benchmark of the selfsup network's forward pass on one GPU (issue #13 item 4): variants side by side.

    python bench/gpu_net.py --out OUT.json [--batch 512 --height 300 --width 512] [--variants a,b,...]

The input is one batch of through-plane passes as the engine feeds it: B coronal images of (Z, X) = (300, 512) of
a 512 x 512 x 300 volume, x2 along Z, through the shipped prior's shape (``models.prior.NET``: width 24, depth 6).
Each variant is timed with CUDA events (median of ``--reps`` calls after 3 warm-ups; compile time apart) and
checked against the float32 eager output on the same random input (relative L2 error; bf16 lands near 1e-2 of the
residual). Also measured once: the copy bandwidth (device-to-device, bytes read + written) and a bf16 8192^3
matrix product, the two ceilings of METHOD.md. On the CPU (no CUDA) it runs tiny shapes, for testing the script.
torch only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.nets import SRNet, SRNetConfig  # noqa: E402
from models.prior import NET  # noqa: E402

VARIANTS = ("autocast", "bf16", "bf16_nchw", "bf16_cudnn_benchmark", "bf16_width32", "bf16_b64", "bf16_b128",
            "bf16_graph_b64", "compile_default", "compile_max_autotune")


def _time(fn: Callable[[], torch.Tensor], reps: int, cuda: bool) -> float:
    """Median seconds of ``fn`` over ``reps`` calls after 3 warm-ups (CUDA events on the GPU)."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def ceilings(dev: torch.device) -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matrix rate (TFLOP/s), measured (METHOD.md)."""
    n = 1 << 30 if dev.type == "cuda" else 1 << 22
    a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    t = _time(lambda: b.copy_(a), 10, dev.type == "cuda")
    m = 8192 if dev.type == "cuda" else 256
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    tm = _time(lambda: x @ y, 10, dev.type == "cuda")
    return {"copy_gb_s": round(2 * 4 * n / t / 1e9, 1), "bf16_matmul_tflops": round(2 * m**3 / tm / 1e12, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--height", type=int, default=300)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip the variants left once this is spent")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        args.batch, args.height, args.width, args.reps = 4, 24, 32, 2
    t_start = time.perf_counter()
    cfg = SRNetConfig(fz=2, fx=1, width=NET.width, depth=NET.depth)
    torch.manual_seed(0)
    net = SRNet(cfg).to(dev).eval()
    for p in net.parameters():  # trained-like magnitudes (the head starts near zero)
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(args.batch, 1, args.height, args.width, device=dev)
    flops = net.flops_per_lr_pixel()
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                           "input": list(x.shape), "net": cfg.to_dict(), "flops_per_lr_pixel": flops,
                           "ceilings": ceilings(dev), "variants": {}}
    with torch.no_grad():
        ref = net(x).float()

    def bf16_net(width: int = cfg.width, memory: torch.memory_format = torch.channels_last) -> SRNet:
        """The net in bf16; ``width`` > cfg.width pads every layer with zero channels (same function)."""
        n = SRNet(SRNetConfig(fz=2, fx=1, width=width, depth=cfg.depth)).to(dev)
        with torch.no_grad():
            for (_k, mine), theirs in zip(n.state_dict().items(), net.state_dict().values(), strict=True):
                mine.zero_()
                mine[tuple(slice(0, s) for s in theirs.shape)] = theirs
        return n.to(dtype=torch.bfloat16, memory_format=memory).eval()  # type: ignore[call-overload]

    for name in args.variants.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            doc["variants"][name] = {"skipped": "time budget spent"}
            continue
        rec: dict[str, Any] = {}
        b = args.batch
        try:
            with torch.no_grad():
                if name == "autocast":  # today's engine path: float32 weights under bf16 autocast
                    def fn() -> torch.Tensor:
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                            return net(x.contiguous(memory_format=torch.channels_last))
                elif name.startswith("bf16"):
                    n = bf16_net(32 if "width32" in name else cfg.width,
                                 torch.contiguous_format if "nchw" in name else torch.channels_last)
                    if "_b" in name and name.split("_b")[-1].isdigit():
                        b = min(args.batch, int(name.split("_b")[-1]))
                    xb = x[:b].to(torch.bfloat16)
                    torch.backends.cudnn.benchmark = "cudnn_benchmark" in name
                    if "graph" in name and cuda:
                        static = xb.clone()
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            for _ in range(3):
                                n(static)
                        torch.cuda.current_stream().wait_stream(s)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            gout = n(static)

                        def fn() -> torch.Tensor:
                            g.replay()  # noqa: B023 (used in this iteration only)
                            return gout  # noqa: B023
                    else:
                        def fn() -> torch.Tensor:
                            return n(xb)  # noqa: B023
                elif name.startswith("compile"):
                    mode = "default" if name == "compile_default" else "max-autotune-no-cudagraphs"
                    n = bf16_net()
                    cn = torch.compile(n, mode=mode, dynamic=False)
                    xb = x.to(torch.bfloat16)
                    t = time.perf_counter()
                    cn(xb)
                    if cuda:
                        torch.cuda.synchronize()
                    rec["compile_s"] = round(time.perf_counter() - t, 2)

                    def fn() -> torch.Tensor:
                        return cn(xb)  # type: ignore[no-any-return]  # noqa: B023
                else:
                    raise ValueError(f"unknown variant {name}")
                out = fn().float()
                r = ref[:b]
                rec["rel_l2_error"] = float((out - r).norm() / r.norm())
                sec = _time(fn, args.reps, cuda)
                torch.backends.cudnn.benchmark = False
            rec.update({"batch": b, "ms_per_call": round(sec * 1e3, 3),
                        "ms_per_512_images": round(sec * 1e3 * 512 / b, 3),
                        "tflops": round(flops * b * args.height * args.width / sec / 1e12, 2)})
        except Exception as exc:  # one variant's failure is a figure too
            rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
        doc["variants"][name] = rec
        print(name, rec, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")  # after each variant: a cut-off run keeps these
    print(json.dumps(doc["ceilings"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
