"""The engine boundary: one narrow interface between the node and every super-resolution engine.

The node hands an engine a ``VolumeInput`` (float32 modality units, axes (z, y, x), voxel spacing in mm and the
acquisition's slice profile) and ``Factors``; the engine returns an ``EngineResult``. Nothing here knows DICOM.

Geometry contract (the node relies on it):
- through-plane factor f over N input slices gives (N-1)*f + 1 output slices; output slice k*f lies exactly at
  input slice k (the first and last input positions are kept), spacing dz / f;
- in-plane factor f gives (Y*f, X*f) pixels with spacing dy / f, dx / f, pixel centres aligned so that the
  first output pixel centre lies at the first input pixel centre minus (f-1)/(2f) of an input pixel.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import numpy as np


class EngineError(RuntimeError):
    """Any internal engine failure (bad input, out of memory, unreadable weights), with the reason in words.

    ``models/`` knows nothing of the node: the node translates this once, at its boundary (node/process/engines.py),
    into ``node.errors.EngineError``, and falls back to cubic.
    """


__all__ = ["ENGINES", "FACTOR_LIMITS", "CpuPrecision", "Device", "EngineError", "EngineOptions", "EngineResult", "Factors", "Progress",
           "TorchCompile", "VolumeInput", "available", "factor_problem", "get_engine", "upscale"]

# The accepted upscaling factors per axis, (lowest, highest) inclusive: the one source of these bounds (the node's
# config names its own key with them, ``Factors`` checks them).
FACTOR_LIMITS: dict[str, tuple[int, int]] = {"through_plane": (1, 8), "in_plane": (1, 4)}


def factor_problem(axis: str, value: int) -> str:
    """Why ``value`` is not an accepted factor for ``axis`` ("through_plane" | "in_plane"), or "" when it is.

    Raises KeyError for an unknown axis.
    """
    lo, hi = FACTOR_LIMITS[axis]
    return "" if lo <= value <= hi else f"{value} must be {lo}..{hi}"


@dataclass(frozen=True)
class Factors:
    """Upscaling factors (dimensionless): through-plane (slices) and in-plane (rows and columns).

    Raises ValueError for a factor outside ``FACTOR_LIMITS``.
    """

    through_plane: int = 2
    in_plane: int = 1

    def __post_init__(self) -> None:
        for axis, value in (("through_plane", self.through_plane), ("in_plane", self.in_plane)):
            problem = factor_problem(axis, value)
            if problem:
                raise ValueError(f"Factors.{axis}: {problem}")


@dataclass(frozen=True)
class VolumeInput:
    """What an engine sees of a series."""

    data: np.ndarray  # (Z, Y, X) float32, modality units (HU for CT)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm; dz = step between slice centres
    slice_thickness: float  # mm, FWHM of the slice profile (SliceThickness); <= 0: unknown, use dz
    modality: str = ""  # "CT", "MR", ... (for body masks and value ranges)
    value_range: tuple[float, float] | None = None  # representable range in modality units (clip to it)
    profile: str = "box"  # slice profile shape: "box" | "gaussian"

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"VolumeInput.data: expected 3 dims (z, y, x), got shape {self.data.shape}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"VolumeInput.spacing: all spacings must be > 0, got {self.spacing}")


@dataclass
class EngineResult:
    data: np.ndarray  # (Z', Y', X') float32, modality units
    sigma: np.ndarray  # (Z', Y', X') float32, calibrated 1-sigma in modality units (0 for deterministic engines)
    spacing: tuple[float, float, float]  # (dz', dy', dx') mm
    engine: str  # the engine that produced ``data`` (after any fallback)
    fallback: str = ""  # non-empty: why the requested engine was not used ("internal gain 0.1 dB < 0.3 dB")
    report: dict[str, Any] = field(default_factory=dict)  # figures for the job record (gain, residual, seconds)
    # whether ``sigma`` is an uncertainty estimate at all: False for deterministic engines (cubic, and any
    # engine's fallback to it), whose ``sigma`` is all zeros by convention; the node writes no sigma object then
    has_sigma: bool = True


class Progress(Protocol):
    """Where an engine reports its long stages: ``stage`` a short name ("through fine-tune", "through passes",
    "in passes", ...), ``done`` of ``total`` units of it (steps, batches of slices), ``loss`` the training loss
    of the step just done (fine-tuning stages only). Called from the engine's thread, often (once per step): a
    caller that draws should throttle (tqdm does). ``models/`` only calls it; drawing is the caller's business."""

    def __call__(self, stage: str, done: int, total: int, loss: float | None = None) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """An engine. ``upscale``'s optional ``progress`` gets its long stages (``Progress``); callers pass it only
    when they have one, so an engine that does not take it still works without progress."""

    name: str
    version: str

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult: ...


class Device(StrEnum):
    """Where an engine runs: ``auto`` (CUDA when available, else the CPU), ``cpu`` or ``cuda``."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class CpuPrecision(StrEnum):
    """Arithmetic of the network passes on the CPU (inference only: training, data consistency, sigma and all
    after the network stay float32): ``auto`` (bf16 where the CPU has native bf16 convolutions, AVX-512 BF16 or
    AMX, detected at run time; else float32), ``bf16`` or ``float32`` (bit-stable across CPUs; on an AMX CPU
    ~2-3x slower). bf16 changes the residual by <= ~0.5 % of itself (~1e-4 of the data range)."""

    AUTO = "auto"
    BF16 = "bf16"
    FLOAT32 = "float32"


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX-512 BF16 / AMX, oneDNN): there bf16 inference
    measured 2x faster than float32 (2-core shared CPU, ``SRNet`` 6 x 32 on 32 x 67 x 512 images) with a
    residual error of <= 0.5 % of the residual (~1e-4 of the data range)."""
    import torch  # only once an engine asks: this module stays importable without torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolved_cpu_precision(precision: CpuPrecision) -> CpuPrecision:
    """``precision`` as it runs on this machine's CPU: ``auto`` becomes ``bf16`` where the CPU has native bf16
    convolutions (:func:`cpu_bf16`), else ``float32``; the others are themselves. The node's UID
    digest and the engine report use this, so one config on two CPUs that compute differently is told apart."""
    if precision != CpuPrecision.AUTO:
        return precision
    return CpuPrecision.BF16 if cpu_bf16() else CpuPrecision.FLOAT32


class TorchCompile(StrEnum):
    """Whether the network passes run through ``torch.compile`` (CUDA only; ignored on the CPU): ``none`` (eager),
    ``default`` (inductor's default mode) or ``max-autotune`` (inductor benchmarks kernel choices, Triton
    convolution templates included; no CUDA graphs, since the batch shapes vary). Compiled once per net shape and
    process; the compile time is reported apart (``through_compile_s``)."""

    NONE = "none"
    DEFAULT = "default"
    MAX_AUTOTUNE = "max-autotune"


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings the node passes through: the one field list of config.toml's ``[engine]`` table.

    The node's config reads every field here from ``[engine]`` under the same key (``engine.tta_passes``), beside
    ``name``; a field added here is a config key at once. Counts are numbers of steps, passes and samples; ``min_gain_db`` is in dB,
    ``max_voxels_per_tile`` in voxels (0: sized from free memory), ``weights`` a file path ("": the shipped prior).
    """

    device: Device = Device.AUTO
    fast: bool = False
    finetune_steps: int = 200
    in_plane_finetune_steps: int = 0  # selfsup in-plane (ZSSR) fine-tuning steps; < 0: finetune_steps
    tta_passes: int = 8
    samples: int = 8
    weights: str = ""  # prior weights; "": the shipped prior in models/weights
    seed: int = 0
    min_gain_db: float = 0.3
    max_voxels_per_tile: int = 0  # tile size limit; 0: sized from free GPU/CPU memory
    torch_compile: TorchCompile = TorchCompile.NONE  # network passes through torch.compile (CUDA only)
    cpu_precision: CpuPrecision = CpuPrecision.AUTO  # network passes on the CPU: bf16 where native (auto), or fixed


EngineFactory = Callable[[EngineOptions], Engine]

# name -> "module:factory" of the shipped engines. An engine is a module of models/ whose factory (usually the
# engine class) takes EngineOptions; adding one is a module and a line here. Read-only: a caller that needs
# another set (a test's broken engine) passes its own registry.
ENGINES: Mapping[str, str | EngineFactory] = MappingProxyType({
    "cubic": "models.cubic:CubicEngine",
    "selfsup": "models.selfsup:SelfSupEngine",
    "diffusion": "models.diffusion:DiffusionEngine",
})


def available(registry: Mapping[str, str | EngineFactory] = ENGINES) -> list[str]:
    """The engine names of ``registry``, sorted."""
    return sorted(registry)


def get_engine(name: str, options: EngineOptions | None = None,
               registry: Mapping[str, str | EngineFactory] = ENGINES) -> Engine:
    """A new engine ``name`` from ``registry`` built with ``options``; ValueError names the known engines."""
    if name not in registry:
        raise ValueError(f"engine {name!r} is not known; available: {', '.join(sorted(registry))}")
    factory = registry[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(options or EngineOptions())


def upscale(engine: Engine, volume: VolumeInput, factors: Factors,
            progress: Progress | None = None) -> EngineResult:
    """``engine.upscale(volume, factors)``, handing it ``progress`` when one is given and the engine's ``upscale``
    takes a ``progress`` parameter (the selfsup engine does; cubic and foreign engines run without)."""
    if progress is not None and "progress" in inspect.signature(engine.upscale).parameters:
        return engine.upscale(volume, factors, progress=progress)  # type: ignore[call-arg]
    return engine.upscale(volume, factors)


def output_shape(shape: tuple[int, int, int], factors: Factors) -> tuple[int, int, int]:
    z, y, x = shape
    return ((z - 1) * factors.through_plane + 1, y * factors.in_plane, x * factors.in_plane)
