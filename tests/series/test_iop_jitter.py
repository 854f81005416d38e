"""ImageOrientationPatient jitter between slices of one series (iop19, case 05, moloney/dcmstack #42): "one
orientation" is a geometric test (``node.series.planes.orientation_gap``: the largest displacement the difference
causes at a corner of the image's own field of view, <= 0.5 px in-plane, <= 0.25 slice step through-plane, angle
<= 0.1 deg), no longer 1e-4 on each cosine. Before, on the shared 5 mm phantom (512x512, 0.45 mm pixels, 28
slices 5 mm apart), a jitter of 2e-4 (0.0115 deg, 0.15 px at the far corner) on one slice set it aside as a
"stray plane" (27 slices derived) and on every other slice refused the series; now one volume of 28, ``srnode
check`` OK (it compares the derived orientation with every input image's by the same measure) and dciodvfy clean.
A stray plane of 0.5 / 3 deg is still set aside; two halves 1 deg apart are still refused; a 64x64 MR of 4 mm pixels
(the same angle moves more millimetres, fewer pixels) keeps the hard 0.1 deg cap."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.app.check_cmd import check_folders
from node.app.phantom import write_phantom_series
from node.errors import VolumeError
from node.series import load_volumes
from node.series.planes import orientation_gap
from tests.support.fixtures import shared_case, shared_series
from tests.support.peers import dciodvfy
from tests.support.series import mr_variant, variant

PHANTOM_5MM = "ct_head_phantom_philips_5mm"


def _rot(axis: str, angle: float) -> np.ndarray:
    """Rotation (3, 3) by ``angle`` rad about the patient x (a tilt out of the axial plane) or z (in-plane) axis."""
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


Which = Callable[[int, int], "np.ndarray | None"]


def _one(r: np.ndarray) -> Which:
    return lambda k, n: r if k == n // 2 else None


def _alternate(r: np.ndarray) -> Which:
    return lambda k, n: r if k % 2 else None


def _half(r: np.ndarray) -> Which:
    return lambda k, n: r if k >= n // 2 else None


def _jittered(files: list[Path], out: Path, which: Which, mr: bool = False) -> list[Path]:
    """Copies of ``files`` (sorted along z first) in ``out``, slice k's IOP (only: positions kept) rotated by
    ``which(k, n)`` when not None, written with 8 decimals."""
    order = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    n = len(order)

    def change(ds: Dataset, k: int) -> None:
        r = which(k, n)
        if r is not None:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*(r @ iop[:3]), *(r @ iop[3:]))]

    return (mr_variant if mr else variant)(order, out, "jit", change)


def _process(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--engine", "cubic",
                           "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)


def _derived_within(files: list[Path], out: Path) -> float:
    """The worst corner displacement (px, in-plane) between the derived orientation and each input slice's;
    asserts the through-plane one stays below 0.05 of the input step."""
    derived = sorted(out.rglob("derived/*.dcm"))
    assert derived
    iop = np.array([float(v) for v in pydicom.dcmread(derived[0], stop_before_pixels=True).ImageOrientationPatient])
    worst = 0.0
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        gap = orientation_gap(np.array([float(v) for v in ds.ImageOrientationPatient]), iop, int(ds.Rows),
                              int(ds.Columns), (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                              float(ds.SliceThickness))
        assert gap.through_mm <= 0.05 * float(ds.SliceThickness), gap
        worst = max(worst, gap.in_plane_px)
    return worst


@pytest.mark.parametrize("jitter", [2e-4, 5e-4])
@pytest.mark.parametrize("where", ["one", "alternate"])
@pytest.mark.parametrize("axis", ["x", "z"])
def test_jitter_on_the_5mm_phantom_is_one_volume(tmp_path: Path, jitter: float, where: str, axis: str) -> None:
    files = sorted(shared_series(PHANTOM_5MM).glob("*.dcm"))
    which = (_one if where == "one" else _alternate)(_rot(axis, jitter))
    jittered = _jittered(files, tmp_path / "in", which)
    vols = load_volumes(jittered)  # before: one slice set aside as a stray plane (27), or refused (alternate)
    assert [v.shape[0] for v in vols] == [28] and not vols[0].set_aside and not vols[0].irregular
    if axis == "x":
        return  # the tilt moves pixels through-plane only; the in-plane rotation is the harder case for check
    out = tmp_path / "out"
    r = _process(tmp_path / "in", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NOT IN ANY DERIVED SERIES" not in r.stdout, r.stdout
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 55
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    result = check_folders(tmp_path / "in", out)
    assert result.ok, result.lines()
    # the derived orientation is the slices' mean: within 0.36 px of the jittered slice (5e-4 on one slice, the
    # mean 27/28 of the way to it), 0.18 px of each when alternating; the first slice's would be 0.36 px off
    assert _derived_within(jittered, out) < 0.4


def test_shared_case_05_iop_jitter_is_derived_and_checked(tmp_path: Path) -> None:
    files = shared_case("05-iop-jitter", tmp_path / "in")
    out = tmp_path / "out"
    r = _process(tmp_path / "in", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(sorted(out.rglob("derived/*.dcm"))) == 55
    result = check_folders(tmp_path / "in", out)
    assert result.ok, result.lines()
    assert _derived_within(files, out) < 0.01


@pytest.mark.parametrize("degrees", [0.5, 3.0])
def test_a_stray_plane_is_still_set_aside(tmp_path: Path, degrees: float) -> None:
    files = sorted(shared_series(PHANTOM_5MM).glob("*.dcm"))
    vols = load_volumes(_jittered(files, tmp_path / "in", _one(_rot("x", math.radians(degrees)))))
    assert [v.shape[0] for v in vols] == [27]
    [(_, _, why)] = vols[0].set_aside
    assert why.startswith(f"a stray plane: its orientation {degrees:.3g} deg from the others'"), why


def test_two_halves_one_degree_apart_are_still_refused(tmp_path: Path) -> None:
    files = sorted(shared_series(PHANTOM_5MM).glob("*.dcm"))
    with pytest.raises(VolumeError) as err:
        load_volumes(_jittered(files, tmp_path / "in", _half(_rot("x", math.radians(1.0)))))
    msg = str(err.value)
    assert "differ in matrix, orientation or pixel spacing" in msg
    assert "0.0175 in a direction cosine (1 deg): moves pixels by up to" in msg, msg
    assert "(0.805 of the 5 mm slice step) through-plane" in msg, msg
    assert "over: the through-plane one, the angle cap)" in msg, msg  # a tilt: 0.08 px in-plane


def test_in_plane_jitter_of_more_than_half_a_pixel_is_refused_naming_it(tmp_path: Path) -> None:
    # 1e-3 rad (0.057 deg, under the cap) moves the far corner of a 231 mm field of 0.45 mm pixels by 0.72 px
    files = sorted(shared_series(PHANTOM_5MM).glob("*.dcm"))
    with pytest.raises(VolumeError) as err:
        load_volumes(_jittered(files, tmp_path / "in", _alternate(_rot("z", 1e-3))))
    assert "moves pixels by up to 0.723 px in-plane" in str(err.value), str(err.value)
    assert "; over: the in-plane one)" in str(err.value), str(err.value)  # which tolerance failed is named


def _mr64(tmp_path: Path) -> list[Path]:
    """A 64x64 MR of 4 mm pixels (256 mm field), 10 slices 4 mm apart."""
    return write_phantom_series(tmp_path / "ct", slices=10, size=64, step_mm=4.0, fov_mm=256.0)


def test_small_matrix_mr_jitter_is_one_volume_in_pixels_not_cosines(tmp_path: Path) -> None:
    # 1e-3 rad moves the far corner of 362 mm 0.36 mm = 0.09 px of 4 mm (before: refused, 1e-3 > 1e-4 a cosine);
    # the same angle on the 512x512 CT is 0.72 px and refused (test above)
    jittered = _jittered(_mr64(tmp_path), tmp_path / "in", _alternate(_rot("z", 1e-3)), mr=True)
    vols = load_volumes(jittered)
    assert [v.shape[0] for v in vols] == [10] and not vols[0].set_aside
    out = tmp_path / "out"
    r = _process(tmp_path / "in", out)
    assert r.returncode == 0, r.stdout + r.stderr
    # dciodvfy left out: the phantom made MR lacks the MR Image module's own attributes (RepetitionTime, ...)
    result = check_folders(tmp_path / "in", out, run_dciodvfy=False)
    assert result.ok, result.lines()


def test_small_matrix_mr_keeps_the_angle_cap(tmp_path: Path) -> None:
    # 0.2 deg moves the far corner of the 64x64 MR by 1.26 mm = 0.32 px, under half a pixel: the 0.1 deg cap
    # still tells it apart (a stray plane, set aside)
    vols = load_volumes(_jittered(_mr64(tmp_path), tmp_path / "in", _one(_rot("z", math.radians(0.2))), mr=True))
    assert [v.shape[0] for v in vols] == [9]
    [(_, _, why)] = vols[0].set_aside
    assert why.startswith("a stray plane: its orientation 0.2 deg from the others'"), why


def test_check_refuses_a_derived_orientation_off_by_more_than_half_a_pixel(tmp_path: Path) -> None:
    files = sorted(shared_series(PHANTOM_5MM).glob("*.dcm"))
    _jittered(files, tmp_path / "in", _one(_rot("z", 2e-4)))
    out = tmp_path / "out"
    assert _process(tmp_path / "in", out).returncode == 0
    r = _rot("z", 1e-3)
    for f in sorted(out.rglob("derived/*.dcm")):
        ds = pydicom.dcmread(f)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*(r @ iop[:3]), *(r @ iop[3:]))]
        ds.save_as(f)
    result = check_folders(tmp_path / "in", out, run_dciodvfy=False)
    assert not result.ok
    assert any("orientation differs from an input image's by" in line for line in result.lines()), result.lines()
