"""``srnode bench peers``: the NIfTI written for the peer sits where the DICOM slices are (axial and oblique
sagittal series; ``node.bench.nifti``), the peer's output is read back onto the truth grid (``node.bench.eclare``),
and the runner writes its JSON and PNG.
A stand-in peer (tests/support/fake_peer.py) keeps these fast; the real ECLARE run is marked ``peers``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from models.engine import VolumeInput
from node.app.phantom import write_phantom_series
from node.bench.eclare import run_peer
from node.bench.nifti import LPS_TO_RAS, dicom_positions, geometry_of, nifti_affine, write_nifti
from node.series import load_series
from tests.support.fixtures import ROOT

FAKE = [sys.executable, str(ROOT / "tests" / "support" / "fake_peer.py")]


def _axial(d: Path) -> list[Path]:
    return write_phantom_series(d, slices=9, size=40, step_mm=2.0, fov_mm=40.0)


def _oblique_sagittal(d: Path) -> list[Path]:
    """The phantom's slices re-placed as an oblique sagittal stack: rows along A-P, columns along F-H, both tilted
    by 15 degrees, slices stepping 2 mm along the normal (mostly -L)."""
    files = _axial(d)
    t = np.deg2rad(15.0)
    row = np.array([0.0, np.cos(t), np.sin(t)])  # mostly posterior
    col = np.array([np.sin(t) * 0.3, -np.sin(t) * np.cos(t), -np.cos(t) ** 2])
    col -= row * (col @ row)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    origin = np.array([30.0, -20.0, 55.0])
    for k, f in enumerate(files):
        ds = dcmread(f)
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *col)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + 2.0 * k * normal]
        ds.save_as(f)
    return files


@pytest.mark.parametrize("make", [_axial, _oblique_sagittal], ids=["axial", "oblique-sagittal"])
def test_nifti_affine_round_trips_to_the_dicom_geometry(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    files = make(tmp_path / "s")
    sv = load_series(files)
    by_pos = sorted((dcmread(f, stop_before_pixels=True) for f in files),
                    key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ sv.normal))
    ipp = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in by_pos])
    iop = np.array([float(v) for v in by_pos[0].ImageOrientationPatient])
    dy, dx = (float(v) for v in by_pos[0].PixelSpacing)
    g = geometry_of(sv.positions, sv.row_cosine, sv.col_cosine, (dy, dx))
    aff = nifti_affine(g)
    assert np.allclose(dicom_positions(aff, len(files)), ipp, atol=1e-4)  # IPP of every slice
    lps = LPS_TO_RAS @ aff
    assert np.allclose(lps[:3, 0] / dx, iop[:3], atol=1e-6) and np.allclose(lps[:3, 1] / dy, iop[3:], atol=1e-6)
    assert np.allclose(np.linalg.norm(lps[:3, :3], axis=0), [dx, dy, 2.0], atol=1e-4)  # spacing, slice step
    # RAS: DICOM's +x (left) is NIfTI's -x, +y (posterior) is -y
    assert np.allclose(aff[:3, 3], [-ipp[0, 0], -ipp[0, 1], ipp[0, 2]], atol=1e-4)
    # a crop (rows from 3, columns from 5) of every second slice: voxel (0, 0, k) is pixel (3, 5) of slice 2k
    sub = geometry_of(sv.positions, sv.row_cosine, sv.col_cosine, (dy, dx), (3, 5), every=2)
    want = ipp[::2] + 5 * dx * iop[:3] + 3 * dy * iop[3:]
    assert np.allclose(dicom_positions(nifti_affine(sub), len(want)), want, atol=1e-4)
    # the file: nibabel's (X, Y, Z) data is the volume's (Z, Y, X), the affine as computed
    write_nifti(tmp_path / "v.nii.gz", sv.data, g)
    img = nib.load(str(tmp_path / "v.nii.gz"))
    assert np.allclose(img.affine, aff, atol=1e-4)
    back = np.asarray(img.get_fdata()).transpose(2, 1, 0)
    assert back.shape == sv.data.shape and np.allclose(back, sv.data)


@pytest.mark.parametrize("make", [_axial, _oblique_sagittal], ids=["axial", "oblique-sagittal"])
def test_peer_output_is_read_back_onto_the_truth_grid(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    """The stand-in writes, at each of its voxels, its RAS position along the slice direction: read back onto
    the truth grid, every value must be the truth voxel's own position (2.4x finer slices, another grid)."""
    sv = load_series(make(tmp_path / "s"))
    dy, dx = (float(s) for s in sv.spacing[1:])
    truth_g = geometry_of(sv.positions, sv.row_cosine, sv.col_cosine, (dy, dx))
    lr_g = geometry_of(sv.positions, sv.row_cosine, sv.col_cosine, (dy, dx), every=2)
    lr = VolumeInput(sv.data[::2], (4.0, dy, dx), 4.0, "CT")
    run = run_peer(FAKE, lr, lr_g, truth_g, sv.data.shape, tmp_path / "w", 64, 8)
    assert run.output_shape[:2] == (sv.data.shape[2], sv.data.shape[1])
    assert run.output_shape[2] == round(5 * 4.0 / dx)  # the peer's own isotropic grid
    aff = nifti_affine(truth_g)
    z, y, x = sv.data.shape
    k, j, i = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    ras = np.einsum("ab,bzyx->azyx", aff[:3, :3], np.stack([i, j, k])) + aff[:3, 3][:, None, None, None]
    u = aff[:3, 2] / np.linalg.norm(aff[:3, 2])
    want = np.einsum("azyx,a->zyx", ras, u) + 0.01 * i + 0.02 * j
    # exact for a linear ramp but for the B-spline's mirrored ends (errors decaying as 0.27^n samples from an end)
    assert np.allclose(run.data[1:-1], want[1:-1], atol=1e-2), np.abs(run.data - want)[1:-1].max()
    assert np.allclose(run.data[2:-2], want[2:-2], atol=1e-3), np.abs(run.data - want)[2:-2].max()
    assert run.index_map[0] == pytest.approx(2.0 / (4.0 / round(4.0 / dx, 3)), rel=1e-3)


def test_bench_peers_writes_json_and_png_side_by_side(tmp_path: Path) -> None:
    src = tmp_path / "axial"
    write_phantom_series(src, slices=9, size=48, step_mm=2.0, fov_mm=96.0)
    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", "bench", "peers", str(src),
                        "--engine", "cubic", "--peer", " ".join(FAKE), "--out", str(out), "--note", "test"],
                       cwd=ROOT, capture_output=True, text=True, timeout=560,  # a loaded 2-core machine
                       env={**os.environ, "FAKE_PEER": "cubic", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 5000
    s = doc["series"][0]
    assert s["truth_shape"] == [9, 48, 48] and s["input_shape"] == [5, 48, 48]
    assert set(s["methods"]) == {"cubic", "srnode", "eclare"}
    for m in s["methods"].values():
        assert {"psnr_db", "ssim", "hu_mae", "hu_bias", "gain_db", "seconds"} <= set(m)
    # the stand-in is cubic on its own grid: close to cubic, below it by what regridding costs
    assert abs(s["methods"]["eclare"]["gain_db"]) < 3.0, s["methods"]
    assert s["eclare"]["reduced_budget"] and "reduced patch budget" in doc["budget_note"]
    assert "bench peers" in doc["command"] and doc["machine"]["note"] == "test"


@pytest.mark.peers
@pytest.mark.timeout(3600)  # ECLARE's network (WDSR, 256 channels) is slow on a CPU: ~15 min on a loaded 2-core one
def test_eclare_runs_on_a_small_crop(tmp_path: Path) -> None:
    """The real peer (make peers-venv, or $SRNODE_ECLARE_CMD naming another) on a tiny CT crop with a tiny patch
    budget: it runs, its output lands on the truth grid and scores sanely."""
    if not ((ROOT / ".venv-eclare" / "bin" / "run-eclare").is_file() or os.environ.get("SRNODE_ECLARE_CMD")):
        pytest.skip("no .venv-eclare (make peers-venv) and no $SRNODE_ECLARE_CMD")
    src = tmp_path / "axial"
    write_phantom_series(src, slices=9, size=32, step_mm=2.0, fov_mm=64.0)
    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", "bench", "peers", str(src),
                        "--engine", "cubic", "--n-patches", "32", "--batch-size", "16", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=3500)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(out.read_text())["series"][0]
    # two training steps leave ECLARE's net near its random start (its output clipped to the input's range), so
    # the score only has to be a number: 7.7 dB in one run through $SRNODE_ECLARE_CMD (the old > 10 was luck)
    assert 0 < s["methods"]["eclare"]["psnr_db"] < 100 and s["eclare"]["output_shape_xyz"][:2] == [32, 32]
    assert s["eclare"]["progress"]["patches"] >= 32


def _npz_export(tmp_path: Path, iop: bool) -> Path:
    """The phantom as an ``srnode eval`` .npz export (prior3's keys; ``row_cosine``/``col_cosine`` when ``iop``)."""
    sv = load_series(write_phantom_series(tmp_path / "dcm", slices=9, size=48, step_mm=2.0, fov_mm=96.0))
    extra = {"row_cosine": sv.row_cosine, "col_cosine": sv.col_cosine} if iop else {}
    path = tmp_path / ("with_iop.npz" if iop else "no_iop.npz")
    np.savez_compressed(path, data=np.round(sv.data).astype(np.int16), spacing=np.array(sv.spacing),
                        thickness=sv.slice_thickness, modality=sv.modality, value_range=np.array(sv.value_range),
                        positions=np.asarray(sv.positions), normal=np.asarray(sv.normal), **extra)
    return path


def test_bench_peers_runs_eclare_through_another_python_on_npz_exports(tmp_path: Path) -> None:
    """``--peer-python PY`` runs ``eclare.main:main`` with that interpreter (here a stub package wrapping the
    stand-in, as the GPU machine runs ECLARE --no-deps on its own torch); .npz inputs with and without IOP;
    the stand-in's training bar is read back as a rate, and the deadline is recorded."""
    stub = tmp_path / "stub" / "eclare"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    support = str(ROOT / "tests" / "support")
    (stub / "main.py").write_text(f"import sys\nsys.path.insert(0, {support!r})\nfrom fake_peer import main as _m\n\n\n"
                                  "def main():\n    return _m(sys.argv[1:])\n")
    a, b = _npz_export(tmp_path, iop=True), _npz_export(tmp_path, iop=False)
    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", "bench", "peers", str(a),
                        str(b), "--engine", "cubic", "--peer-python", sys.executable, "--n-patches", "64",
                        "--batch-size", "16", "--deadline-s", "500", "--budget-reason", "a test", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=560,
                       env={**os.environ, "FAKE_PEER": "cubic", "PYTHONPATH": f"{tmp_path / 'stub'}:{ROOT}"})
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["peer_command"].startswith(sys.executable) and "eclare.main" in doc["peer_command"]
    assert doc["peer_versions"]["torch"] and doc["peer_versions"]["python"]
    assert "why: a test" in doc["budget_note"] and "deadline of 500 s" in doc["budget_note"]
    with_iop, no_iop = doc["series"]
    assert with_iop["orientation"] == "npz" and no_iop["orientation"].startswith("made up")
    for s in (with_iop, no_iop):
        assert s["truth_shape"] == [9, 48, 48] and set(s["methods"]) == {"cubic", "srnode", "eclare"}
        assert abs(s["methods"]["eclare"]["gain_db"]) < 3.0, s["methods"]
        assert s["eclare"]["progress"] == {"patches": 64.0, "train_s": 2.0, "patches_per_s": 32.0, "loss": 0.0123}
        assert 0 < s["eclare"]["timeout_s"] <= 500 and s["eclare"]["seconds"] == s["methods"]["eclare"]["seconds"]
    # the made-up in-plane orientation changes nothing that is scored
    assert no_iop["methods"]["eclare"]["psnr_db"] == pytest.approx(with_iop["methods"]["eclare"]["psnr_db"], abs=1e-3)


def test_bench_peers_records_a_peer_that_runs_past_its_cap(tmp_path: Path) -> None:
    """``$SRNODE_ECLARE_CMD`` names the peer; one that never ends is killed at ``--peer-timeout`` (its process
    group), recorded in the JSON, and the run still writes srnode's and cubic's figures and the PNG (exit 1)."""
    out = tmp_path / "peers.json"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", "bench", "peers",
                        str(_npz_export(tmp_path, iop=True)), "--engine", "cubic", "--peer-timeout", "3",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=560,
                       env={**os.environ, "FAKE_PEER": "hang", "PYTHONPATH": str(ROOT),
                            "SRNODE_ECLARE_CMD": " ".join(FAKE)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "eclare FAILED" in r.stdout
    s = json.loads(out.read_text())["series"][0]
    assert set(s["methods"]) == {"cubic", "srnode"} and s["eclare"]["timed_out"] is True
    assert "cap of 3 s" in s["eclare"]["error"] and out.with_suffix(".png").stat().st_size > 5000


def test_a_peer_that_finds_no_gpu_is_stopped_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --device cuda, ECLARE falling back to the CPU (its torch sees no GPU) is stopped, not waited for."""
    from node.bench.eclare import _run_capped
    from node.errors import EngineError

    monkeypatch.setenv("FAKE_PEER", "hang")
    argv = [*FAKE, "--in-fpath", "x.nii.gz", "--out-dir", str(tmp_path), "--gpu-id", "0"]
    with pytest.raises(EngineError, match="found no GPU"):
        _run_capped(argv, tmp_path, tmp_path / "peer.log", 300.0, need_gpu=True)


def test_budget_fitting_progress_parsing_and_made_up_orientation() -> None:
    from node.app.volume_file import inplane_cosines
    from node.bench.eclare import fit_budget, training_progress

    bar = ("\r 50%|#####     | 500000/1000000 [00:50<00:50, 9950.1it/s, loss=0.0100]"
           "\r100%|##########| 1000000/1000000 [01:40<00:00, 9990.0it/s, loss=0.0050]\n"
           "100%|##########| 256/256 [00:01<00:00, 200.0it/s]\n")
    assert training_progress(bar, 1_000_000) == {"patches": 1e6, "train_s": 100.0, "patches_per_s": 10000.0,
                                                 "loss": 0.005}
    assert training_progress("no bar here", 128) == {}
    prev = {"seconds": 130.0, "progress": {"patches_per_s": 10000.0, "train_s": 100.0}}
    assert fit_budget(300_000, 128, 200.0, prev) == (300_000, "")  # 170 s of training fit
    n, why = fit_budget(300_000, 128, 60.0, prev)  # (60 - 30) s x 8500/s
    assert n == 255_000 // 128 * 128 and "cut from 300000" in why
    assert fit_budget(300_000, 128, 20.0, prev)[0] == 0
    assert fit_budget(300_000, 128, 1.0, None) == (300_000, "")  # no rate yet: the cap decides
    for normal in ([0, 0, 1.0], [1.0, 0, 0], [0.3, -0.5, 0.81]):
        n_ = np.asarray(normal) / np.linalg.norm(normal)
        row, col = inplane_cosines(n_)
        assert np.allclose(np.cross(row, col), n_) and abs(row @ col) < 1e-12
