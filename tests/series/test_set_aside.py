"""One localizer image filed in an axial series (a scanner's or a PACS export's habit) refused the whole series
("localizer image(s) mixed in"); a single stray plane without LOCALIZER in its ImageType (an oblique image, a slice
re-acquired at another matrix or pixel spacing) refused it as "slices differ in matrix, orientation or pixel
spacing". Measured on 8 slices of the shared 5 mm CT phantom plus one such image: exit 1, nothing derived. Now, as
rescanned single slices are (``test_rescanned_slices.py``), the odd image is set aside (in no derived series, named
by file with why in the report, ``srnode process`` and ``srnode status``) and the rest derived; a series of
localizers only, or strays of one kind as many as two (which of them is the series cannot be told), stay refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.app.check_cmd import check_folders
from node.errors import VolumeError
from node.series import load_volumes
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy

CT5 = "ct_head_phantom_philips_5mm"


def _cut(tmp_path: Path, n: int = 8) -> list[Path]:
    dst = tmp_path / "in"
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    along = sorted(shared_series(CT5).glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    for f in along[10:10 + n]:  # n consecutive slices, 5 mm apart
        ds = pydicom.dcmread(f)
        ds.save_as(dst / f.name)
        out.append(dst / f.name)
    return out


def _odd(files: list[Path], k: int, name: str, change: Callable[[Dataset], None]) -> Path:
    """A new instance made from ``files[k]``, changed by ``change``, saved as ``name`` beside them."""
    ds = pydicom.dcmread(files[k])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 99
    change(ds)
    p = files[0].parent / name
    ds.save_as(p, enforce_file_format=True)
    return p


def _localizer(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    ds.Rows = ds.Columns = 256
    ds.PixelSpacing = [1.0, 1.0]
    ds.PixelData = np.zeros((256, 256), np.int16).tobytes()


def _thin_localizer(ds: Dataset) -> None:
    _localizer(ds)
    ds.SliceThickness = "1.0"


def _oblique(ds: Dataset) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    ds.ImageOrientationPatient = [1, 0, 0, 0, float(c), float(s)]


def _matrix(ds: Dataset) -> None:  # re-acquired at the same position, another matrix and pixel spacing
    half = ds.pixel_array[::2, ::2].copy()
    ds.Rows = ds.Columns = 256
    ds.PixelSpacing = [0.9024, 0.9024]
    ds.PixelData = half.tobytes()


def _process(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(src), str(out), "--engine", "cubic",
                           "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("change", "why"), [
    (_localizer, "a localizer (scout) image (ImageType LOCALIZER)"),
    (_oblique, "a stray plane: its orientation 20 deg from the others'"),
    (_matrix, "a stray plane: its matrix 256x256 (the others 512x512), pixel spacing 0.9024/0.9024 mm"),
])
def test_one_odd_image_is_set_aside_and_the_rest_derived(tmp_path: Path, change: Callable[[Dataset], None],
                                                          why: str) -> None:
    files = _cut(tmp_path)
    odd = _odd(files, 3, "ODD.dcm", change)
    vols = load_volumes([*files, odd])
    assert len(vols) == 1 and vols[0].shape[0] == 8
    assert [(w, r[:len(why)]) for w, _, r in vols[0].set_aside] == [("ODD.dcm", why)]
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0, r.stdout + r.stderr  # before: 1, "localizer image(s) mixed in" / "differ in matrix"
    assert f"NOT IN ANY DERIVED SERIES: image ODD.dcm: {why}" in r.stdout, r.stdout
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 15  # 8 slices x2 through-plane
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    refs = {str(it.ReferencedSOPInstanceUID) for f in derived for it in pydicom.dcmread(f).SourceImageSequence}
    assert str(pydicom.dcmread(odd).SOPInstanceUID) not in refs
    result = check_folders(files[0].parent, out)
    assert result.ok, result.lines()


def test_a_series_of_localizers_only_is_still_refused(tmp_path: Path) -> None:
    files = _cut(tmp_path, 3)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
    with pytest.raises(VolumeError, match="is a localizer \\(scout\\) series"):
        load_volumes(files)


def test_two_images_of_another_plane_are_still_refused(tmp_path: Path) -> None:
    """Two images sharing another matrix are a group, not a stray: which group is the series is not guessed."""
    files = _cut(tmp_path)
    odd = [_odd(files, k, f"ODD{k}.dcm", _matrix) for k in (2, 5)]
    with pytest.raises(VolumeError, match="differ in matrix, orientation or pixel spacing"):
        load_volumes([*files, *odd])


def test_strays_as_many_as_half_the_stack_are_still_refused(tmp_path: Path) -> None:
    files = _cut(tmp_path, 3)
    odd = [_odd(files, 0, "ODD1.dcm", _oblique), _odd(files, 1, "ODD2.dcm", _matrix)]
    with pytest.raises(VolumeError, match="differ in matrix, orientation or pixel spacing"):
        load_volumes([*files, *odd])


def test_the_node_derives_the_rest_and_status_names_the_localizer(tmp_path: Path) -> None:
    """The real node, the series sent by dcmtk storescu: delivered (before: failed, "localizer image(s) mixed in"),
    the localizer in ``srnode status`` (and --json) as an image in no derived series, by file."""
    from tests.support.nodeproc import NodeProc
    from tests.support.peers import storescu

    files = _cut(tmp_path)
    odd = _odd(files, 3, "ODD.dcm", _thin_localizer)
    sop = str(pydicom.dcmread(odd, stop_before_pixels=True).SOPInstanceUID)
    with NodeProc.start(tmp_path / "node") as node:
        # the scout first, as scanners acquire it: the rules matched on its header (SliceThickness 1.0, where the
        # default rule wants 2 mm or more) and left the whole series alone; now on the first image of the series
        r = storescu([odd, *files], node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stderr
        node.wait_jobs(lambda js: js and all(j["state"] in ("delivered", "failed") for j in js), timeout=120,
                       what="job delivered")
        jobs = node.status_cli()
        text = node.cli("status")
    assert [j["state"] for j in jobs] == ["delivered"], jobs
    left = jobs[0]["left_out"]
    assert [(x["index"], x["sop_instance_uid"]) for x in left] == [(0, sop)], left
    assert left[0]["reason"].startswith("a localizer (scout) image")
    assert f"NOT IN ANY DERIVED SERIES: image {left[0]['file']}: a localizer" in text.stdout, text.stdout


def test_srnode_process_matches_the_rules_on_an_image_not_on_the_scout_filed_first(tmp_path: Path) -> None:
    """The scout's file sorts first (A_LOC.dcm) and states SliceThickness 1.0: the default rule ("2 mm or more")
    left the whole series alone; now the rules read the first image that is no localizer."""
    files = _cut(tmp_path)
    _odd(files, 3, "A_LOC.dcm", _thin_localizer)
    out = tmp_path / "out"
    r = _process(files[0].parent, out)
    assert r.returncode == 0 and "rule ct-mr-thick: 15 derived" in r.stdout, r.stdout + r.stderr
    assert "NOT IN ANY DERIVED SERIES: image A_LOC.dcm: a localizer" in r.stdout
