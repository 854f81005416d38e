"""Test engines: cubic output with a made-up but non-trivial uncertainty, so that tests which need sigma objects
(the Parametric Map, the SC card) do not have to wait for a learned engine."""

from __future__ import annotations

import numpy as np

from models.cubic import CubicEngine
from models.engine import ENGINES, EngineOptions, EngineResult, Factors, VolumeInput
from node.process import EngineCache

SIGMA_TEST_ENGINE = "sigma-test"


def ramp_sigma(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 sigma ramp 0..50 over the voxels (modality units), not representable in few bits."""
    size = int(np.prod(shape))
    return np.linspace(0, 50, size, dtype=np.float32).reshape(shape) + np.float32(1 / 3)


class SigmaCubic:
    """Cubic B-spline output with ``ramp_sigma`` as its uncertainty (``has_sigma`` True)."""

    name = SIGMA_TEST_ENGINE
    version = "0"

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.cubic = CubicEngine(options)

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        res = self.cubic.upscale(volume, factors)
        res.engine, res.has_sigma, res.sigma = self.name, True, ramp_sigma(res.data.shape)
        return res


def sigma_engines() -> EngineCache:
    """An engine cache that knows the shipped engines and ``sigma-test``."""
    return EngineCache({**ENGINES, SIGMA_TEST_ENGINE: SigmaCubic})
