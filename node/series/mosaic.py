"""Siemens mosaics: one stored image holding a grid of slices (an EPI volume as a light-box print).

A mosaic is a volume, never a picture: each tile becomes an image of its own, placed in patient space from the
Siemens CSA image header, read with ``nibabel.nicom`` (the number of images in the mosaic, the slice normal whose
sign gives the order of the tiles, and the position of the first tile corrected for the mosaic's IPP offset).
The number of images is checked against the public tag (0019,100A) NumberOfImagesInMosaic when it is there. When
any of it is missing or contradicts itself the mosaic is refused with the reason.

Tile k (0-based, row-major in the grid) lies at ``first + k * step * normal``; ``step`` (mm) is the one between
the slice positions of the scanner's protocol (the CSA series header's sSliceArray), which SpacingBetweenSlices
must agree with (either alone is taken; neither, or the two disagreeing: refused). Each tile is returned as a
single-frame dataset: the mosaic's header (same SOPInstanceUID, so derived images reference the mosaic they came
from) with Rows/Columns of one tile, its own ImagePositionPatient and the tile's pixels, uncompressed little endian.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from node.errors import VolumeError
from node.series.slices import unit_orientation

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # nibabel.nicom warns that its readers are experimental
    from nibabel.nicom import csareader
    from nibabel.nicom.dicomwrappers import MosaicWrapper, WrapperError

SIEMENS_MR_HEADER = "SIEMENS MR HEADER"


def images_in_mosaic_tag(ds: Dataset) -> int | None:
    """(0019,100A) NumberOfImagesInMosaic of the Siemens MR header private block, or None when absent."""
    try:
        block = ds.private_block(0x0019, SIEMENS_MR_HEADER)
        value = block[0x0A].value
    except (KeyError, ValueError):
        return None
    try:
        return int(value if not isinstance(value, (list, tuple)) else value[0])
    except (TypeError, ValueError):
        return None


def is_mosaic(ds: Dataset) -> bool:
    """True for a Siemens mosaic: ImageType says MOSAIC, or (0019,100A) counts more than one image."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    n = images_in_mosaic_tag(ds)
    return "MOSAIC" in image_type or (n is not None and n > 1)


def _refuse(name: str, why: str) -> VolumeError:
    return VolumeError(f"{name}: Siemens mosaic (one image holding a grid of slices) that cannot be split into its "
                       f"slices: {why}; a mosaic is not super-resolved as one picture")


def _wrapper(ds: Dataset, name: str) -> MosaicWrapper:
    try:
        csa = csareader.get_csa_header(ds, "image")
    except csareader.CSAReadError as exc:
        raise _refuse(name, f"its Siemens CSA image header cannot be read ({exc})") from exc
    if not csa:
        raise _refuse(name, "it has no Siemens CSA image header (0029,xx10)")
    try:
        return MosaicWrapper(ds, csa)
    except WrapperError as exc:
        raise _refuse(name, f"the CSA header gives no number of images ({exc})") from exc


def _slice_normal(w: MosaicWrapper, name: str) -> np.ndarray:
    """The unit slice normal with the CSA header's sign (the direction in which the tiles are stored)."""
    csa_normal = csareader.get_slice_normal(w.csa_header)
    if csa_normal is None:
        raise _refuse(name, "the CSA header has no SliceNormalVector, so the order of the tiles is unknown")
    try:
        normal = np.asarray(w.slice_normal, dtype=np.float64)
    except AssertionError as exc:  # nibabel asserts that the CSA normal is parallel to the IOP's
        raise _refuse(name, f"the CSA SliceNormalVector {list(csa_normal)} is not perpendicular to "
                            "ImageOrientationPatient") from exc
    if normal.shape != (3,) or not np.isfinite(normal).all() or abs(float(np.linalg.norm(normal)) - 1) > 1e-3:
        raise _refuse(name, f"slice normal {normal.tolist()} is not a unit vector")
    return normal


STEP_TOL_MM = 0.01  # how far the last tile may lie from where the protocol's slice positions put it


def protocol_positions(ds: Dataset, n: int) -> np.ndarray | None:
    """(n, 3) slice centres (mm, patient coordinates) of the scanner's protocol in the Siemens CSA series header's
    ASCCONV text (``sSliceArray.asSlice[k].sPosition.dSag / dCor / dTra``; a component left out is 0), tile k at
    row k; None when the text or any of the n slices is absent."""
    text = ""
    for elem in ds:
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            text = elem.value.decode("latin-1", "replace")
            break
    if not text:
        return None
    out = np.zeros((n, 3))
    seen: set[int] = set()
    for m in re.finditer(r"sSliceArray\.asSlice\[(\d+)\]\.(sPosition\.d(Sag|Cor|Tra)|dThickness)\s*=\s*"
                         r"([-+0-9.eE]+)", text):
        k = int(m.group(1))
        if k < n:
            seen.add(k)
            if m.group(3):
                out[k, ("Sag", "Cor", "Tra").index(m.group(3))] = float(m.group(4))
    return out if len(seen) == n else None


def _tile_step(ds: Dataset, n: int, normal: np.ndarray, name: str) -> float:
    """The step (mm) between the tiles' slices along ``normal``: SpacingBetweenSlices, checked against the slice
    positions of the scanner's protocol (``protocol_positions``) when the CSA header holds them; the protocol's
    step when SpacingBetweenSlices is absent. VolumeError when the two disagree (the last tile more than
    ``STEP_TOL_MM`` apart), when the protocol's slices are not evenly spaced along the normal (either way), or
    when neither is there: nibabel took SliceThickness then, which leaves out any gap between slices (a
    SpacingBetweenSlices of 3.0 where the protocol says 2.4 put the shared mosaic's last tile 35.4 mm off)."""
    stated = ds.get("SpacingBetweenSlices")
    header = float(stated) if stated not in (None, "") else None
    centres = protocol_positions(ds, n) if n > 1 else None
    protocol = None
    if centres is not None:
        along = (centres - centres[0]) @ normal
        signed = float(along[-1] / (n - 1))  # < 0: the protocol lists its slices against the tiles' order
        if signed == 0 or float(np.max(np.abs(along - signed * np.arange(n)))) > STEP_TOL_MM:
            raise _refuse(name, "the slice positions of its protocol (CSA series header, sSliceArray) are not "
                                "evenly spaced along the slice normal")
        protocol = abs(signed)
    if header is not None and protocol is not None and abs(header - protocol) * (n - 1) > STEP_TOL_MM:
        raise _refuse(name, f"SpacingBetweenSlices {header:g} mm contradicts the {protocol:.4g} mm between the "
                            "slice positions of its protocol (CSA series header, sSliceArray): where its tiles lie "
                            "cannot be told")
    step = protocol if protocol is not None else header
    if step is None:
        raise _refuse(name, "SpacingBetweenSlices is absent and its CSA series header gives no slice positions: "
                            "the step between its tiles is unknown (SliceThickness leaves out any gap)")
    if not (math.isfinite(step) and step > 0):
        raise _refuse(name, f"slice step {step} is not usable")
    return step


def split_mosaic(ds: Dataset, name: str) -> list[Dataset]:
    """The slices of the mosaic ``ds`` as single-frame datasets (tile order, tile k at first + k*step*normal).

    ``name``: the file name, for messages. Raises VolumeError (the reason) when the mosaic cannot be split: no or
    unreadable CSA header, number of images missing or contradicting (0019,100A), a grid that does not divide
    Rows/Columns, missing ImagePositionPatient / ImageOrientationPatient / PixelSpacing, undecodable pixels.
    """
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds or ds[kw].VM == 0:
            raise _refuse(name, f"{kw} is missing")
    # nibabel places the first tile and checks the CSA slice normal with ImageOrientationPatient as written: vectors
    # of norm 0.9999 or 2.0 failed its check of a unit normal (a valid mosaic refused as "not perpendicular"), and
    # its offset from the mosaic's corner to the first tile (hundreds of mm) scales with their norm. It is given
    # the unit vectors of their directions, as every other image is read (``unit_orientation``).
    unit, _ = unit_orientation(ds.ImageOrientationPatient, name)
    w = _wrapper(ds, name)
    w.__dict__["image_orient_patient"] = unit.reshape(2, 3).T  # nibabel's cached_property, set before first use
    n, grid = int(w.n_mosaic), int(w.mosaic_size)
    tag_n = images_in_mosaic_tag(ds)
    if tag_n is not None and tag_n != n:
        raise _refuse(name, f"(0019,100A) says {tag_n} images, the CSA header {n}")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if n < 1 or rows % grid or cols % grid:
        raise _refuse(name, f"{n} images in a {grid}x{grid} grid do not divide its {rows}x{cols} pixels")
    normal = _slice_normal(w, name)
    first = np.asarray(w.image_position, dtype=np.float64)
    step = _tile_step(ds, n, normal, name)
    if not np.isfinite(first).all():
        raise _refuse(name, f"first tile position {first.tolist()} is not usable")
    try:
        tiles = np.asarray(w.get_unscaled_data())  # (tile rows, tile columns, n)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; translated once here
        ts = (ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "") or "not stated"
        raise _refuse(name, f"its pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    if tiles.ndim != 3 or tiles.shape[2] != n:
        raise _refuse(name, f"tiles have shape {tiles.shape}, expected (rows, columns, {n})")
    header = _header_without_pixels(ds)
    out = []
    for k in range(n):
        t = copy.deepcopy(header)
        t.Rows, t.Columns = int(tiles.shape[0]), int(tiles.shape[1])
        t.ImagePositionPatient = [format_number_as_ds(float(v)) for v in first + k * step * normal]
        pixels = np.ascontiguousarray(tiles[:, :, k])
        t.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        t.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(t)
    return out


def tile_name(name: str, k: int, n: int) -> str:
    """How tile ``k`` (0-based) of ``n`` of the mosaic in file ``name`` is named in messages."""
    return f"{name} (mosaic image {k + 1}/{n})"


def _header_without_pixels(ds: Dataset) -> Dataset:
    """The mosaic's header less its pixels and its CSA headers (group 0029, tens of kB each, read already): what
    each tile copies (an fMRI run of 300 mosaics of 60 slices makes 18000 tiles)."""
    hdr = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010 and elem.tag.group != 0x0029:
            hdr.add(copy.deepcopy(elem))
    meta: Any = copy.deepcopy(ds.file_meta) if hasattr(ds, "file_meta") else Dataset()
    hdr.file_meta = meta
    hdr.filename = getattr(ds, "filename", None)  # the mosaic's file, for messages naming it
    if "SliceLocation" in hdr:
        del hdr.SliceLocation  # the mosaic's, not the tile's
    return hdr
