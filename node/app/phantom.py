"""A synthetic CT head phantom written as real CT Image Storage files (for ``make demo`` and tests).

Geometry is exact (axial, ImagePositionPatient stepping along +z by the slice step, PixelSpacing from the field
of view) and values are in HU through RescaleIntercept -1024: air -1000, skull ring ~1000, brain ~35, a few small
lesions (haemorrhage ~70 HU, hypodense ~10 HU, calcification ~300 HU). Each slice is the mean of the object over
its slab (a box profile of the declared SliceThickness), so the pixel values agree with the header an engine models
the slice profile from. Deterministic for a given seed.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node import __version__

UID_PREFIX = "1.2.826.0.1.3680043.10.1087.9."  # UIDs of the phantom series (deterministic per parameters)


SLAB_SUBSAMPLES = 7  # sub-samples across each slice's thickness (midpoint rule over a box profile)


def _object_hu(z: np.ndarray, y: np.ndarray, x: np.ndarray, c: float) -> np.ndarray:
    """The analytic head (no noise) at the broadcast points (z, y, x) mm; ``c``: the z semi-axis (mm)."""
    a, b = 75.0, 92.0  # semi-axes (x, y) mm
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    vol = np.full(r.shape, -1000.0)
    vol[r <= 1.0] = 1000.0  # skull
    vol[r <= 0.92] = 35.0  # brain
    ventr = np.sqrt((x / 12) ** 2 + ((y + 8) / 30) ** 2 + (z / 25) ** 2) <= 1.0
    vol[ventr] = 8.0  # CSF
    for (lx, ly, lz, rad, hu) in ((30, 25, 0, 6, 70.0), (-35, -20, 5, 8, 10.0), (20, -45, -8, 3, 300.0),
                                  (-15, 40, 10, 4, 60.0)):
        vol[np.sqrt((x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2) <= rad] = hu
    return vol


def phantom_hu(slices: int = 40, size: int = 256, step_mm: float = 2.5, fov_mm: float = 230.0,
               seed: int = 0, *, thickness_mm: float | None = None, noise_hu: float = 4.0) -> np.ndarray:
    """(Z, Y, X) = (``slices``, ``size``, ``size``) float32 HU volume of an ellipsoidal head: skull shell,
    brain, CSF, lesions, Gaussian noise of ``noise_hu`` HU inside the head. ``step_mm``: slice step, ``fov_mm``:
    in-plane field of view (mm), centred on the origin. Each slice is the mean of the object over its slab
    (a box profile of ``thickness_mm``, the slice step when None; ``SLAB_SUBSAMPLES`` sub-samples), so that the
    values agree with the SliceThickness that ``write_phantom_series`` declares; 0 gives point samples."""
    rng = np.random.default_rng(seed)
    thick = step_mm if thickness_mm is None else thickness_mm
    px = fov_mm / size
    zc = (np.arange(slices) - (slices - 1) / 2) * step_mm
    yc = (np.arange(size) - (size - 1) / 2) * px
    xc = (np.arange(size) - (size - 1) / 2) * px
    c = max(60.0, 0.45 * slices * step_mm)  # z semi-axis mm
    y, x = yc[None, :, None], xc[None, None, :]
    n = SLAB_SUBSAMPLES if thick > 0 else 1
    vol = np.zeros((slices, size, size))
    for i in range(n):
        dz = ((i + 0.5) / n - 0.5) * thick
        vol += _object_hu((zc + dz)[:, None, None], y, x, c)
    vol /= n
    vol += rng.normal(0.0, noise_hu, vol.shape) * (vol > -900)
    return vol.astype(np.float32)


def write_phantom_series(out_dir: Path, slices: int = 40, size: int = 256, step_mm: float = 2.5,
                         fov_mm: float = 230.0, seed: int = 0) -> list[Path]:
    """Write the phantom as CT Image Storage files ``out_dir/CT{k:04d}.dcm`` (k from 1); returns the paths in
    slice order. Stored 12 bits unsigned, RescaleIntercept -1024 (HU -1024..3071); raises OSError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(slices, size, step_mm, fov_mm, seed)
    px = fov_mm / size
    ent = [str(seed), str(slices), str(size), f"{step_mm:g}", f"{fov_mm:g}"]
    study_uid = generate_uid(UID_PREFIX, ent + ["study"])
    series_uid = generate_uid(UID_PREFIX, ent + ["series"])
    for_uid = generate_uid(UID_PREFIX, ent + ["for"])
    now = _dt.datetime(2024, 1, 1, 12, 0, 0)
    x0 = -(size - 1) / 2 * px
    z0 = -(slices - 1) / 2 * step_mm
    paths: list[Path] = []
    for k in range(slices):
        sop_uid = generate_uid(UID_PREFIX, ent + ["sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        # Patient
        ds.PatientName = "PHANTOM^HEAD"
        ds.PatientID = "SRNODE-PHANTOM"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyID = "PHANTOM"
        ds.AccessionNumber = ""
        ds.StudyDescription = "srnode synthetic head phantom"
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = f"Head phantom {step_mm:g} mm"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD"
        # Frame of Reference
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "srnode"
        ds.ManufacturerModelName = "phantom"
        ds.SoftwareVersions = __version__
        # General Image
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Image Plane
        ds.PixelSpacing = [f"{px:.6g}", f"{px:.6g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{x0:.6g}", f"{x0:.6g}", f"{z0 + k * step_mm:.6g}"]
        ds.SliceThickness = f"{step_mm:g}"
        ds.SliceLocation = f"{z0 + k * step_mm:.6g}"
        # Image Pixel + CT Image
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        # VOI LUT
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        stored = np.clip(np.rint(hu[k] + 1024), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        p = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
