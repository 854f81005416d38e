"""``srnode process`` run as a user types it, with a small config for the engine under test (CPU, fast mode, two
TTA passes, float32), for the tests that check what the engine's choices do to the derived objects and the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_ENGINE_CONFIG = """
[engine]
name = "{engine}"
device = "cpu"
fast = true
tta_passes = 2
min_gain_db = {min_gain}
cpu_precision = "float32"

[[destinations]]
name = "unused"
kind = "folder"
path = "{out}/unused"

[[rules]]
name = "sr"
match = {{ Modality = "CT" }}
through_plane_factor = 2
destinations = ["unused"]
"""


def engine_config(path: Path, engine: str = "selfsup", min_gain_db: float = -99.0) -> Path:
    """Write at ``path`` a config for ``engine`` on the CPU in fast mode; ``min_gain_db`` is the self-check's bar
    (-99: never falls back to cubic; 99: always does). Its one folder destination lies beside ``path``."""
    path.write_text(_ENGINE_CONFIG.format(out=path.parent, engine=engine, min_gain=min_gain_db))
    return path


def run_process(src: Path, out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``srnode process SRC OUT --config CONFIG --no-preview EXTRA…`` from the repository root; asserts exit 0
    (the message: its stdout and stderr)."""
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--config", str(config),
                        "--no-preview", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r
