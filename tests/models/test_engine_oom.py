"""GPU out-of-memory in ``selfsup``: the run is retried with smaller tiles and batches, then a clear EngineError
(the node falls back to cubic). CUDA memory errors are injected, so this runs on the CPU."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from models import internal as il
from models import selfsup
from models.degrade import degrade_through_plane
from models.engine import EngineError, EngineOptions, Factors, VolumeInput, get_engine

OPTS = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-1e9)


def _volume() -> VolumeInput:
    rng = np.random.default_rng(0)
    truth = rng.normal(40, 30, (17, 48, 48)).astype(np.float32)
    return VolumeInput(degrade_through_plane(truth, 2, 2.0), (2.0, 0.8, 0.8), 2.0, "CT")


def _fail_until(monkeypatch: pytest.MonkeyPatch, tile: int | None) -> list[int]:
    """Inference raises CUDA OOM until the engine asks for ``tile``-pixel tiles (None: always); returns the tile
    sizes the engine tried (the small validation images, always untiled, run after the passes)."""
    seen: list[int] = []
    real = il.residual

    def residual(net: Any, lr: torch.Tensor, task: il.Task, flip: tuple[int, ...], max_pixels: int = 0,
                 **kw: Any) -> Any:
        seen.append(max_pixels)
        if tile is None or tile not in seen:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(net, lr, task, flip, max_pixels, **kw)

    monkeypatch.setattr(il, "residual", residual)
    return seen


def test_out_of_memory_retries_with_smaller_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = get_engine("selfsup", OPTS).upscale(_volume(), Factors(2, 1))
    seen = _fail_until(monkeypatch, selfsup.OOM_TILES[1])
    res = get_engine("selfsup", OPTS).upscale(_volume(), Factors(2, 1))
    assert res.engine == "selfsup" and not res.fallback
    assert res.report["oom_retries"] == 2 and res.report["max_voxels_per_tile"] == selfsup.OOM_TILES[1]
    assert res.report["mem_fraction"] < 0.4 / 10
    assert seen[0] == 0 and selfsup.OOM_TILES[0] in seen  # untiled first, then each smaller tile
    assert np.allclose(res.data, expected.data, atol=1e-3)  # tiling is exact up to float rounding


def test_out_of_memory_everywhere_is_a_clear_engine_error(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fail_until(monkeypatch, None)
    with pytest.raises(EngineError, match=r"out of GPU memory on \(9, 48, 48\) even with 8192-pixel tiles"):
        get_engine("selfsup", OPTS).upscale(_volume(), Factors(2, 1))
    assert sorted(set(seen)) == sorted({0, *selfsup.OOM_TILES})
