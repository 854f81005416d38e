"""Internal learning for ``selfsup``: pairs from the series itself, training, noise estimates (the sigma
features, validation and conformal calibration are in ``models.calibration``).

A ``Task`` is one up-sampling problem on 2D images: through-plane (rows node-aligned, x f along rows only) or
in-plane (area-aligned, x f along both axes). The same code trains the shipped prior (many series) and fine-tunes
it per series (a bounded number of steps). torch + numpy only.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from models.cubic import resample_axis
from models.degrade import (
    DegradationModel,
    blur_axis,
    degrade_through_plane,
    make_pairs,
    slice_profile,
    through_plane_matrix,
)
from models.engine import CpuPrecision, Progress, cpu_bf16
from models.nets import CpuBf16Forward, SRNet, SRNetConfig, cpu_fused_ok

log = logging.getLogger(__name__)

FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,), (-1,), (-2, -1))  # test-time flips of (rows, cols)
TTAOp = tuple[tuple[int, ...], bool]  # (flipped axes, transposed first)
DIHEDRAL: tuple[TTAOp, ...] = tuple((fl, False) for fl in FLIPS) + tuple((fl, True) for fl in FLIPS)


def tta_ops(n: int, transpose: bool) -> tuple[TTAOp, ...]:
    """The first ``n`` test-time ops: the 4 flips, then (``transpose``: square pixels, fz == fx) the 4 flips
    of the transposed image (the 8 symmetries of the square)."""
    return DIHEDRAL[: max(1, min(n, 8 if transpose else 4))]


def cubic_matrix(n: int, f: int, node_aligned: bool) -> np.ndarray:
    """(n_out, n) matrix of cubic B-spline up-sampling x f of n samples (node- or area-aligned)."""
    if node_aligned:
        pos = np.arange((n - 1) * f + 1) / f
    else:
        pos = (np.arange(n * f) + 0.5) / f - 0.5
    return resample_axis(np.eye(n), 0, pos)


def matrix_f32(m: np.ndarray, device: torch.device) -> torch.Tensor:
    """``m`` as a float32 tensor on ``device`` with the entries that float32 can hold only as denormals (below
    its smallest normal, ~1.2e-38) set to 0. The cubic and pseudo-inverse matrices decay geometrically away from
    the diagonal (a 134-slice cubic matrix holds 3733 such entries, P 3014): denormal operands make CPU matrix
    products ~4x slower (microcode assists), and their products vanish below every sum's rounding (the products
    of the 512^2 x 134 benchmark came out bit-identical, measured)."""
    t = torch.from_numpy(m).float()
    t[t.abs() < torch.finfo(torch.float32).tiny] = 0.0
    return t.to(device)


CPU_MATMUL_COLS = 1 << 13  # columns per call of ``cols_matmul`` on the CPU (a 134-row block: 4.4 MB)


def cols_matmul(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``m @ v`` for (R, K) @ (K, N): on the CPU in column blocks of ``CPU_MATMUL_COLS`` spread over
    ``cpu_pass_pool``'s single-threaded workers (no 2-thread barrier inside each product; each column's sum is
    the same product, so the result came out bit-identical to one ``m @ v``, measured); elsewhere one product."""
    threads = torch.get_num_threads()
    if v.device.type != "cpu" or threads < 2 or v.shape[1] <= CPU_MATMUL_COLS:
        return m @ v
    out = torch.empty((m.shape[0], v.shape[1]), dtype=torch.result_type(m, v), device=v.device)

    def block(c0: int) -> None:
        torch.matmul(m, v[:, c0 : c0 + CPU_MATMUL_COLS], out=out[:, c0 : c0 + CPU_MATMUL_COLS])

    list(cpu_pass_pool(threads).map(block, range(0, v.shape[1], CPU_MATMUL_COLS)))
    return out


def dc_matrices(n_lr: int, model: DegradationModel) -> tuple[np.ndarray, np.ndarray]:
    """Through-plane data consistency: D (n_lr x n_fine) and its pseudo-inverse P = D^T (D D^T)^-1."""
    d = through_plane_matrix(n_lr, model.factor, model.dc_fwhm_px, model.profile)
    gram = d @ d.T + 1e-9 * np.eye(n_lr)
    return d, d.T @ np.linalg.inv(gram)


@dataclass
class Task:
    fz: int
    fx: int
    node_rows: bool  # through-plane: output rows (n-1)*f+1 with row k*f at input row k
    model: DegradationModel | None = None  # through-plane: the slice profile for data consistency

    def out_shape(self, h: int, w: int) -> tuple[int, int]:
        rows = (h - 1) * self.fz + 1 if self.node_rows else h * self.fz
        return rows, w * self.fx

    def base(self, lr: torch.Tensor) -> torch.Tensor:
        """Cubic B-spline up-sampling of (B, h, w) on lr's device (float32)."""
        b, h, w = lr.shape
        cz = matrix_f32(cubic_matrix(h, self.fz, self.node_rows), lr.device)
        out = torch.einsum("ij,bjw->biw", cz, lr.float())
        if self.fx > 1:
            cx = matrix_f32(cubic_matrix(w, self.fx, False), lr.device)
            out = torch.einsum("biw,kw->bik", out, cx)
        return out

    def base_volume(self, x: torch.Tensor) -> torch.Tensor:
        """Through-plane cubic up-sampling of a (Z, Y, X) volume along Z: (Zf, Y, X) float32, contiguous; the
        values of ``base`` on the (Y, Z, X) view, one product (``cols_matmul``) instead of one per image."""
        if self.fx > 1:
            raise ValueError("base_volume up-samples along z only (fx = 1)")
        cz = matrix_f32(cubic_matrix(x.shape[0], self.fz, self.node_rows), x.device)
        return cols_matmul(cz, x.float().reshape(x.shape[0], -1)).view(-1, *x.shape[1:])

    def project(self, y: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Data consistency on (B, H, W): the returned image re-degrades to ``lr`` exactly (minimum change)."""
        if self.node_rows:
            assert self.model is not None
            d, p = (matrix_f32(m, y.device) for m in dc_matrices(lr.shape[1], self.model))
            r = lr.float() - torch.einsum("ij,bjw->biw", d, y)
            return y + torch.einsum("ij,bjw->biw", p, r)
        f = self.fz
        b, h, w = y.shape
        mean = y.view(b, h // f, f, w // f, f).mean(dim=(2, 4))
        r = lr.float() - mean
        return y + r.repeat_interleave(f, 1).repeat_interleave(f, 2)


@dataclass
class PairSet:
    lr: torch.Tensor  # (B, h, w) normalised
    hr: torch.Tensor  # (B, H, W)
    base: torch.Tensor = field(init=False)
    task: Task = field(default_factory=lambda: Task(2, 1, True))
    noise: tuple[float, ...] = ()  # sd of the noise error no engine can avoid, per output-row phase (row % fz)
    ctx: torch.Tensor | None = None  # (B, C, h, w) net input with context channels (None: lr itself, C = 1)
    square: bool = False  # square pixels and fz == fx: the transposed image is a valid test-time view

    def __post_init__(self) -> None:
        self.base = self.task.base(self.lr)

    @property
    def inp(self) -> torch.Tensor:
        """(B, C, h, w) the net's input."""
        return self.ctx if self.ctx is not None else self.lr[:, None]


def through_pairs(
    vol: np.ndarray, spacing: tuple[float, float, float], model: DegradationModel, z_idx: np.ndarray,
    device: torch.device, lr_profile: str | None = None,
) -> list[PairSet]:
    """Pairs from axial slices ``z_idx`` of a normalised (Z, Y, X) volume, degraded along y and along x
    (``lr_profile``: inputs through that profile over the source images, ``degrade.make_pairs``)."""
    task = Task(model.factor, 1, True, model)
    imgs = vol[z_idx]
    sd = noise_sigma(vol)
    out = []
    for images, src in ((imgs, spacing[1]), (np.ascontiguousarray(imgs.transpose(0, 2, 1)), spacing[2])):
        lr, hr = make_pairs(images, model, src_spacing=src, lr_profile=lr_profile)
        if lr.shape[1] >= 4:
            noise = tuple(float(sd * g) for g in phase_noise(model, src)[1])
            out.append(PairSet(torch.from_numpy(lr).to(device), torch.from_numpy(hr).to(device), task, noise))
    return out


def split_slices(n: int, n_train: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint training / held-out axial slice indices (every 5th slice is held out)."""
    idx = np.arange(n)
    val, train = idx[2::5], np.setdiff1d(idx, idx[2::5])
    if val.size == 0:
        val = train[-1:]
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(train, min(n_train, train.size), replace=False))
    val = np.sort(rng.choice(val, min(n_val, val.size), replace=False))
    return train, val


def inference_bf16(net: SRNet, device: torch.device) -> bool:
    """Whether ``net``'s passes on ``device`` run in bf16: always on CUDA; on the CPU per ``net.cpu_precision``
    (``auto``: where the CPU has native bf16, ``cpu_bf16``)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    p = CpuPrecision(net.cpu_precision)
    return p == CpuPrecision.BF16 or (p == CpuPrecision.AUTO and cpu_bf16())


def _autocast(device: torch.device, inference: bool = False, net: SRNet | None = None) -> torch.autocast:
    """bf16 autocast on CUDA; on the CPU for inference only, as ``inference_bf16`` says for ``net`` (None: as
    ``auto``); CPU training stays float32."""
    if device.type == "cpu":
        on = inference and (inference_bf16(net, device) if net is not None else cpu_bf16())
    else:
        on = device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


# LR pixels per network call of the CPU passes (``residual``): a batch of images goes in calls of about this many
# pixels (at least one image; a 134 x 512 slice of the 512^2 x 134 benchmark is one call), spread over
# ``cpu_pass_pool``'s single-threaded workers, so that a layer's activations stay in a core's caches from one layer to
# the next and no core waits on the other at every layer (see ``cpu_pass_pool``)
CPU_CALL_PIXELS = 1 << 16


@functools.lru_cache(maxsize=4)
def cpu_pass_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads for the CPU network passes, each running torch with ONE intra-op
    thread: the images of a batch go to the workers one call each, instead of every convolution split over all
    cores. Measured on the 2-core shared AMX CPU (``SRNet`` 6 x 32 bf16, 16 slices of 134 x 512): 165-215 ns of
    CPU per LR pixel against 395-440 for one 2-thread call of the batch, and no 2-thread barrier per layer, which
    under a loaded machine cost up to 5x (a descheduled partner thread). torch's thread count is process-wide:
    the workers set 1 for themselves as they start, then the caller's count is set back (threads already running
    keep theirs; torch threads first used in that instant would start with 1)."""
    prev = torch.get_num_threads()
    ready = threading.Barrier(workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="srnode-pass", initializer=torch.set_num_threads,
                              initargs=(1,))
    try:
        list(pool.map(lambda _: ready.wait(timeout=60), range(workers)))  # every worker started (and set to 1)
    finally:
        torch.set_num_threads(prev)
    return pool


GRAD_STRIDE = 4  # grid of candidate patch corners for gradient-weighted sampling (pixels of the input)


def _corner_cdf(s: PairSet, ph: int, pw: int, mix: float = 0.5) -> torch.Tensor:
    """Cumulative probabilities (float64, CPU) over patch corners (b, i, j) on a ``GRAD_STRIDE`` grid: ``mix``
    in proportion to the mean |gradient| of the input inside the patch, 1 - ``mix`` uniform (so flat regions and
    background are still seen). Edges are where the net beats cubic; air and flat tissue teach it little."""
    x = s.lr.detach().float().cpu()[:, None]  # (B, 1, h, w)
    g = torch.zeros_like(x)
    g[..., 1:, :] += (x[..., 1:, :] - x[..., :-1, :]).abs()
    g[..., :, 1:] += (x[..., :, 1:] - x[..., :, :-1]).abs()
    w = torch.nn.functional.avg_pool2d(g, (ph, pw), stride=GRAD_STRIDE)[:, 0].double().flatten()
    p = (1 - mix) / w.numel() + mix * w / max(float(w.sum()), 1e-12)
    return torch.cumsum(p, 0)


def train(
    net: SRNet, sets: list[PairSet], steps: int, lr_rate: float, seed: int,
    patch: tuple[int, int] = (24, 48), batch: int = 16, augment: bool = False, sampling: str = "uniform",
    progress: tuple[Progress, str] | None = None,
) -> float:
    """``steps`` Adam steps of L1 on random patches; returns the mean loss of the last 20 steps. ``augment``: each
    batch under a random symmetry of the square (in-plane sets on square pixels only, else ignored).
    ``sampling``: "uniform" patch corners, or "gradient" (half of them drawn in proportion to the input's mean
    |gradient| inside the patch, ``_corner_cdf``). ValueError on another name.
    ``progress``: (callback, stage name), called after each step with (stage, step, steps, loss)."""
    if sampling not in ("uniform", "gradient"):
        raise ValueError(f"sampling must be 'uniform' or 'gradient', not {sampling!r}")
    if steps <= 0 or not sets:
        return float("nan")
    device = sets[0].lr.device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr_rate * 0.1)
    net.train()
    losses: list[float] = []
    ph = min(patch[0], *(s.lr.shape[1] for s in sets))
    pw = min(patch[1], *(s.lr.shape[2] for s in sets))
    cdfs = [_corner_cdf(s, ph, pw) for s in sets] if sampling == "gradient" else []
    for step in range(steps):
        lrs, bases, hrs = [], [], []
        for _b in range(batch):
            k = int(torch.randint(len(sets), (1,), generator=gen))
            s = sets[k]
            n, h, w = s.lr.shape
            if cdfs:
                gi, gj = (h - ph) // GRAD_STRIDE + 1, (w - pw) // GRAD_STRIDE + 1
                c = min(int(torch.searchsorted(cdfs[k], torch.rand(1, generator=gen, dtype=torch.float64))),
                        n * gi * gj - 1)
                b, rem = divmod(c, gi * gj)
                off = torch.randint(GRAD_STRIDE, (2,), generator=gen)
                i = min(rem // gj * GRAD_STRIDE + int(off[0]), h - ph)
                j = min(rem % gj * GRAD_STRIDE + int(off[1]), w - pw)
            else:
                b = int(torch.randint(n, (1,), generator=gen))
                i = int(torch.randint(h - ph + 1, (1,), generator=gen))
                j = int(torch.randint(w - pw + 1, (1,), generator=gen))
            oh, ow = s.task.out_shape(ph, pw)
            fz, fx = s.task.fz, s.task.fx
            lrs.append(s.inp[b, :, i : i + ph, j : j + pw])  # (C, ph, pw)
            bases.append(s.base[b, i * fz : i * fz + oh, j * fx : j * fx + ow])
            hrs.append(s.hr[b, i * fz : i * fz + oh, j * fx : j * fx + ow])
        x, bt, ht = torch.stack(lrs), torch.stack(bases), torch.stack(hrs)  # (N, C, ph, pw), (N, oh, ow) x 2
        if augment and all(s.square and not s.task.node_rows for s in sets):
            fl, tr = DIHEDRAL[int(torch.randint(len(DIHEDRAL), (1,), generator=gen))]
            if tr:
                x, bt, ht = x.transpose(-2, -1), bt.transpose(-2, -1), ht.transpose(-2, -1)
            if fl:
                x, bt, ht = x.flip(fl), bt.flip(fl), ht.flip(fl)
        with _autocast(device, net=net):
            res = net(x)
        oh, ow = ht.shape[1:]
        pred = bt + res[:, 0, :oh, :ow].float()
        loss = (pred - ht).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress[0](progress[1], step + 1, steps, losses[-1])
    net.eval()
    return float(np.mean(losses[-20:]))


class CompiledNet:
    """A ``torch.compile``d forward of one net shape, kept for the process and reused across engine calls: each
    use copies the caller's weights into ``net`` (same tensors, so no re-trace) while holding ``lock``. Compiling
    anew per call would cost seconds every series (dynamo traces again; inductor's on-disk caches only shorten it).
    """

    def __init__(self, cfg: SRNetConfig, device: str, mode: str) -> None:
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: leave the caller's RNG be
            self.net = SRNet(cfg).to(torch.device(device)).eval()
        # inductor's own mode names; no CUDA graphs ("-no-cudagraphs"): the last batch of a stack is smaller
        inductor = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}[mode]
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(  # type: ignore[assignment]
            self.net, mode=inductor, dynamic=False)
        self.lock = threading.Lock()
        self.shapes: set[tuple[int, ...]] = set()  # input shapes already compiled (for the compile-time report)

    def load(self, net: SRNet) -> None:
        """Copy ``net``'s weights in (the caller holds ``lock``)."""
        with torch.no_grad():
            for mine, theirs in zip(self.net.parameters(), net.parameters(), strict=True):
                mine.copy_(theirs)


@functools.lru_cache(maxsize=8)
def compiled_net(cfg: SRNetConfig, device: str, mode: str) -> CompiledNet:
    """The process's ``CompiledNet`` for (net shape, device, ``TorchCompile`` mode "default" | "max-autotune")."""
    return CompiledNet(cfg, device, mode)


@torch.no_grad()
def residual(net: SRNet, lr: torch.Tensor, task: Task, flip: tuple[int, ...], max_pixels: int = 0,
             transpose: bool = False, forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Network residual for (B, h, w) images, or (B, C, h, w) with context channels, on the fine grid (B, H, W),
    float32, under one test-time view: transposed (``transpose``; in-plane, fz == fx), then flipped (``flip``).
    ``forward``: what runs the net (a ``CompiledNet.forward`` holding ``net``'s weights); default ``net`` itself.

    Tiles along columns with a halo of the receptive field when h*w exceeds ``max_pixels`` (> 0): exact.
    """
    x = lr if lr.dim() == 4 else lr[:, None]  # (B, C, h, w)
    if transpose:
        x = x.transpose(-2, -1)
    if flip:
        x = x.flip(flip)
    b, _, h, w = x.shape
    oh, ow = task.out_shape(h, w)
    halo = net.cfg.halo
    cpu = forward is None and lr.device.type == "cpu"
    fused = cpu and inference_bf16(net, lr.device) and cpu_fused_ok()
    run = CpuBf16Forward(net) if fused else net if forward is None else forward  # fused: weights in bf16 once
    step = w if max_pixels <= 0 or h * w <= max_pixels else max(8, max_pixels // h - 2 * halo)
    per = max(1, CPU_CALL_PIXELS // (h * min(w, step + 2 * halo))) if cpu else b  # images per network call
    out = torch.empty((b, oh, ow), dtype=torch.float32, device=lr.device)

    def call(b0: int, c0: int) -> None:  # no_grad and autocast are per thread: set here, in the worker
        c1 = min(w, c0 + step)
        a0, a1 = max(0, c0 - halo), min(w, c1 + halo)
        with torch.no_grad(), _autocast(lr.device, inference=not fused, net=net):
            xt = x[b0 : b0 + per, ..., a0:a1].contiguous(memory_format=torch.channels_last)
            r = run(xt)[:, 0]
            s0 = (c0 - a0) * task.fx
            out[b0 : b0 + per, :, c0 * task.fx : c1 * task.fx] = r[:, :oh, s0 : s0 + (c1 - c0) * task.fx]

    calls = [(b0, c0) for b0 in range(0, b, per) for c0 in range(0, w, step)]
    workers = min(torch.get_num_threads(), len(calls)) if cpu else 1
    if workers > 1:  # disjoint slices of ``out``; an error in a call is raised here
        list(cpu_pass_pool(torch.get_num_threads()).map(lambda bc: call(*bc), calls))
    else:
        for b0, c0 in calls:
            call(b0, c0)
    if flip:
        out = out.flip(flip)
    return out.transpose(-2, -1) if transpose else out


@torch.no_grad()
def ensemble(net: SRNet, s: PairSet, n_flips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the residual over the first ``n_flips`` test-time views (``tta_ops``)."""
    ops = tta_ops(n_flips, s.square and s.task.fz == s.task.fx and not s.task.node_rows)
    rs = torch.stack([residual(net, s.inp, s.task, fl, transpose=tr) for fl, tr in ops])
    return rs.mean(0), rs.std(0, unbiased=False) if rs.shape[0] > 1 else torch.zeros_like(rs[0])


def noise_sigma(vol: np.ndarray, body: float = 0.05) -> float:
    """Robust in-plane noise estimate from neighbour differences inside the body, from their lower quartile
    (edges and texture fill the upper tail): for Gaussian noise |d| has its 25th percentile at 0.3186 sd(d).
    A one-column slice is read along its rows; a one-pixel slice has no neighbours and gives 0.0."""
    sub = vol[:: max(1, vol.shape[0] // 16)]
    if sub.shape[-1] < 2:
        sub = np.swapaxes(sub, -1, -2)
    if sub.shape[-1] < 2 or sub.size == 0:
        return 0.0
    d = np.abs(np.diff(sub, axis=-1))
    m = (sub[:, :, 1:] > body) & (sub[:, :, :-1] > body)
    d = d[m] if m.sum() > 100 else d.ravel()
    return float(np.percentile(d, 25) / 0.3186 / np.sqrt(2.0))


def missing_noise(sigma_in: float, model: DegradationModel | None, src_spacing: float, in_factor: int = 1) -> float:
    """Noise of the target grid that the internal pairs cannot show (added in quadrature to sigma).

    Through-plane: thin slices carry sigma_in / sqrt(sum k^2) (k the slice profile on the output grid) while the
    pairs' targets carry sigma_in * g, g the noise gain of ``make_pairs`` (measured on white noise). In-plane:
    fine pixels carry sigma_in * f (block means average f^2 of them) while the ZSSR targets carry sigma_in.
    """
    if model is None:
        return sigma_in * math.sqrt(max(in_factor**2 - 1, 0))

    k = slice_profile(model.dc_fwhm_px, model.profile)
    noise = np.random.default_rng(0).normal(0, 1, (4, 96, 64)).astype(np.float32)
    _, hr = make_pairs(noise, model, src_spacing=src_spacing)
    g = float(hr[:, 4:-4, 4:-4].std())
    return sigma_in * math.sqrt(max(1.0 / float((k**2).sum()) - g * g, 0.0))


@functools.lru_cache(maxsize=16)
def phase_noise(model: DegradationModel, src_spacing: float, n_lr: int = 33, cols: int = 2048,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per output-row phase (row index mod f), the rms error that cubic + data consistency makes on pure white
    noise, per unit of the thick input's in-plane noise: (on the target grid, on the internal pairs).

    Target grid: thin noise degraded with the slice profile (what the thick slices carry), restored, and
    compared with the thin noise (the eval truth holds it; no engine can predict it). The thin slices have the
    FWHM ``model.target_mm`` (as ``make_pairs``' targets): where that exceeds the output step (overlapping acquisitions,
    thickness > step), their noise is correlated along z, white noise on a 4x finer grid seen through that profile,
    so part of it is predictable from the thick neighbours; otherwise it is white. Pairs: in-plane noise of
    sd 1 through ``make_pairs``, restored, compared with the pair's target. Node rows (phase 0) keep part of the
    truth's noise through data consistency; the rows between do not. Linear, so one simulation gives the gains.
    """
    f = model.factor
    rng = np.random.default_rng(seed)
    d, p = dc_matrices(n_lr, model)
    c = cubic_matrix(n_lr, f, True)
    n = (n_lr - 1) * f + 1
    thin_px = model.target_mm / model.fine_mm  # the thin slices' FWHM in output-grid samples
    if thin_px > 1.0 + 1e-6:
        sup = 4  # the white noise's grid, 4x finer than the output grid
        white = rng.normal(0.0, 1.0, (n * sup, cols))
        thin = blur_axis(white, 0, slice_profile(thin_px * sup, model.profile), at=np.arange(0, n * sup, sup))
        thin = thin.astype(np.float64)
    else:
        thin = rng.normal(0.0, 1.0, (n, cols))
    thick = d @ thin
    y = c @ thick
    y += p @ (thick - d @ y)
    e_t, s_thick = y - thin, float(thick[2:-2].std())
    noise = rng.normal(0.0, 1.0, (4, 8 * n_lr * f, 256)).astype(np.float32)
    lr, hr = make_pairs(noise, model, src_spacing=src_spacing)
    task = Task(f, 1, True, model)
    lr_t = torch.from_numpy(lr)
    e_p = (task.project(task.base(lr_t), lr_t) - torch.from_numpy(hr)).numpy()

    def per_phase(e: np.ndarray, axis: int) -> np.ndarray:
        e = np.moveaxis(e, axis, 0)[2 * f : -2 * f]
        idx = np.arange(2 * f, 2 * f + e.shape[0]) % f
        return np.array([float(np.sqrt(np.mean(e[idx == k] ** 2))) for k in range(f)])

    return per_phase(e_t, 0) / max(s_thick, 1e-12), per_phase(e_p, 1)


def target_noise_rows(sd: float, model: DegradationModel, src_spacing: float, rows: int) -> np.ndarray:
    """(rows,) sd of the truth's noise error on the x f output grid (phase ``row % f``), normalised units."""
    return (sd * phase_noise(model, src_spacing)[0])[np.arange(rows) % model.factor]


def z_difficulty(vol: np.ndarray, spacing: tuple[float, float, float], model: DegradationModel,
                 z_idx: np.ndarray, body: float = 0.05) -> float:
    """How much harder z is than the in-plane axes at the acquired scale: RMS error of cubic on a x f step made
    from the acquired slices along z, over the same step made from in-plane axes (``make_pairs``). The internal
    pairs see in-plane content only; their sigma scale is multiplied by this ratio (clipped to 0.25..4)."""
    f = model.factor
    if vol.shape[0] < 2 * f + 1:
        return 1.0
    coarse = DegradationModel(f, 1, model.step_mm * f, model.thickness_mm * f, model.pixel_mm, model.profile)
    n_lr = (vol.shape[0] - 1) // f + 1
    sub = vol[: (n_lr - 1) * f + 1, :: max(1, vol.shape[1] // 64)]  # (Z', rows, X) along z
    lr_z = degrade_through_plane(sub, f, coarse.dc_fwhm_px, axis=0, profile=model.profile)
    up_z = (cubic_matrix(n_lr, f, True) @ lr_z.reshape(n_lr, -1)).reshape(-1, *lr_z.shape[1:])  # BLAS, not einsum
    m = sub > body
    e_z = float(np.sqrt(np.mean((up_z - sub)[m] ** 2))) if m.sum() > 100 else 0.0
    lr, hr = make_pairs(vol[z_idx], coarse, src_spacing=spacing[1])
    up = np.matmul(cubic_matrix(lr.shape[1], f, True), lr)  # (i, j) @ (b, j, w) -> (b, i, w)
    m2 = hr > body
    e_xy = float(np.sqrt(np.mean((up - hr)[m2] ** 2))) if m2.sum() > 100 else 0.0
    return float(np.clip(e_z / e_xy, 0.25, 4.0)) if e_xy > 0 and e_z > 0 else 1.0


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(x.size)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
