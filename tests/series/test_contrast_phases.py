"""A pre-contrast and a post-contrast pass filed under one SeriesInstanceUID (a PACS merge, a scanner that keeps
the series open), told apart only by ContrastBolusAgent (the 5 mm CT phantom, 8 + 8 slices, the second +50 HU):
at positions offset by half a step they were stacked into one volume of 16 slices at 2.5 mm alternating contrast
slice by slice, exit 0, ``srnode check`` OK; at the same positions, refused as "repeats that no dimension tells
apart". Now the contrast agent is a dimension that always names different volumes (as echoes and kernels):
"contrast none" and "contrast IOPAMIDOL", each derived on its own; an image stating no agent is never taken as one
with contrast."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.app.check_cmd import check_folders
from node.series import load_volumes
from tests.support.fixtures import shared_series
from tests.support.peers import dciodvfy


def _two_passes(tmp_path: Path, offset_mm: float, agent_on_pre: str = "") -> list[Path]:
    along = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    dst = tmp_path / "in"
    dst.mkdir(parents=True)
    out = []
    for f in along[10:18]:
        ds = pydicom.dcmread(f)
        if agent_on_pre:
            ds.ContrastBolusAgent = agent_on_pre
        ds.save_as(dst / f.name)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "post"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ContrastBolusAgent, ds.ContrastBolusRoute = "IOPAMIDOL", "IV"
        ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + offset_mm
        a = ds.pixel_array
        ds.PixelData = (a.astype(np.int32) + 50).clip(0, 4095).astype(a.dtype).tobytes()
        ds.save_as(dst / f"post_{f.name}")
        out += [dst / f.name, dst / f"post_{f.name}"]
    return out


@pytest.mark.parametrize("offset_mm", [2.5, 0.0])
def test_a_pre_and_a_post_contrast_pass_are_two_volumes(tmp_path: Path, offset_mm: float) -> None:
    files = _two_passes(tmp_path, offset_mm)
    vols = load_volumes(files)
    assert sorted((v.volume_label, v.shape[0]) for v in vols) == [("contrast IOPAMIDOL", 8), ("contrast none", 8)]
    for v in vols:  # before (offset 2.5 mm): one volume of 16 at 2.5 mm
        assert v.spacing[0] == pytest.approx(5.0, abs=1e-3)
        post = {n.startswith("post_") for n in v.names}
        assert len(post) == 1, v.names  # one pass each, never alternating
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out), "--engine",
                        "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    derived = sorted(out.rglob("derived-vol*/*.dcm"))
    assert len(derived) == 30
    descriptions = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription) for f in derived}
    assert any("contrast none" in d for d in descriptions) and any("contrast IOPAMIDOL" in d for d in descriptions)
    errors, _ = dciodvfy(derived[0])
    assert not errors, errors
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert result.ok and len(result.volumes) == 2, result.lines()


def test_one_agent_on_every_image_is_one_volume(tmp_path: Path) -> None:
    """Both passes state the same agent (and the offset makes one regular stack): nothing to tell apart."""
    files = _two_passes(tmp_path, 2.5, agent_on_pre="IOPAMIDOL")
    vols = load_volumes(files)
    assert len(vols) == 1 and vols[0].shape[0] == 16


@pytest.mark.parametrize(("keyword", "what"), [("ContrastBolusAgent", "images without and with contrast"),
                                               ("ConvolutionKernel", "two reconstructions")])
def test_srnode_check_fails_one_volume_made_of_two_passes(tmp_path: Path, keyword: str, what: str) -> None:
    """A derived series made before the split (one volume of both passes, alternating): ``srnode check`` said OK,
    every value at the acquired positions equal. Simulated exactly: derived from inputs stating one value, which
    is then changed on the pre-contrast (first-kernel) images."""
    files = _two_passes(tmp_path, 2.5, agent_on_pre="IOPAMIDOL")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out), "--engine",
                        "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert check_folders(files[0].parent, out, run_dciodvfy=False).ok
    for f in files:
        ds = pydicom.dcmread(f)
        if keyword == "ContrastBolusAgent" and not f.name.startswith("post_"):
            del ds.ContrastBolusAgent
        if keyword == "ConvolutionKernel":
            ds.ConvolutionKernel = "B70f" if f.name.startswith("post_") else "B30f"
        ds.save_as(f)
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert not result.ok
    assert f"its input images state 2 different {keyword} values: {what}" in result.lines()[0], result.lines()


@pytest.mark.parametrize("agents", [("Omnipaque 350", "OMNIPAQUE  350"), ("", "None")])
def test_one_agent_written_in_two_cases_or_spacings_is_one_volume(tmp_path: Path, agents: tuple[str, str]) -> None:
    """ContrastBolusAgent is text typed at the console (LO): "Omnipaque 350" on the odd slices of one acquisition
    and "OMNIPAQUE  350" on the even ones (or empty beside "None") split the 5 mm phantom's 28 slices into two
    volumes of 14 at 10 mm (review18; 5e094e6: one volume of 28 at 5 mm). Now one volume of 28 at 5 mm, and
    ``srnode check`` of its derived series OK (it compared the agents as written: it would fail it)."""
    dst = tmp_path / "in"
    dst.mkdir()
    for k, f in enumerate(sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.ContrastBolusAgent = agents[k % 2]
        ds.save_as(dst / f.name)
    vols = load_volumes(sorted(dst.iterdir()))
    assert [(v.shape[0], round(float(v.spacing[0]), 3)) for v in vols] == [(28, 5.0)]
    out = tmp_path / "out"  # and ``srnode check`` reads the agent the same way: one agent, OK
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(dst), str(out), "--engine", "cubic",
                        "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = check_folders(dst, out, run_dciodvfy=False)
    assert result.ok and len(result.volumes) == 1, result.lines()
