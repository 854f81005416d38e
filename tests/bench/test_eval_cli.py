"""``srnode eval`` on cropped real series: simulated thick input, and a real 5 mm series against its 1 mm truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.fixtures import ROOT, shared_series

KEYS = {"psnr_db", "ssim", "hu_mae", "hu_bias"}


def _eval(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "node.app.cli", "eval", *args, "--device", "cpu", "--finetune-steps", "10",
           "--tta-passes", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PSNR" in proc.stdout and "cubic" in proc.stdout  # the one-line summary
    assert "s, whole run " in proc.stdout and "; engine " in proc.stdout, proc.stdout
    assert out.with_suffix(".png").stat().st_size > 1000  # the panel beside the JSON
    return json.loads(out.read_text())


def test_eval_simulated_through_plane_writes_all_figures(tmp_path: Path) -> None:
    series = shared_series("ct_head_phantom_philips_1mm")
    doc = _eval([str(series), "--axis", "through", "--factor", "2", "--max-slices", "13", "--crop", "64"],
                tmp_path / "ct.json")
    for k in ("engine", "cubic", "linear"):
        assert KEYS <= set(doc[k]), doc[k]
    assert {"spearman", "coverage_95", "ause_ratio"} <= set(doc["uncertainty"])
    assert doc["seconds"] > 0 and doc["compared_shape"] == [13, 64, 64] and doc["input_shape"] == [7, 64, 64]
    # the engine's seconds and the whole command's, named apart (a new user read 159 s for a 6 min 37 s run)
    assert doc["engine_seconds"] == doc["seconds"] and doc["wall_seconds"] > doc["engine_seconds"]
    assert doc["cubic"]["psnr_db"] > doc["linear"]["psnr_db"] - 1.0  # sane baselines on a real phantom
    assert abs(doc["cubic"]["hu_bias"]) < 50


def test_eval_against_real_thin_truth(tmp_path: Path) -> None:
    thick = shared_series("ct_head_phantom_philips_5mm")
    thin = shared_series("ct_head_phantom_philips_1mm")
    doc = _eval([str(thick), "--truth", str(thin), "--factor", "5", "--max-slices", "4", "--crop", "48"],
                tmp_path / "pair.json")
    assert doc["truth"] == thin.name and doc["input_shape"] == [4, 48, 48]
    assert doc["compared_shape"][0] == 16  # (4 - 1) * 5 + 1 output slices, each at a thin slice position
    assert KEYS <= set(doc["engine"])


def test_eval_help_explains_every_option_and_its_default() -> None:
    """``srnode eval -h``: --axis and --factor had no help, no default was shown and --profile said "see
    ThickProfile" (a class name) (helper user19)."""
    proc = subprocess.run([sys.executable, "-m", "node.app.cli", "eval", "-h"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    groups: dict[str, str] = {}  # option -> its help, wrapping undone
    name = ""
    for ln in proc.stdout.splitlines():
        if ln.startswith("  -"):
            name = ln.split()[0].rstrip(",")
        if name:
            groups[name] = groups.get(name, "") + " " + " ".join(ln.split())
    text = " ".join(proc.stdout.split())

    def option(opt: str) -> str:
        return groups[opt.split()[0]]

    assert "coarser in-plane matrix" in option("--axis {through,in}") and "(default: through)" in option("--axis {through,in}")
    assert "the factor f" in option("--factor FACTOR") and "(default: 2)" in option("--factor FACTOR")
    assert "(default: 0)" in option("--seed SEED") and "(default: None)" not in text
    profile = option("--profile {discrete,box-fine,gaussian,trapezoid,decimate}")
    for words in ("trapezoid: a trapezoid slice profile", "discrete: the engine's own operator", "decimate: every"):
        assert words in profile, profile
    assert "ThickProfile" not in text
