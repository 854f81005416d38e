"""Inference forward of ``SRNet`` through ``torch.compile`` on CUDA; eager everywhere else.

The compiled function is functional (the weights are inputs), built once per process per (net config, device)
with dynamic shapes, so new nets of the same config (one per series, fine-tuned or not) and new volume shapes
reuse it without recompiling. The first call pays the compilation (seconds); if compilation or a compiled call
fails the config falls back to eager for the rest of the process, with a log line. CPU always runs eager
(``SRNet.forward``), so CPU results are unchanged. torch only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.nets import SRNet, SRNetConfig

log = logging.getLogger(__name__)

ENABLED = True  # compile the inference forward on CUDA

Forward = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
_cache: dict[tuple[SRNetConfig, str], Forward | None] = {}  # None: compilation failed, eager from then on
_lock = threading.Lock()


def _functional(cfg: SRNetConfig) -> Forward:
    """SRNet.forward with the conv weights and biases as inputs (body convs then the head, in order)."""
    fz, fx, slope = cfg.fz, cfg.fx, 0.1

    def forward(lr: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        # lr: (B, 1, H, W) -> residual (B, 1, H*fz, W*fx); params: [w0, b0, w1, b1, ..., w_head, b_head]
        b, _, h, w = lr.shape
        x = lr.contiguous(memory_format=torch.channels_last)
        n = len(params) // 2
        for i in range(n):
            x = F.conv2d(x, params[2 * i], params[2 * i + 1], padding=1)
            if i < n - 1:
                x = F.leaky_relu(x, slope)
        r = x.view(b, fz, fx, h, w).permute(0, 3, 1, 4, 2)  # (B, H, fz, W, fx)
        return r.reshape(b, 1, h * fz, w * fx)

    return forward


def _params(net: SRNet) -> list[torch.Tensor]:
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)] + [net.head]
    out: list[torch.Tensor] = []
    for c in convs:
        out += [c.weight.detach(), c.bias.detach()]  # type: ignore[union-attr]
    return out


def _compiled(cfg: SRNetConfig, device: torch.device) -> Forward | None:
    key = (cfg, str(device))
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = torch.compile(_functional(cfg), dynamic=True)  # type: ignore[assignment]
            except Exception as exc:  # no compiler backend on this install
                log.warning("torch.compile unavailable for %s on %s, eager inference: %s", cfg, device, exc)
                _cache[key] = None
        return _cache[key]


def infer(net: SRNet, lr: torch.Tensor) -> torch.Tensor:
    """``net(lr)`` for inference (no grad; autocast as set by the caller): compiled on CUDA, eager elsewhere."""
    if not ENABLED or lr.device.type != "cuda" or net.training:
        return net(lr)
    fn = _compiled(net.cfg, lr.device)
    if fn is None:
        return net(lr)
    try:
        return fn(lr, _params(net))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # compilation (lazy, on the first call) or a compiled call failed
        log.warning("compiled SRNet %s failed on %s (%s: %s); eager inference from now on", net.cfg,
                    tuple(lr.shape), type(exc).__name__, exc)
        with _lock:
            _cache[(net.cfg, str(lr.device))] = None
        return net(lr)
