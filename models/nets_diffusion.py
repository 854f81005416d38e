"""Compact 2D / 2.5D conditional UNet with a timestep embedding, for the ``diffusion`` engine.

nn.Modules and a dataclass config only; no training or sampling logic here (that is models/diffusion.py).
The network sees the current diffusion state ``x_t`` (the residual over the cubic upsample, normalised) and the
condition (the cubic upsample itself, ``cond_channels`` adjacent slices for 2.5D), and predicts the clean
residual ``x_0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    cond_channels: int = 3  # adjacent slices of the cubic upsample (1: 2D, 3: 2.5D)
    base: int = 32  # channels at full resolution
    mults: tuple[int, ...] = (1, 2, 2)  # channel multiplier per level; len(mults) - 1 downsamplings
    blocks: int = 1  # residual blocks per level
    temb: int = 128  # timestep embedding width
    groups: int = 8  # GroupNorm groups

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetConfig:
        kw = dict(d)
        kw["mults"] = tuple(kw["mults"])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps ``t`` (B,) in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep as FiLM scale/shift on the second norm."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(temb, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class CondUNet(nn.Module):
    """(x_t (B,1,H,W), cond (B,C,H,W), t (B,)) -> predicted x_0 (B,1,H,W). H, W: any size (padded inside)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base * m for m in cfg.mults]
        self.temb = nn.Sequential(nn.Linear(cfg.temb, cfg.temb), nn.SiLU(), nn.Linear(cfg.temb, cfg.temb))
        self.stem = nn.Conv2d(1 + cfg.cond_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        cin = chans[0]
        skips: list[int] = []
        for i, c in enumerate(chans):
            level = nn.ModuleList()
            for _ in range(cfg.blocks):
                level.append(ResBlock(cin, c, cfg.temb, cfg.groups))
                cin = c
            self.down.append(level)
            skips.append(c)
            if i < len(chans) - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(cin, cin, cfg.temb, cfg.groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chans))):
            c = chans[i]
            level = nn.ModuleList()
            for b in range(cfg.blocks):
                level.append(ResBlock(cin + (skips[i] if b == 0 else 0), c, cfg.temb, cfg.groups))
                cin = c
            self.up.append(level)
            if i > 0:
                self.upsample.append(nn.Conv2d(c, chans[i - 1], 3, padding=1))
                cin = chans[i - 1]
        self.out_norm = nn.GroupNorm(min(cfg.groups, cin), cin)
        self.out = nn.Conv2d(cin, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h_in, w_in = x_t.shape[-2:]
        m = 2 ** (len(self.cfg.mults) - 1)
        ph, pw = (-h_in) % m, (-w_in) % m
        x = torch.cat([x_t, cond], dim=1)  # (B, 1+C, H, W)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        emb = self.temb(timestep_embedding(t, self.cfg.temb))  # (B, temb)
        h = self.stem(x)  # (B, base, H, W)
        skips: list[torch.Tensor] = []
        for i, level in enumerate(self.down):
            assert isinstance(level, nn.ModuleList)
            for blk in level:
                h = blk(h, emb)
            skips.append(h)  # (B, c_i, H/2^i, W/2^i)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h, emb)
        for j, level in enumerate(self.up):
            assert isinstance(level, nn.ModuleList)
            for b, blk in enumerate(level):
                h = blk(torch.cat([h, skips.pop()], dim=1) if b == 0 else h, emb)
            if j < len(self.upsample):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[j](h)
        y = self.out(F.silu(self.out_norm(h)))  # (B, 1, H+ph, W+pw)
        return y[..., :h_in, :w_in]
