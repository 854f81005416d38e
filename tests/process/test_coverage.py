"""Every input slice ends in a derived series or is named, with why, where a user looks: the job report, the
``srnode process`` summary, ``srnode status`` (and --json). And the preview opens with the series' own window."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.app.phantom import write_phantom_series
from node.series import load_series
from tests.support.fixtures import ROOT, shared_case
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu


def srnode(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _isolated_first_slice(folder: Path) -> list[Path]:
    """Phantom slices 1, 2, 4, 6, 8, 10 of 10: steps 2.5, 5, 5, 5, 5 -> slice 1 shares its step with nobody."""
    files = write_phantom_series(folder / "all", slices=10, size=32, step_mm=2.5, fov_mm=200.0)
    keep = [files[k] for k in (0, 1, 3, 5, 7, 9)]
    for p in files:
        if p not in keep:
            p.unlink()
    return keep


def test_missing_slice_case_every_slice_in_a_derived_series(tmp_path: Path) -> None:
    files = shared_case("06-missing-slice", tmp_path / "in")
    r = srnode("process", tmp_path / "in", tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT IN ANY DERIVED SERIES" not in r.stdout
    vin = load_series(files)
    base = tmp_path / "out" / vin.series_uid
    runs = [load_series(sorted((base / f"derived-run{k}").glob("*.dcm"))) for k in (1, 2)]
    assert [r.shape[0] for r in runs] == [3, 49]  # 2 slices -> 3, 25 slices -> 49 (factor 2)
    descs = [str(r.datasets[0].SeriesDescription) for r in runs]
    assert "run 1/2" in descs[0] and "run 2/2" in descs[1]
    assert "input slices 1-2 of 27" in runs[0].datasets[0].DerivationDescription
    # every acquired slice is found, with its values, at its own position in one of the derived series
    for z in range(vin.shape[0]):
        hits = [(r, k) for r in runs for k in range(r.shape[0])
                if np.linalg.norm(r.positions[k] - vin.positions[z]) < 1e-3]
        assert len(hits) == 1, f"input slice {z + 1}: {len(hits)} derived slices at its position"
        r, k = hits[0]
        assert np.max(np.abs(r.data[k] - vin.data[z])) == 0.0


def test_process_summary_names_a_slice_in_no_derived_series(tmp_path: Path) -> None:
    files = _isolated_first_slice(tmp_path / "in")
    r = srnode("process", tmp_path / "in", tmp_path / "out", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "NOT IN ANY DERIVED SERIES" in ln]
    assert len(lines) == 1, r.stdout
    assert f"slice 1/6 {files[0].name}: isolated between irregular slice steps" in lines[0]
    # the one derived series is labelled with the input slices it holds, not as "run 1/1" (the whole series)
    derived = sorted((tmp_path / "out").glob("*/derived-run1/*.dcm"))
    assert len(derived) == 9  # slices 2..6 (5 at 5 mm) x2 -> 9
    desc = pydicom.dcmread(derived[0], stop_before_pixels=True).SeriesDescription
    assert "slices 2-6 of 6" in desc and "run 1/1" not in desc


def test_status_names_a_slice_in_no_derived_series(tmp_path: Path) -> None:
    files = _isolated_first_slice(tmp_path / "in")
    sop = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    with NodeProc.start(tmp_path / "node") as node:
        r = storescu(files, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stderr
        node.wait_jobs(lambda js: js and all(j["state"] in ("delivered", "failed") for j in js), timeout=120,
                       what="job delivered")
        jobs = node.status_cli()
        text = node.cli("status")
    assert [j["state"] for j in jobs] == ["delivered"], jobs
    left = jobs[0]["left_out"]
    assert [(x["index"], x["of"], x["sop_instance_uid"]) for x in left] == [(1, 6, sop)]
    assert "isolated" in left[0]["reason"] and left[0]["file"]
    assert jobs[0]["report"]["left_out"] == left  # the job's report holds it too
    assert text.returncode == 0
    assert f"NOT IN ANY DERIVED SERIES: slice 1/6 {left[0]['file']}: isolated" in text.stdout, text.stdout


def test_preview_opens_with_the_series_window(tmp_path: Path) -> None:
    # case 01: 20 MPRAGE slices; the first is noise, windowed 9/19 on itself
    shared_case("01-per-slice-rescale-slope", tmp_path / "in")
    r = srnode("process", tmp_path / "in", tmp_path / "out", "--engine", "cubic")
    assert r.returncode == 0, r.stdout + r.stderr
    png = next((tmp_path / "out").glob("*/preview.png"))
    img = np.asarray(Image.open(png))
    assert np.mean(img >= 250) < 0.01  # was 12 % of the canvas white with the first slice's window
