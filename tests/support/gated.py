"""The real node with one more engine for tests, ``gated``: cubic that waits at a gate the test opens, so that a
test can hold a job in 'processing' for as long as it needs (late instances arriving meanwhile) without timing.

    NodeProc.start(workdir, sections, module="tests.support.gated", env={GATE_ENV: str(gate_dir)})

is ``srnode`` (``node.app.cli``) with ``gated`` added to the engines; a rule selects it with ``engine = "gated"``.
The gate is the folder named by the environment variable ``SRNODE_TEST_GATE``: the k-th call of the engine in the
process (k = 1, 2, ...) writes ``entered-k`` there, then waits until ``open-k`` or ``open-all`` exists (at most
``MAX_WAIT_S``: a test that forgets its gate still ends).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

from models.cubic import CubicEngine
from models.engine import ENGINES, EngineOptions, EngineResult, Factors, VolumeInput
from node.process import EngineCache

GATE_ENV = "SRNODE_TEST_GATE"
GATED_ENGINE = "gated"
MAX_WAIT_S = 600.0
_calls = itertools.count(1)


def entered(gate: Path, k: int) -> bool:
    """Whether the k-th engine call has reached the gate."""
    return (gate / f"entered-{k}").exists()


def open_gate(gate: Path, k: int | None = None) -> None:
    """Let the k-th engine call through (every call, now and later, when ``k`` is None)."""
    (gate / ("open-all" if k is None else f"open-{k}")).touch()


class GatedCubic:
    """Cubic B-spline output, after the gate of its call opened."""

    name = GATED_ENGINE
    version = "0"

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.cubic = CubicEngine(options)

    def upscale(self, volume: VolumeInput, factors: Factors) -> EngineResult:
        gate = Path(os.environ[GATE_ENV])
        k = next(_calls)
        (gate / f"entered-{k}").touch()
        deadline = time.monotonic() + MAX_WAIT_S
        while not ((gate / f"open-{k}").exists() or (gate / "open-all").exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        res = self.cubic.upscale(volume, factors)
        res.engine = self.name
        return res


# the node's engine caches (EngineCache() in JobContext) know the shipped engines and this one
EngineCache.__init__.__defaults__ = ({**ENGINES, GATED_ENGINE: GatedCubic},)

if __name__ == "__main__":
    from node.app.cli import main

    sys.exit(main())
