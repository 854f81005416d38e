"""Networks of the ``selfsup`` engine: nn.Modules and their dataclass configs only (no training, no I/O).

``SRNet`` works on the low-resolution grid (cheap) and predicts the residual over cubic B-spline interpolation
on the fine grid through an anisotropic pixel shuffle: ``fz`` sub-rows along axis 0 and ``fx`` sub-columns along
axis 1. Through-plane x f uses (fz, fx) = (f, 1) on coronal/sagittal slices; in-plane x f uses (f, f) on axial
slices, optionally with the neighbouring slices as extra input channels (``in_ch`` = 3: 2.5D context). The last
layer starts near zero, so an untrained net is cubic to ~1e-3.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from models.engine import CpuPrecision

BF16 = torch.bfloat16


@dataclass(frozen=True)
class SRNetConfig:
    fz: int = 2  # up-sampling along axis 0 (rows)
    fx: int = 1  # up-sampling along axis 1 (columns)
    width: int = 32  # feature channels
    depth: int = 6  # 3x3 conv layers in the body (receptive-field radius = depth + 1 LR pixels)
    in_ch: int = 1  # input channels: 1 = the image; 3 = in-plane 2.5D context (slices z-1, z, z+1)

    @property
    def halo(self) -> int:
        """LR pixels a tile needs on each side so that tiled and untiled inference agree exactly."""
        return self.depth + 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SRNet(nn.Module):
    def __init__(self, cfg: SRNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cpu_precision = CpuPrecision.AUTO  # the inference arithmetic on the CPU (models.internal.residual)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_ch, cfg.width, 3, padding=1), nn.LeakyReLU(0.1, inplace=True)]
        for _ in range(cfg.depth - 1):
            layers += [nn.Conv2d(cfg.width, cfg.width, 3, padding=1), nn.LeakyReLU(0.1, inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(cfg.width, cfg.fz * cfg.fx, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-3)  # near zero: an untrained net is cubic to ~1e-3
        nn.init.zeros_(self.head.bias)  # type: ignore[arg-type]
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # ~4-8x faster convs on CPU too

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        # lr: (B, in_ch, H, W) normalised intensities -> residual (B, 1, H*fz, W*fx) on the fine grid
        b, _, h, w = lr.shape
        fz, fx = self.cfg.fz, self.cfg.fx
        r = self.head(self.body(lr.contiguous(memory_format=torch.channels_last)))  # (B, fz*fx, H, W)
        return shuffle(r, fz, fx)

    def flops_per_lr_pixel(self) -> int:
        """Multiply-adds x 2 per low-resolution pixel (for achieved TFLOP/s)."""
        c = self.cfg
        macs = 9 * (c.in_ch * c.width + (c.depth - 1) * c.width * c.width + c.width * c.fz * c.fx)
        return 2 * macs


def shuffle(r: torch.Tensor, fz: int, fx: int) -> torch.Tensor:
    """The anisotropic pixel shuffle: (B, fz*fx, H, W) -> (B, 1, H*fz, W*fx), sub-row k, sub-column l of LR pixel
    (i, j) from channel k*fx + l."""
    b, _, h, w = r.shape
    r = r.view(b, fz, fx, h, w).permute(0, 3, 1, 4, 2)  # (B, H, fz, W, fx)
    return r.reshape(b, 1, h * fz, w * fx)


def _conv_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, slope: float | None) -> torch.Tensor:
    """3x3 convolution (stride 1, padding 1) with the LeakyReLU of ``slope`` (None: none) fused into it by
    oneDNN (``mkldnn._convolution_pointwise``, the op PyTorch's inductor emits for conv + activation on the CPU)."""
    act, scalars = ("leaky_relu", [slope]) if slope is not None else ("none", [])
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, act, scalars, "")


class CpuBf16Forward:
    """``SRNet.forward`` in bf16 on the CPU with each LeakyReLU fused into its convolution (oneDNN post-op): one
    pass over the activations per layer instead of two (the separate LeakyReLU took ~27 % of the autocast
    forward's time on the 2-core AMX CPU) and the weights converted to bf16 once, not per call. Same arithmetic
    as bf16 autocast (bf16 inputs and weights, fp32 accumulation, bf16 activations) except that the LeakyReLU
    runs on the fp32 accumulator before rounding. Snapshot: later changes to ``net``'s weights are not seen.

    Call with (B, in_ch, H, W) float32 -> (B, 1, H*fz, W*fx) bf16 residual. Raises RuntimeError where oneDNN
    lacks the op (``cpu_fused_ok`` tells beforehand)."""

    def __init__(self, net: SRNet) -> None:
        mods = list(net.body) + [net.head]
        self.fz, self.fx = net.cfg.fz, net.cfg.fx
        self.layers: list[tuple[torch.Tensor, torch.Tensor, float | None]] = []
        for i, m in enumerate(mods):
            if not isinstance(m, nn.Conv2d):
                continue
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            slope = float(nxt.negative_slope) if isinstance(nxt, nn.LeakyReLU) else None
            w = m.weight.detach().to(BF16).contiguous(memory_format=torch.channels_last)
            b = m.bias.detach().to(BF16) if m.bias is not None else torch.zeros(m.out_channels, dtype=BF16)
            self.layers.append((w, b, slope))

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        h = lr.to(BF16).contiguous(memory_format=torch.channels_last)
        for w, b, slope in self.layers:
            h = _conv_act(h, w, b, slope)
        return shuffle(h, self.fz, self.fx)


@functools.lru_cache(maxsize=1)
def cpu_fused_ok() -> bool:
    """Whether this torch build runs ``CpuBf16Forward`` and agrees with bf16 autocast on a small net (to bf16
    rounding): False where oneDNN or the private op is missing (the callers then use autocast)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            net = SRNet(SRNetConfig(2, 1, width=8, depth=2))
            nn.init.normal_(net.head.weight, std=0.1)
            x = torch.rand(1, 1, 12, 10)
            with torch.autocast("cpu", dtype=BF16):
                want = net(x).float()
            got = CpuBf16Forward(net)(x).float()
        return bool(got.shape == want.shape and float((got - want).abs().max()) <= 0.02 * float(want.abs().max()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
