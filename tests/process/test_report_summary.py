"""``report.json``'s ``summary`` block: the short answer to "is it better than cubic, can its sigma be trusted"
at the top of the file and on the result line of ``srnode process`` (a new user found ~50 undocumented engine
fields and no word of the gain: helper user19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node.app.phantom import write_phantom_series
from tests.support.process import ROOT, engine_config, run_process


def _process(tmp_path: Path, engine: str, min_gain: float = -99.0) -> tuple[dict, str]:
    src = tmp_path / "in"
    write_phantom_series(src, slices=9, size=64, step_mm=3.0, fov_mm=96.0)
    out = tmp_path / "out"
    r = run_process(src, out, engine_config(tmp_path / "config.toml", engine, min_gain), "--quiet")
    (report,) = out.glob("*/report.json")
    return json.loads(report.read_text()), r.stdout


def test_the_summary_of_a_cubic_run_says_cubic_and_counts_the_slices(tmp_path: Path) -> None:
    doc, stdout = _process(tmp_path, "cubic")
    assert next(iter(doc)) == "summary"  # first in the file
    s = doc["summary"]
    assert s["engine"] == "cubic" and s["made_by"] == "cubic" and s["fallback"] is False
    assert s["gain_over_cubic_db"] is None and s["sigma_coverage_95"] is None
    assert (s["slices_in"], s["slices_out"], s["input_slices_left_out"]) == (9, 17, 0)
    assert "summary" not in doc["report"]  # once, at the top
    assert f"summary: {s['line']}" in stdout
    assert "9 slices in, 17 out" in s["line"] and "baseline" in s["line"]


def test_the_summary_of_the_fast_engine_gives_its_gain_over_cubic_and_sigma_coverage(tmp_path: Path) -> None:
    doc, stdout = _process(tmp_path, "selfsup")
    s = doc["summary"]
    rep = doc["report"]["runs"][0]["engine_report"]
    assert s["engine"] == "selfsup" and s["made_by"] == "selfsup" and s["fallback"] is False
    assert s["gain_over_cubic_db"] == rep["through_internal_gain_db"]
    assert s["gain_over_cubic_along_z_db"] == rep["through_z_pairs_gain_db"]
    assert s["sigma_coverage_95"] == rep["through_internal_coverage_95"]
    assert 0.0 <= s["sigma_coverage_95"] <= 1.0
    assert "held-out pairs of this series" in s["gain_pairs"]
    assert (s["slices_in"], s["slices_out"]) == (9, 17)
    verdict = "better than cubic" if s["gain_over_cubic_db"] > 0 else "NOT better than cubic"
    assert f"self-check: {verdict}, {s['gain_over_cubic_db']:+.2f} dB on held-out pairs" in s["line"]
    assert "sigma calibrated" in s["line"] or "sigma too narrow" in s["line"] or "conservative" in s["line"]
    assert f"summary: {s['line']}" in stdout


def test_the_summary_of_a_fallback_says_so_with_the_reason_and_the_measured_gain(tmp_path: Path) -> None:
    doc, stdout = _process(tmp_path, "selfsup", min_gain=99.0)
    s = doc["summary"]
    assert s["engine"] == "selfsup" and s["made_by"] == "cubic" and s["fallback"] is True
    assert "internal gain" in s["fallback_reason"] and isinstance(s["gain_over_cubic_db"], float)
    assert "FELL BACK to cubic" in s["line"] and f"summary: {s['line']}" in stdout


def test_the_summary_of_an_incomplete_series_says_so(tmp_path: Path) -> None:
    """A series holding fewer instances than its images declare: the summary carries ``incomplete`` too."""
    from tests.process.test_declared_size import _declared

    files = _declared(tmp_path)
    files[7].unlink()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out), "--engine",
                        "cubic", "--no-preview", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (report,) = out.glob("*/report.json")
    s = json.loads(report.read_text())["summary"]
    assert "made from 7 of the 8 instance(s)" in s["incomplete"] and s["line"].endswith("; INCOMPLETE input")
    assert f"summary: {s['line']}" in r.stdout


def test_the_summary_line_says_its_verdicts_in_words_and_names_the_worst_of_several_volumes() -> None:
    """A last fresh-clone user read figures without a verdict ("is +4.25 good? is 0.98 good?") and one line for three
    fMRI volumes that did not say its figures were the worst volume's."""
    from node.process.summary import summarize

    def run(gain: float, cov: float, cov_z: float) -> dict:
        return {"engine": "selfsup", "slices_in": 17, "slices_out": 33, "engine_report": {
            "through_internal_gain_db": gain, "through_z_pairs_gain_db": gain - 3, "through_internal_coverage_95": cov,
            "through_sigma_z_pairs_coverage_shipped": cov_z}}

    s = summarize({"runs": [run(4.25, 0.95, 0.96), run(5.0, 0.977, 0.99), run(6.0, 0.96, 0.94)]}, "selfsup", "")
    assert s["gain_over_cubic_db"] == 4.25  # the lowest gain
    assert s["sigma_coverage_95"] == 0.977 and s["sigma_coverage_95_along_z"] == 0.99  # the farthest from 0.95
    line = s["line"]
    assert "self-check: better than cubic, +4.25 dB on held-out pairs of this series (+1.25 dB along z) " \
           "(worst of 3 volumes)" in line, line
    assert "0.98 on those pairs (sigma wider than its errors: conservative)" in line, line
    one = summarize({"runs": [run(-0.5, 0.90, 0.95)]}, "selfsup", "")["line"]
    assert "NOT better than cubic, -0.50 dB" in one and "sigma too narrow: trust it less" in one
    assert "0.95 along z (sigma calibrated)" in one and "worst of" not in one
    assert "51 slices in, 99 out in 3 derived series" in line and "derived series" not in one
