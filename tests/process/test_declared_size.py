"""``srnode process`` on a folder missing slices of a series whose every image declares its size (ImagesInAcquisition,
one acquisition). field19, measured on the shared 5 mm phantom (28 slices, ImagesInAcquisition 28 written on each),
its first slice left out: 53 derived slices from 27, exit 0, nothing said, ``srnode check`` OK; a slice missing at
either end of the stack leaves no gap for the irregular-step note, and the node (complete13) already said
"INCOMPLETE: made from 6 of the 8 ..." for the same series. Now ``process`` says it as the node does: a line, a
WARNING and the report's ``declared`` / ``incomplete``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from tests.support.fixtures import shared_series

CT5 = "ct_head_phantom_philips_5mm"


def _declared(tmp_path: Path, n: int = 8, declare: Callable[[int], int] | None = None,
              acquisition: Callable[[int], int] = lambda k: 1) -> list[Path]:
    """``n`` consecutive slices of the 5 mm phantom, slice k declaring ImagesInAcquisition ``declare(k)`` (default
    n), AcquisitionNumber ``acquisition(k)``; the files in ``tmp_path / "in"``, in slice order."""
    src = sorted(shared_series(CT5).glob("*.dcm"),
                 key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))[10:10 + n]
    folder = tmp_path / "in"
    folder.mkdir()
    out = []
    for k, f in enumerate(src):
        ds: Dataset = pydicom.dcmread(f)
        ds.ImagesInAcquisition = declare(k) if declare is not None else n
        ds.AcquisitionNumber = acquisition(k)
        ds.save_as(folder / f"CT{k + 1:04d}.dcm")
        out.append(folder / f"CT{k + 1:04d}.dcm")
    return out


def _process(folder: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(folder), str(out), "--engine", "cubic",
                           "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)


def _report(out: Path) -> dict[str, object]:
    [path] = out.rglob("report.json")
    return json.loads(path.read_text())["report"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("gone", [[0], [7], [0, 1], [6, 7]], ids=["first", "last", "first-two", "last-two"])
def test_slices_missing_at_an_end_of_a_declared_series_are_said(tmp_path: Path, gone: list[int]) -> None:
    files = _declared(tmp_path)
    for k in gone:
        files[k].unlink()
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr  # derived from what is there, as the node does
    left = 8 - len(gone)
    said = f"INCOMPLETE: made from {left} of the 8 instance(s) the series declares (ImagesInAcquisition); " \
           f"{len(gone)} not in {files[0].parent}"
    assert said in r.stdout, r.stdout  # before: nothing (the stack regular, no gap)
    assert "WARNING" in r.stderr and f"made from {left} of the 8" in r.stderr, r.stderr
    report = _report(out)
    assert report["declared"] == {"instances": 8, "by": "ImagesInAcquisition", "missing": len(gone)}, report
    assert len(list(out.rglob("derived/*.dcm"))) == 2 * left - 1
    result = check_folders(files[0].parent if files[0].exists() else files[-1].parent, out, run_dciodvfy=False)
    assert result.ok, result.lines()
    assert [ln for ln in result.incomplete if f"INCOMPLETE, {left} of the 8 instance(s)" in ln], result.lines()
    assert not result.reported, result.lines()  # derived, not "reported as not processed"


def test_check_fails_an_output_whose_report_does_not_say_it_is_incomplete(tmp_path: Path) -> None:
    """``srnode check`` counts the instances the inputs declare with its own reader: an output made before this
    fix (its report.json without ``incomplete``) FAILS."""
    files = _declared(tmp_path)
    files[0].unlink()
    out = tmp_path / "out"
    assert _process(files[1].parent, out).returncode == 0
    [path] = out.rglob("report.json")
    record = json.loads(path.read_text())
    del record["report"]["incomplete"], record["report"]["declared"]
    path.write_text(json.dumps(record))
    result = check_folders(files[1].parent, out, run_dciodvfy=False)
    assert not result.ok
    assert [ln for ln in result.unreported if "holds 7 of the 8 instance(s) its images declare" in ln], result.lines()


def test_a_whole_declared_series_and_a_copy_of_an_instance_say_nothing(tmp_path: Path) -> None:
    files = _declared(tmp_path)
    shutil.copyfile(files[3], files[3].parent / "CT0004 (1).dcm")  # the same instance twice: counted once
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INCOMPLETE" not in r.stdout and "incomplete" not in _report(out), r.stdout


@pytest.mark.parametrize(("declare", "acquisition"), [
    (lambda k: 10, lambda k: 1 + k // 4),  # two acquisitions (step-and-shoot), each saying 10
    (lambda k: 10 if k % 2 else 9, lambda k: 1),  # images that disagree on the count
], ids=["two-acquisitions", "counts-disagree"])
def test_a_count_the_images_do_not_agree_on_for_one_acquisition_declares_nothing(
        tmp_path: Path, declare: Callable[[int], int], acquisition: Callable[[int], int]) -> None:
    """ImagesInAcquisition counts one acquisition: a series of two, or whose images disagree, declares no size (as
    the node's index), so 8 files are not said to be '8 of the 10'."""
    files = _declared(tmp_path, declare=declare, acquisition=acquisition)
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INCOMPLETE" not in r.stdout, r.stdout
