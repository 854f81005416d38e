"""A short atheris run (20 s) of tests/ingest/fuzz_ingest.py in CI; ``make fuzz`` runs it for longer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_fuzz_parse_and_assemble_20s(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris not installed (pip install atheris, or make fuzz)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tests.ingest.fuzz_ingest", "-max_total_time=20", "-timeout=20", "-rss_limit_mb=3072",
                        f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(p.name for p in tmp_path.glob("timeout-*"))
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0 and not crashes, f"fuzzing found {crashes or 'a failure'} (rc {r.returncode}):\n{tail}"
    assert "Done" in tail, tail
