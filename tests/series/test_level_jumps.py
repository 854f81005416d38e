"""A slice whose level jumps away from both neighbours (the shared GE 3D T1's InstanceNumber 66 is stored 5x
brighter than the slices around it): derived as stored, but said, naming the image. Before, nothing said it, and
the derived slices around it carried the jump (eval of a crop: engine -0.43 dB under cubic there, σ covering 0.557
of its 95 % interval; docs/engines.md, 2026-12-03 (b))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.series import load_volumes
from tests.support.fixtures import shared_series
from tests.support.series import edited_phantom


def _brighter(k_bright: int, factor: float) -> object:
    def change(k: int, ds: Dataset) -> None:
        if k == k_bright:
            arr = ds.pixel_array.astype(np.float64)
            slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            hu = arr * slope + icpt
            # the body (above -500 HU) factor x further from air, as a scaling the header does not state would
            body = hu > -500
            hu[body] = -1000 + (hu[body] + 1000) * factor
            stored = np.clip(np.round((hu - icpt) / slope), 0, 2 ** int(ds.BitsStored) - 1)
            ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    return change


def test_a_slice_five_times_brighter_than_its_neighbours_is_named(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _brighter(3, 5.0), slices=7)  # type: ignore[arg-type]
    [vol] = load_volumes(files)
    jumps = [n for n in vol.notes if "level is" in n]
    assert len(jumps) == 1, vol.notes
    assert files[3].name in jumps[0]
    # derived as stored: slice 3's values are its own stored values after its own rescale, not corrected
    ds = pydicom.dcmread(files[3])
    z = [i for i, n in enumerate(vol.names) if n == files[3].name][0]
    want = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(vol.data[z], want)


def test_a_darker_slice_is_named_too(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, _brighter(2, 0.3), slices=6)  # type: ignore[arg-type]
    [vol] = load_volumes(files)
    assert [n for n in vol.notes if "level is" in n and files[2].name in n], vol.notes


def test_a_smooth_stack_has_no_note(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, lambda k, ds: None, slices=7)
    [vol] = load_volumes(files)
    assert not [n for n in vol.notes if "level is" in n], vol.notes


def test_the_real_ge_series_bright_slice_is_named_and_the_real_phantom_has_none() -> None:
    ge = sorted(p for p in shared_series("mr_t1_3d_axial_ge").rglob("*") if p.is_file())
    [vol] = load_volumes([p for p in ge if p.suffix == ".dcm"])
    jumps = [n for n in vol.notes if "level is" in n]
    assert len(jumps) == 1 and "i270.MRDC.66.dcm" in jumps[0], jumps
    ph = sorted(p for p in shared_series("ct_head_phantom_philips_1mm").rglob("*") if p.is_file())
    [vol] = load_volumes(ph)
    assert not [n for n in vol.notes if "level is" in n], vol.notes


# field19: a jump by an offset. The ratio above is read on values shifted to the volume's floor, over a mask of the
# body: a CT slice whose values all lie 1024 HU above its neighbours' (it states RescaleIntercept 0 where the others
# state -1024, its stored values alike) brings its air into that mask and read 1.20x, not reported (+500 HU: 0.67x;
# +200 HU: 0.37x, reported as a darker slice). Measured on 8 slices of the shared 5 mm phantom: the derived slice at
# that position read +31 HU at its median where its neighbours read -990, the two derived slices between it and its
# neighbours -378, exit 0 and nothing said.

CT5 = "ct_head_phantom_philips_5mm"


def _ct5_cut(tmp_path: Path, intercepts: dict[int, str]) -> list[Path]:
    """8 consecutive slices of the shared 5 mm phantom in ``tmp_path / "in"``, slice k stating RescaleIntercept
    ``intercepts[k]`` over its stored values as they are; the files, in slice order."""
    src = sorted(shared_series(CT5).glob("*.dcm"),
                 key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    dst = tmp_path / "in"
    dst.mkdir(parents=True)
    out = []
    for k, f in enumerate(src[10:18]):
        ds = pydicom.dcmread(f)
        if k in intercepts:
            ds.RescaleIntercept = intercepts[k]
        ds.save_as(dst / f"CT{k + 1:04d}.dcm")
        out.append(dst / f"CT{k + 1:04d}.dcm")
    return out


def test_a_ct_slice_stating_a_wrong_intercept_is_named_by_srnode_process(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    files = _ct5_cut(tmp_path, {3: "0"})  # -1024 on the others: +1024 HU across the slice
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr  # derived as stored, but said
    said = [line for line in r.stderr.splitlines() if "WARNING" in line and "CT0004.dcm" in line]
    assert said and "its values lie +1023 (modality units) from its two neighbours'" in said[0], r.stderr
    [report] = out.rglob("report.json")
    notes = json.loads(report.read_text())["report"]["notes"]
    assert [n for n in notes if n.startswith("image CT0004.dcm: its values lie +1023")], notes


@pytest.mark.parametrize(("intercept", "shift"), [("-824", 200), ("-524", 500), ("-1324", -300)])
def test_an_offset_slice_is_said_as_an_offset_in_its_direction(tmp_path: Path, intercept: str, shift: int) -> None:
    import re

    files = _ct5_cut(tmp_path, {3: intercept})
    [vol] = load_volumes(files)
    jumps = [n for n in vol.notes if "level is" in n or "values lie" in n]
    # before: +200 HU "its level is 0.4x its two neighbours'" (a darker slice), +500 and -300 nothing
    m = re.match(r"image CT0004\.dcm: its values lie ([-+][0-9.]+) \(modality units\)", jumps[0]) if jumps else None
    assert len(jumps) == 1 and m and abs(float(m.group(1)) - shift) < 5, jumps


def test_smooth_changes_along_the_stack_have_no_note(tmp_path: Path) -> None:
    """A bolus arriving during the scan (+300 HU in a 60-pixel disc from the 5th slice on) and an intensity
    gradient along z (x1 to x1.6 over the stack, as an MR coil's): no note."""
    from node.series.levels import level_jumps

    files = _ct5_cut(tmp_path, {})
    [vol] = load_volumes(files)
    assert not [n for n in vol.notes if "level is" in n or "values lie" in n], vol.notes
    yy, xx = np.mgrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 256) ** 2 < 30 ** 2
    bolus = vol.data.copy()
    bolus[4:, disc] += 300
    assert level_jumps(bolus, vol.names) == []
    ramp = np.linspace(1.0, 1.6, vol.data.shape[0], dtype=np.float32)[:, None, None]
    assert level_jumps((vol.data + 1024) * ramp, vol.names) == []


def test_of_the_shared_series_only_the_ge_slice_66_has_a_note() -> None:
    from node.dicom_read import dicom_files

    noted = {}
    for name in ("ct_body_j2k_siemens_petct", "ct_head_ge_tilted_irregular", "ct_head_phantom_philips_1mm", CT5,
                 "mr_epi_mosaic_siemens_single", "mr_fieldmap_enhanced_2echo_siemens_xa30",
                 "mr_fmri_philips_3volumes", "mr_t1_3d_axial_ge", "mr_t1_enhanced_multiframe_siemens_xa30",
                 "mr_t1_mprage_sag_siemens"):
        for vol in load_volumes(dicom_files(shared_series(name))):
            said = [n for n in vol.notes if "level is" in n or "values lie" in n]
            if said:
                noted[name] = said
    assert list(noted) == ["mr_t1_3d_axial_ge"] and len(noted["mr_t1_3d_axial_ge"]) == 1, noted
    assert noted["mr_t1_3d_axial_ge"][0].startswith("image i270.MRDC.66.dcm: its level is 4.0x"), noted


@pytest.mark.parametrize(("factor", "said"), [(1.5, "1.5x"), (0.6, "0.6x")])
def test_an_mr_slice_scaled_under_the_ratio_bar_is_named_as_scaled(factor: float, said: str) -> None:
    """The shared Siemens MPRAGE, its slice 91 of 192 scaled by 1.5 (or 0.6), as a scaling its header does not state:
    the level ratio's 2x bar missed both (lead18: nothing said); its percentiles read 0.128 (-0.105) of the range
    off its neighbours', and a line through them has that gain."""
    from node.dicom_read import dicom_files
    from node.series.levels import level_jumps

    [vol] = load_volumes(dicom_files(shared_series("mr_t1_mprage_sag_siemens")))
    data = vol.data.copy()
    data[90] *= factor
    jumps = level_jumps(data, vol.names)
    assert len(jumps) == 1 and jumps[0].startswith(f"image {vol.names[90]}: its values are {said} its two "
                                                   "neighbours'"), jumps
