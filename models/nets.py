"""Networks of the ``selfsup`` engine: nn.Modules and their dataclass configs only (no training, no I/O).

``SRNet`` works on the low-resolution grid (cheap) and predicts the residual over cubic B-spline interpolation
on the fine grid through an anisotropic pixel shuffle: ``fz`` sub-rows along axis 0 and ``fx`` sub-columns along
axis 1. Through-plane x f uses (fz, fx) = (f, 1) on coronal/sagittal slices; in-plane x f uses (f, f) on axial
slices, optionally with the neighbouring slices as extra input channels (``in_ch`` = 3: 2.5D context). The last
layer starts near zero, so an untrained net is cubic to ~1e-3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


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
        r = r.view(b, fz, fx, h, w).permute(0, 3, 1, 4, 2)  # (B, H, fz, W, fx)
        return r.reshape(b, 1, h * fz, w * fx)

    def flops_per_lr_pixel(self) -> int:
        """Multiply-adds x 2 per low-resolution pixel (for achieved TFLOP/s)."""
        c = self.cfg
        macs = 9 * (c.in_ch * c.width + (c.depth - 1) * c.width * c.width + c.width * c.fz * c.fx)
        return 2 * macs
