"""Slices rescanned one by one beside a whole stack (break16): a CT of 10 slices whose 4th and 8th positions were
scanned again, each rescan its own AcquisitionNumber (2 and 3). Before fieldmr16 the series split into the stack
(acquisition 1, 10 slices, super-resolved) and the two rescans (one image each, named in the report). fieldmr16's
rule 'a split leaving most of its volumes one image each is no split' (meant for a counter per image and for cine
TriggerTimes that change with the heart rate) counted volumes, not images: 2 of 3 volumes single, so the split
was dropped and the whole series refused as 'repeats that no dimension tells apart' although AcquisitionNumber
tells them apart. Now the rule counts images: it drops a split only where most images would be volumes of one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.app.phantom import write_phantom_series
from node.series import load_volumes

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _rescans(files: list[Path], out: Path, which: tuple[int, ...]) -> list[Path]:
    """Copies of ``files[k]`` for k in ``which`` as new instances, AcquisitionNumber 2, 3, ... and other pixels."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, k in enumerate(which):
        ds = pydicom.dcmread(files[k])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "rescan", str(n)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AcquisitionNumber = 2 + n
        a = ds.pixel_array
        ds.PixelData = (a.astype(np.int32) + 7).clip(0, 4095).astype(a.dtype).tobytes()
        p = out / f"rescan{n}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_a_stack_with_two_slices_rescanned_one_by_one_keeps_its_volume(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=10, size=32, step_mm=3.0, fov_mm=96.0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.AcquisitionNumber = 1
        ds.save_as(f, enforce_file_format=True)
    vols = load_volumes(files + _rescans(files, tmp_path / "re", (3, 7)))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [
        ("acquisition 1", 10), ("acquisition 2", 1), ("acquisition 3", 1)]


@pytest.mark.skipif(not (DATA / "ct_head_phantom_philips_5mm").is_dir(), reason="../shared/data absent")
def test_the_real_5mm_phantom_with_two_rescanned_slices_keeps_its_28_slices(tmp_path: Path) -> None:
    files = sorted((DATA / "ct_head_phantom_philips_5mm").glob("*.dcm"))
    vols = load_volumes(files + _rescans(files, tmp_path / "re", (9, 19)))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [
        ("acquisition 1", 28), ("acquisition 2", 1), ("acquisition 3", 1)]
