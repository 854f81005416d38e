"""``srnode bench engine [--device cpu|cuda] [--shape Y,X,Z]``: selfsup timings per stage, x2 through-plane.

The volume is the shared 1 mm head phantom mirrored along z and padded/cropped in-plane to the shape (or a
synthetic phantom where ../shared/data is absent). Runs fast mode and per-series fine-tuning, both with the
configured test-time passes (8: coronal + sagittal x 4 flips, the uncertainty included); on CUDA also the
achieved TFLOP/s of the network against the bf16 dense peak: network FLOPs of all passes over the GPU time of the
passes (CUDA events; the host work that overlaps them is not counted). Writes bench/results/engine-*.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.engine import (
    CpuPrecision,
    Device,
    EngineOptions,
    Factors,
    TorchCompile,
    VolumeInput,
    get_engine,
    upscale,
)
from node.app.progress import bar_of
from node.bench.results import write_result

log = logging.getLogger(__name__)

PHANTOM = Path("../shared/data/ct_head_phantom_philips_1mm")  # relative to the current directory
# dense (no sparsity) BF16 tensor-core peak, TFLOP/s, from NVIDIA's H100 / H200 / A100 data sheets (SXM unless
# named); matched by substring of the device name, first match wins
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_volume(shape: tuple[int, int, int], source: Path | None) -> VolumeInput:
    """(Z, Y, X) float32 HU volume of ``shape``: the phantom at ``source`` repeated along z with every other
    copy mirrored, centred in-plane (cropped or padded with its minimum); a synthetic one when ``source`` is
    absent. Its spacing and slice thickness claim twice the source's dz (a thick input for x2)."""
    z, y, x = shape
    if source is not None and source.exists():
        from node.app.volume_file import load_volume

        base = load_volume(source).vin
        data, spacing = base.data, base.spacing
    else:
        rng = np.random.default_rng(0)
        zz, yy, xx = np.mgrid[0:64, 0:y, 0:x].astype(np.float32)
        data = np.full((64, y, x), -1000.0, np.float32)
        for _ in range(40):
            c, r = rng.uniform(0, 1, 3) * (64, y, x), rng.uniform(0.03, 0.12) * min(y, x)
            data += rng.uniform(50, 400) * (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r * r)
        spacing = (1.0, 0.5, 0.5)
    reps = int(np.ceil(z / data.shape[0]))
    stack = np.concatenate([data if i % 2 == 0 else data[::-1] for i in range(reps)])[:z]
    out = np.full((z, y, x), float(stack.min()), np.float32)
    sy, sx = min(y, stack.shape[1]), min(x, stack.shape[2])
    oy, ox = (stack.shape[1] - sy) // 2, (stack.shape[2] - sx) // 2
    ty, tx = (y - sy) // 2, (x - sx) // 2
    out[:, ty : ty + sy, tx : tx + sx] = stack[:, oy : oy + sy, ox : ox + sx]
    return VolumeInput(out, (2.0 * spacing[0], spacing[1], spacing[2]), 2.0 * spacing[0], "CT", (-1024.0, 3071.0))


def _peak(device_name: str) -> float:
    for key, val in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return val
    return 0.0


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``srnode bench engine`` options to ``parser``."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", default="", help="Y,X,Z of the input (default 512,512,300 cuda; 512,512,134 cpu)")
    parser.add_argument("--modes", default="fast,finetune", help="comma list of fast, finetune")
    parser.add_argument("--source", type=Path, default=PHANTOM, help="series folder or .npz to build the volume")
    parser.add_argument("--tta-passes", type=int, default=EngineOptions.tta_passes)
    parser.add_argument("--finetune-steps", type=int, default=EngineOptions.finetune_steps)
    parser.add_argument("--repeat", type=int, default=1, help="calls per mode (the figures of each call are kept)")
    parser.add_argument("--torch-compile", choices=[m.value for m in TorchCompile], default=TorchCompile.NONE.value,
                        help="network passes through torch.compile (CUDA only; compile time reported apart)")
    parser.add_argument("--cpu-precision", choices=[m.value for m in CpuPrecision], default=CpuPrecision.AUTO.value,
                        help="network passes on the CPU (EngineOptions.cpu_precision): auto, bf16 or float32")
    parser.add_argument("--profile", type=Path, default=None,
                        help="after the timed calls, one more fast call under torch.profiler: its operators and "
                             "kernels by device time (top 40) written to this text file")


def run(args: argparse.Namespace) -> int:
    """Run ``srnode bench engine``; returns the exit code."""
    import torch

    default = "512,512,300" if args.device == "cuda" else "512,512,134"
    y, x, z = (int(v) for v in (args.shape or default).split(","))
    vol = make_volume((z, y, x), args.source)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    figures: dict[str, Any] = {"device": name, "shape_zyx": [z, y, x], "factor": 2, "tta_passes": args.tta_passes,
                               "bf16_peak_tflops": _peak(name), "torch_compile": args.torch_compile,
                               "torch": torch.__version__}
    bar = bar_of(args)
    runs = [(m, i) for m in args.modes.split(",") for i in range(max(1, args.repeat))]
    bar.stage("warm-up" if args.device == "cuda" else f"{runs[0][0]} run 1", len(runs) + (args.device == "cuda"))
    if args.device == "cuda":  # warm-up: CUDA context, cuDNN autotune, allocator
        get_engine("selfsup", EngineOptions(device=Device.CUDA, fast=True)).upscale(
            VolumeInput(vol.data[:20, :128, :128], vol.spacing, vol.slice_thickness, "CT"), Factors(2, 1))
    for k, (mode, call) in enumerate(runs):
        if k or args.device == "cuda":
            bar.stage(f"{mode} run {call + 1}")
        opts = EngineOptions(device=Device(args.device), fast=mode == "fast", finetune_steps=args.finetune_steps,
                             tta_passes=args.tta_passes, min_gain_db=-1e9,
                             torch_compile=TorchCompile(args.torch_compile),
                             cpu_precision=CpuPrecision(args.cpu_precision))
        load = os.getloadavg()[0]  # the machine's 1-minute load as the call starts (shared machines)
        t0 = time.perf_counter()
        res = upscale(get_engine("selfsup", opts), vol, Factors(2, 1), bar.engine if bar.bar else None)
        total = time.perf_counter() - t0
        rep = res.report
        inf = float(rep.get("through_inference_s", 0) or 0)
        tflops = float(rep.get("through_flops", 0)) / inf / 1e12 if inf > 0 else 0.0
        key = mode if call == 0 else f"{mode}_call{call + 1}"
        figures[key] = {"engine_s": round(total, 3), "finetune_s": rep.get("through_finetune_s"),
                        "validate_s": rep.get("through_validate_s"), "to_host_s": rep.get("to_host_s"),
                        "compile_s": rep.get("through_compile_s"), "compile_error": rep.get("through_compile_error"),
                        "inference_s": inf, "net_tflops_achieved": round(tflops, 2),
                        "fraction_of_bf16_peak": round(tflops / figures["bf16_peak_tflops"], 4)
                        if figures["bf16_peak_tflops"] else None,
                        "internal_gain_db": rep.get("through_internal_gain_db"),
                        "dc_residual_after": rep.get("dc_residual_after"), "engine": res.engine,
                        "fallback": res.fallback, "output_shape": list(res.data.shape),
                        "load_avg_1m_start": round(load, 2), "load_avg_1m_end": round(os.getloadavg()[0], 2),
                        "cpu_precision": opts.cpu_precision.value}
        if args.device == "cuda":
            figures[key]["max_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"selfsup x2 through-plane {z}x{y}x{x} on {name}, {key}: {total:.2f} s "
              f"(fine-tune {rep.get('through_finetune_s')} s, validate {rep.get('through_validate_s')} s, "
              f"inference {inf:.2f} s{' GPU' if args.device == 'cuda' else ''}, {tflops:.1f} TFLOP/s, "
              f"to host {rep.get('to_host_s')} s)")
    if args.profile is not None:
        figures["profile"] = str(_profile(args, vol))
    out = write_result("engine", figures)
    print(f"written {out}")
    return 0


def _profile(args: argparse.Namespace, vol: VolumeInput) -> Path:
    """One fast call under ``torch.profiler`` (CPU and, on CUDA, device activity): the operators and kernels by
    device time (CPU time on the CPU), top 40, written to ``args.profile``; returns that path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    opts = EngineOptions(device=Device(args.device), fast=True, tta_passes=args.tta_passes, min_gain_db=-1e9,
                         torch_compile=TorchCompile(args.torch_compile))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        upscale(get_engine("selfsup", opts), vol, Factors(2, 1))
        if args.device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    args.profile.write_text(f"one fast call under torch.profiler, {wall:.2f} s wall (profiler overhead included)\n"
                            f"{table}\n")
    print(f"profile written to {args.profile}")
    return Path(args.profile)
