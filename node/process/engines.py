"""The engine boundary of the node: an engine cache, the cubic fallback, the optional denoise step.

``models/`` is reached only through ``models.engine`` (and ``models.denoise``); its ``EngineError`` is translated
here, once, into ``node.errors.EngineError``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.engine import (
    ENGINES,
    Engine,
    EngineFactory,
    EngineOptions,
    EngineResult,
    Factors,
    Progress,
    VolumeInput,
    get_engine,
    resolved_cpu_precision,
    upscale,
)
from models.engine import EngineError as ModelsEngineError
from node.errors import EngineError

log = logging.getLogger(__name__)

FALLBACK_ENGINE = "cubic"


class EngineCache:
    """Engines built once per (name, options) and kept by their owner (a node, a worker): weights load once.

    ``registry``: engine name -> factory (default: the shipped engines, ``models.engine.ENGINES``). Thread-safe.
    ``get`` raises ``node.errors.EngineError`` naming the known engines for an unknown name.
    """

    def __init__(self, registry: Mapping[str, str | EngineFactory] = ENGINES) -> None:
        self.registry = registry
        self._engines: dict[tuple[str, EngineOptions], Engine] = {}
        self._lock = threading.Lock()

    def get(self, name: str, options: EngineOptions) -> Engine:
        key = (name, options)
        with self._lock:
            if key not in self._engines:
                try:
                    self._engines[key] = get_engine(name, options, self.registry)
                except ValueError as exc:
                    raise EngineError(str(exc)) from exc
            return self._engines[key]


SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights"  # the priors shipped with the engines


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_digest(options: EngineOptions, engine_version: str = "") -> str:
    """A digest (hex, 16 characters) of everything besides the input that shapes an engine's pixels: every
    ``EngineOptions`` field, the bytes of the prior weights it loads (``options.weights``, else the shipped
    ``models/weights/*.pt``) and the engine's code version (``engine_version``, the engine class's ``version``,
    bumped when its code gives other pixels for the same input). It enters the derived UIDs, so a re-run with
    other settings, weights or engine code makes new SOP instances instead of reusing the UIDs of different pixels
    (a PACS keeping the first copy would show stale pixels under a confirmed delivery). Unreadable weight files
    count by name only (the engine itself reports them). Version "1" (or none) leaves the digest as it was before
    versions entered it, so the results of engines whose code has not changed keep their UIDs."""
    # ``auto`` precision as it runs here: bf16 and float32 passes differ by up to a few HU
    options = dataclasses.replace(options, cpu_precision=resolved_cpu_precision(options.cpu_precision))
    fields = {k: str(v) for k, v in sorted(dataclasses.asdict(options).items())}
    paths = [Path(options.weights)] if options.weights else sorted(SHIPPED_WEIGHTS.glob("*.pt"))
    weights = {}
    for p in paths:
        try:
            st = p.stat()
            weights[p.name] = _file_digest(str(p), st.st_mtime_ns, st.st_size)
        except OSError:
            weights[p.name] = "unreadable"
    what: dict[str, object] = {"options": fields, "weights": weights}
    if engine_version not in ("", "1"):
        what["engine_version"] = engine_version
    blob = json.dumps(what, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


def _version_of(engines: EngineCache, options: EngineOptions, engine: object, result: EngineResult) -> str:
    """The version of the engine that made ``result``'s pixels. When ``engine`` handed back another engine's
    pixels (selfsup's self-checks fall back to cubic: ``result.engine`` is "cubic"), that engine's version and
    which version of ``engine`` decided it: "1 (fallback decided by selfsup 2)", so that SoftwareVersions never
    reads "cubic 2" (cubic has no version 2) and still says which code chose cubic."""
    own = str(getattr(engine, "version", ""))
    name = str(getattr(engine, "name", result.engine))
    if result.engine == name:
        return own
    other = str(getattr(engines.get(result.engine, options), "version", ""))
    return f"{other} (fallback decided by {name} {own})"


def run_engine(engines: EngineCache, name: str, options: EngineOptions, vin: VolumeInput,
               factors: Factors, progress: Progress | None = None) -> tuple[EngineResult, str]:
    """Upscale with ``name``; on EngineError or out-of-memory retry with cubic. Returns (result, engine version).

    ``progress`` gets the engine's long stages when it reports them (``models.engine.Progress``).

    ``vin.data`` is (Z, Y, X) float32 in modality units; the result's arrays are on the output grid
    (``models.engine.output_shape``). Raises ``node.errors.EngineError`` when cubic itself fails.
    """
    try:
        engine = engines.get(name, options)
        try:
            result = upscale(engine, vin, factors, progress)
        except ModelsEngineError as exc:  # the engine boundary: translated once
            raise EngineError(str(exc)) from exc
        return result, _version_of(engines, options, engine, result)
    except Exception as exc:
        if name == FALLBACK_ENGINE or not (isinstance(exc, EngineError) or _is_oom(exc)):
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"engine {name} failed: {type(exc).__name__}: {exc}") from exc
        reason = f"engine {name} failed ({'out of memory' if _is_oom(exc) else exc}); used {FALLBACK_ENGINE}"
        log.warning("%s", reason)
    engine = engines.get(FALLBACK_ENGINE, options)
    result = engine.upscale(vin, factors)
    result.fallback = (result.fallback + "; " if result.fallback else "") + reason
    return result, str(getattr(engine, "version", ""))


def denoise_input(vin: VolumeInput, options: EngineOptions) -> tuple[VolumeInput, np.ndarray, dict[str, Any]]:
    """The optional denoise step (``models.denoise``): (denoised input, its (Z, Y, X) sigma, report)."""
    # imported here, not at module level: it imports torch, which only a rule that denoises needs (node RSS)
    from models.denoise import denoise

    try:
        data, sigma, rep = denoise(vin, options)
    except ModelsEngineError as exc:
        raise EngineError(f"denoise: {exc}") from exc
    return dataclasses.replace(vin, data=np.asarray(data, dtype=np.float32)), np.asarray(sigma), dict(rep)


def add_denoise_sigma(engines: EngineCache, result: EngineResult, sigma_in: np.ndarray, options: EngineOptions,
                      vin: VolumeInput, factors: Factors) -> None:
    """Carry the denoiser's sigma to the output grid (cubic) and add it in quadrature (``result.has_sigma`` then)."""
    up = engines.get(FALLBACK_ENGINE, options).upscale(
        dataclasses.replace(vin, data=sigma_in.astype(np.float32), value_range=None), factors).data
    result.sigma = np.sqrt(result.sigma.astype(np.float64) ** 2 + np.maximum(up, 0) ** 2).astype(np.float32)
    result.has_sigma = True  # the denoiser's sigma is an estimate even when the engine (cubic) has none
