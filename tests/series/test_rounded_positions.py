"""fix13: ImagePositionPatient written with one or two decimals (some scanners and anonymisers) on an oblique thin
stack. Rounding each component to r moves a position by up to r/2 x (|nx| + |ny| + |nz|) along the normal (0.084 mm
here for r = 0.1): a regular 1 mm stack read as irregular and was cut into a dozen runs of 2-3 slices. It must load
as one regular stack whose positions (and so the derived series') come from the fitted stack, while a missing
slice, a real change of step and a slice moved sideways are still found."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.derived import output_positions
from node.errors import VolumeError
from node.series import load_series, regular_runs, split_runs
from tests.support.fixtures import ROOT


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (np.cos(np.radians(ax)), np.sin(np.radians(ax)), np.cos(np.radians(ay)),
                              np.sin(np.radians(ay)), np.cos(np.radians(az)), np.sin(np.radians(az)))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx  # type: ignore[no-any-return]


OBLIQUE = _rotation(35, 40, 20)  # slice normal (0.69, -0.36, 0.63): |nx| + |ny| + |nz| = 1.68


def _stack(out: Path, decimals: int, n: int = 40, step: float = 1.0, drop: tuple[int, ...] = (),
           steps: list[float] | None = None, sideways: dict[int, float] | None = None,
           rotation: np.ndarray = OBLIQUE) -> list[Path]:
    """An oblique stack of ``n`` slices ``step`` mm apart (or at the cumulative ``steps``), positions written with
    ``decimals`` decimals, slices ``drop`` left out, slice k moved ``sideways[k]`` mm along its rows."""
    files = write_phantom_series(out.parent / f"{out.name}-axial", slices=n, size=32, step_mm=step, fov_mm=64.0)
    z = np.concatenate([[0.0], np.cumsum(steps)]) if steps is not None else np.arange(n) * step
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, f in enumerate(files):
        if k in drop:
            continue
        ds = pydicom.dcmread(f)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        ipp = np.array([ipp[0], ipp[1], z[k]]) + np.array([13.37, -21.3, 57.123])
        ipp = ipp + (sideways or {}).get(k, 0.0) * iop[:3]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([rotation @ iop[:3], rotation @ iop[3:]])]
        ds.ImagePositionPatient = [f"{v:.{decimals}f}" for v in rotation @ ipp]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f.name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _written(vol_datasets: object) -> np.ndarray:
    return np.array([[float(v) for v in d.ImagePositionPatient] for d in vol_datasets])  # type: ignore[attr-defined]


@pytest.mark.parametrize("decimals", [1, 2])
def test_an_oblique_1mm_stack_with_rounded_positions_is_one_regular_stack(tmp_path: Path, decimals: int) -> None:
    vol = load_series(_stack(tmp_path / "s", decimals))
    assert not vol.irregular, vol.notes
    assert vol.spacing[0] == pytest.approx(1.0, abs=2e-3)
    assert np.ptp(vol.steps) < 1e-9  # the fitted stack: every step equal
    r = 10.0 ** -decimals
    moved = np.linalg.norm(vol.positions - _written(vol.datasets), axis=1)
    assert moved.max() <= r * np.sqrt(3) / 2 + 1e-9  # each fitted position within the rounding of the written one
    assert [run.shape[0] for run in regular_runs(vol)] == [40]
    out = output_positions(vol, Factors(2, 1))
    assert np.ptp(np.diff(out @ vol.normal)) < 1e-9  # the derived series is exactly regular


def test_a_missing_slice_in_a_rounded_oblique_stack_is_still_found(tmp_path: Path) -> None:
    """Slice 21 of 40 left out: the stack is irregular, cut into the two regular runs either side of the gap (20 and
    19 slices, each fitted), no slice left out; before, a dozen runs of 2-3 slices."""
    vol = load_series(_stack(tmp_path / "s", 1, drop=(20,)))
    assert vol.irregular
    assert re.search(r"1\.00 mm x19, (1\.[89]\d|2\.[01]\d) mm, 1\.00 mm x18", " ".join(vol.notes)), vol.notes
    split = split_runs(vol)
    assert [run.shape[0] for run in split.runs] == [20, 19] and not split.left_out
    for run in split.runs:
        assert run.spacing[0] == pytest.approx(1.0, abs=5e-3) and np.ptp(run.steps) < 1e-9


def test_a_real_change_of_step_in_a_rounded_oblique_stack_is_still_found(tmp_path: Path) -> None:
    """20 slices 1.0 mm apart, then 20 at 1.2 mm (a change of 0.2 mm per step, 2.4 times the rounding's 0.084 mm)."""
    vol = load_series(_stack(tmp_path / "s", 1, steps=[1.0] * 19 + [1.2] * 20))
    assert vol.irregular
    runs = regular_runs(vol)
    assert len(runs) == 2 and sum(r.shape[0] for r in runs) == 40, [r.shape for r in runs]
    assert sorted(round(r.spacing[0], 1) for r in runs) == [1.0, 1.2]


def test_a_slice_moved_sideways_in_a_rounded_oblique_stack_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError) as e:
        load_series(_stack(tmp_path / "s", 1, sideways={12: 2.0}))
    assert "CT0013.dcm" in str(e.value) and "off the line" in str(e.value), str(e.value)


def test_an_axial_0625mm_stack_with_z_written_to_01mm_is_regular(tmp_path: Path) -> None:
    """Axial CT at 0.625 mm with z written to 0.1 mm reads steps 0.6 / 0.7 mm (beyond 1 % / 0.02 mm)."""
    vol = load_series(_stack(tmp_path / "s", 1, n=24, step=0.625, rotation=np.eye(3)))
    assert not vol.irregular and vol.spacing[0] == pytest.approx(0.625, abs=2e-3), vol.notes


def test_rounding_too_coarse_for_the_step_is_not_taken_for_regularity(tmp_path: Path) -> None:
    """A 0.3 mm oblique stack written to 0.1 mm: the rounding (up to 0.084 mm + 0.01 mm) is above a fifth of the
    step, where a missing slice could hide in it: judged on its measured steps as before (irregular here)."""
    vol = load_series(_stack(tmp_path / "s", 1, n=30, step=0.3))
    assert vol.irregular


def test_process_and_check_a_rounded_oblique_stack_end_to_end(tmp_path: Path) -> None:
    """`srnode process` gives one derived series of 79 slices (x2), which the independent `srnode check` accepts:
    its positions lie within the rounding of the written input positions (0.01 mm + r x sqrt(3))."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    _stack(in_dir, 1)
    config = tmp_path / "all.toml"
    config.write_text('[[rules]]\nname = "everything"\nmatch = {}\nthrough_plane_factor = 2\n')
    out = tmp_path / "out"

    def srnode(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    r = srnode("process", in_dir, out, "--engine", "cubic", "--config", config, "--no-preview", "--quiet")
    assert r.returncode == 0 and "79 derived" in r.stdout, r.stdout + r.stderr
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 79
    r = srnode("check", in_dir, out, "--no-dciodvfy")
    assert r.returncode == 0 and "OK derived series" in r.stdout, r.stdout + r.stderr


def test_a_drift_beyond_the_rounding_keeps_the_measured_positions(tmp_path: Path) -> None:
    """Positions written to 0.01 mm whose steps drift (5.00 mm x10, then 5.04 mm x10: regular within 1 %, but 0.1 mm
    off one grid, far beyond the rounding) are judged and kept as measured: no fit moves an acquired slice."""
    vol = load_series(_stack(tmp_path / "s", 2, n=21, step=5.0, steps=[5.0] * 10 + [5.04] * 10))
    assert not vol.irregular
    np.testing.assert_allclose(vol.positions, _written(vol.datasets), atol=1e-9)


def test_a_slice_moved_sideways_in_a_drifting_stack_written_rounded_is_still_refused(tmp_path: Path) -> None:
    """Axial, z written to 0.01 mm, 20 steps of 1.000 mm then 19 of 1.008 mm: every step within 1 % / 0.02 mm of
    the median (a regular stack as measured), but no grid holds the positions within the rounding's 0.015 mm (the
    drift reaches 0.15 mm), so the positions are kept as measured. The in-plane line check was skipped for such a
    stack (only fitted stacks were checked, with the rounding's allowance): slice 31 moved 2 mm (a pixel) sideways
    was stacked and interpolated through."""
    vol = load_series(_stack(tmp_path / "ok", 2, steps=[1.0] * 20 + [1.008] * 19, rotation=np.eye(3)))
    assert not vol.irregular, vol.notes  # the control: regular as measured, not fitted
    with pytest.raises(VolumeError) as e:
        load_series(_stack(tmp_path / "s", 2, steps=[1.0] * 20 + [1.008] * 19, sideways={30: 2.0},
                           rotation=np.eye(3)))
    assert "CT0031.dcm" in str(e.value) and "off the line" in str(e.value), str(e.value)


def test_the_grid_of_an_irregular_rounded_stack_is_found_once_not_per_slice_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each slice left out of every run named the stack's steps by fitting its grid again (``grid_segments``, a
    search over every slice): quadratic in the slices (300 slices of irregular steps: 24 searches, 2.2 s of 2.2 s
    in ``split_runs``; the work grows with the square of the count). The segments are found once per split."""
    import node.series.runs as runs

    rng = np.random.default_rng(2)
    vol = load_series(_stack(tmp_path / "s", 1, n=120, steps=list(rng.uniform(0.8, 3.0, 119)), rotation=np.eye(3)))
    calls = []
    real = runs.grid_segments
    monkeypatch.setattr(runs, "grid_segments", lambda *a, **k: calls.append(1) or real(*a, **k))
    split = split_runs(vol)
    assert split.left_out, "the control: some slices are in no run"
    assert len(calls) == 1, len(calls)


@pytest.mark.parametrize("rotation", [OBLIQUE, np.eye(3)], ids=["oblique-fitted", "axial-exact"])
def test_check_catches_a_derived_position_wrong_within_the_rounding_allowance(tmp_path: Path,
                                                                               rotation: np.ndarray) -> None:
    """series14: `srnode check` allowed 0.01 mm + r x sqrt(3) (0.183 mm at r = 0.1) on every derived position of an
    input whose positions are 0.1 mm multiples, whether or not the pipeline fitted them: a derived slice moved
    0.12 mm along the normal passed. It now accepts a position off the written line only when it lies on the line
    fitted through the input positions (within 0.01 mm) and that fit stays within the rounding of each written one,
    as the pipeline does; the derived slice moved 0.12 mm is caught, on an oblique stack the pipeline fitted and on
    an axial one whose 0.1 mm positions are exact (no fit)."""
    from node.app.check_cmd import check_folders

    in_dir, out = tmp_path / "in", tmp_path / "out"
    _stack(in_dir, 1, n=12, rotation=rotation)
    config = tmp_path / "all.toml"
    config.write_text('[[rules]]\nname = "everything"\nmatch = {}\nthrough_plane_factor = 2\n')
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(in_dir), str(out), "--engine", "cubic",
                        "--config", str(config), "--no-preview", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "23 derived" in r.stdout, r.stdout + r.stderr
    result = check_folders(in_dir, out, run_dciodvfy=False)
    assert result.ok, result.lines()
    derived = sorted(out.rglob("derived/*.dcm"))
    ds = pydicom.dcmread(derived[9])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([float(v) for v in ds.ImagePositionPatient])
                               + 0.12 * normal]
    ds.save_as(derived[9], enforce_file_format=True)
    result = check_folders(in_dir, out, run_dciodvfy=False)
    assert not result.ok
    said = " ".join(result.lines())
    assert f"derived slice {derived[9].name} is " in said and "off its place on the source slice line" in said, said
    assert f"nor on the line fitted through the input positions written to 0.1 mm (0.12 mm off at {derived[9].name})" \
        in said, said
