"""A rule selects the engine and the denoise step: the generative engine and the self-supervised denoiser run
through `srnode process` (the node's own pipeline) like any other, and the derived series says what ran."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from node.app.phantom import write_phantom_series

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[engine]
name = "cubic"
device = "cpu"
samples = 2
finetune_steps = 8
min_gain_db = -99.0
weights = "none"

[[destinations]]
name = "unused"
kind = "folder"
path = "{out}/unused"

[[rules]]
name = "generative"
match = {{ Modality = "CT" }}
through_plane_factor = 2
engine = "diffusion"
denoise = true
destinations = ["unused"]
"""


def test_rule_selects_diffusion_and_denoise(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_phantom_series(src, slices=7, size=32, step_mm=2.5)
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(out=tmp_path))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--config", str(cfg),
                        "--no-preview"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.glob("*/derived/*.dcm"))
    assert len(derived) == (7 - 1) * 2 + 1
    ds = dcmread(derived[0], stop_before_pixels=True)
    equipment = ds.ContributingEquipmentSequence[0]
    assert "diffusion" in ds.DerivationDescription and "diffusion" in str(equipment.ContributionDescription), \
        ds.DerivationDescription
    assert "fallback" not in ds.DerivationDescription
    assert "denois" in ds.DerivationDescription.lower(), ds.DerivationDescription
