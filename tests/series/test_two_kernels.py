"""Two reconstructions of one CT acquisition (a soft-tissue and a bone kernel) under one SeriesInstanceUID: at the
same positions they were refused as "repeats that no dimension tells apart"; offset by half a step (1.5 of 3 mm)
they were stacked into one volume of 16 slices at 1.5 mm whose kernel (and values, here +200) alternated slice by
slice, derived, exit 0. Now ConvolutionKernel names a volume of its own, like an echo: "kernel B30f", "kernel B70f",
each its own derived series."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.app.check_cmd import check_folders
from node.app.phantom import write_phantom_series
from node.errors import VolumeError
from node.series import load_volumes
from tests.support.peers import dciodvfy


def _two_kernels(tmp_path: Path, offset: float, second: str | list[str] = "B70f",
                 absent_on: tuple[int, ...] = ()) -> list[Path]:
    """The 8-slice phantom as kernel B30f, and again as ``second`` (+200 in value) moved ``offset`` mm along z;
    ConvolutionKernel removed from the first reconstruction's slices ``absent_on``."""
    src = write_phantom_series(tmp_path / "src", slices=8, size=32, step_mm=3.0)
    folder = tmp_path / "in"
    folder.mkdir(parents=True)
    files = []
    for k, f in enumerate(src):
        a = pydicom.dcmread(f)
        a.ConvolutionKernel = "B30f"
        if k in absent_on:
            del a.ConvolutionKernel
        files.append(folder / f"A{k:02d}.dcm")
        a.save_as(files[-1])
        b = pydicom.dcmread(f)
        b.ConvolutionKernel = second
        b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ipp = [float(v) for v in b.ImagePositionPatient]
        b.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + offset]
        b.PixelData = np.clip(b.pixel_array.astype(np.int32) + 200, 0, 4095).astype(b.pixel_array.dtype).tobytes()
        files.append(folder / f"B{k:02d}.dcm")
        b.save_as(files[-1])
    return files


@pytest.mark.parametrize("offset", [0.0, 1.5])
def test_two_kernels_in_one_series_are_two_volumes(tmp_path: Path, offset: float) -> None:
    vols = load_volumes(_two_kernels(tmp_path, offset))
    assert [v.volume_label for v in vols] == ["kernel B30f", "kernel B70f"]
    assert [v.data.shape for v in vols] == [(8, 32, 32), (8, 32, 32)]
    assert vols[0].spacing[0] == pytest.approx(3.0)
    assert float(vols[1].data.mean() - vols[0].data.mean()) == pytest.approx(200.0, abs=1.0)


def test_two_kernels_are_derived_as_two_series_that_check(tmp_path: Path) -> None:
    files = _two_kernels(tmp_path, 1.5, second=["Br64d", "3"])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    series = sorted({p.parent for p in out.rglob("derived*/*.dcm")})
    assert len(series) == 2, series
    descriptions = {str(pydicom.dcmread(next(s.glob("*.dcm"))).SeriesDescription) for s in series}
    assert any("kernel B30f" in d for d in descriptions) and any("kernel Br64d/3 " in d for d in descriptions), \
        descriptions
    for s in series:
        derived = sorted(s.glob("*.dcm"))
        assert len(derived) == 15  # 8 slices x2 through-plane, not 16 x2
        errors, _ = dciodvfy(derived[0])
        assert not errors, errors
    result = check_folders(files[0].parent, out, run_dciodvfy=False)
    assert result.ok and len(result.volumes) == 2, result.lines()


def test_a_kernel_absent_on_some_slices_beside_two_kernels_is_refused_naming_them(tmp_path: Path) -> None:
    """ConvolutionKernel absent on 2 slices beside a B30f and a B70f reconstruction: which one they belong to cannot
    be told (as an echo without its number beside two echoes): refused naming the files, no guess."""
    with pytest.raises(VolumeError) as exc:
        load_volumes(_two_kernels(tmp_path, 1.5, absent_on=(2, 5)))
    assert "ConvolutionKernel is absent on 2 of its 16 images (files A02.dcm, A05.dcm)" in str(exc.value)
