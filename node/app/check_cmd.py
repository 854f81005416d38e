"""``srnode check IN_DIR OUT_DIR``: does the output of ``srnode process`` (or of the node's folder destination) say
the same as its input? One line per derived volume, exit 1 on any failure.

The check has its own small reader (pydicom and numpy only; nothing of ``node.series`` or ``node.derived``), so
a mistake in the pipeline's reading cannot hide itself. Per derived series (one volume) it checks:

- the input images it came from (its SourceImageSequence; every tile of a referenced Siemens mosaic) form one
  stack, and the slice count is (N - 1) * f + 1 for a whole through-plane factor f;
- every derived position lies on the source slice line at step / f (the first pixel moved back by
  (g - 1) / 2g of an input pixel for an in-plane factor g), within 0.01 mm;
- orientation equal to the input's (1e-4 on the cosines), pixel spacing = input spacing / g;
- modality values at the acquired positions equal to the input (padding excluded; within half a stored step of
  the output, plus float rounding; in-plane factors that put no derived pixel centre on an input one are
  reported as not compared);
- photometric interpretation equal to the input's (the same grey-scale polarity);
- one uncertainty object per derived slice; dciodvfy reports 0 errors on every derived and uncertainty object.

Input images that no derived series covers must be reported: ``srnode process`` writes ``report.json`` per series
(a refusal with its reason, or the files it names); otherwise they are a failure.

Mosaics are read without the CSA parser: the number of images from (0019,100A), the grid from it, the first
tile's position from ImagePositionPatient corrected for the grid, and each tile's offset from the protocol's
slice centres (``sSliceArray.asSlice[k].sPosition`` in the ASCCONV text of the series header).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
POSITION_TOL_MM = 0.01
IOP_TOL = 1e-4
SPACING_REL_TOL = 1e-4


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path, help="the input folder given to srnode process")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="its output folder")
    parser.add_argument("--no-dciodvfy", action="store_true", help="do not run dciodvfy on the output objects")
    parser.add_argument("--value-tol", type=float, default=None,
                        help="allowed |derived - input| at acquired positions, modality units (default: half a "
                             "stored step of the output plus float rounding: what an interpolating engine keeps)")


# ---------------------------------------------------------------------------------------------- reading


def _floats(v: Any) -> np.ndarray:
    return np.array([float(x) for x in v], dtype=np.float64)


def _item(ds: Dataset, seq: str, frame: int) -> Dataset | None:
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        g = ds.get(groups)
        if g is not None and len(g) > idx and seq in g[idx] and len(g[idx][seq].value) > 0:
            return g[idx][seq].value[0]  # type: ignore[no-any-return]
    return None


@dataclass
class InImage:
    """One input image: a single-frame instance, a frame of a multi-frame object, or a tile of a mosaic."""

    file: Path
    sop: str
    series: str
    frame: int  # 1-based frame number of a multi-frame object, else 0
    tile: int  # 0-based tile of a mosaic, else -1
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]  # (row spacing dy, column spacing dx), mm
    rows: int
    cols: int
    slope: float
    intercept: float
    photometric: str
    padding: tuple[int, int] | None

    @property
    def name(self) -> str:
        extra = f" frame {self.frame}" if self.frame else f" mosaic image {self.tile + 1}" if self.tile >= 0 else ""
        return self.file.name + extra


def _padding(ds: Dataset) -> tuple[int, int] | None:
    if "PixelPaddingValue" not in ds:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    return (min(a, b), max(a, b))


def _ascconv_positions(ds: Dataset, n: int) -> np.ndarray | None:
    """(n, 3) slice centres of the protocol (sSliceArray.asSlice[k].sPosition; absent components are 0)."""
    text = ""
    for elem in ds:
        if elem.tag.group == 0x0029 and isinstance(elem.value, bytes) and b"ASCCONV" in elem.value:
            text = elem.value.decode("latin-1", "replace")
            break
    if not text:
        return None
    out = np.zeros((n, 3))
    found = False
    for m in re.finditer(r"sSliceArray\.asSlice\[(\d+)\]\.sPosition\.d(Sag|Cor|Tra)\s*=\s*([-+0-9.eE]+)", text):
        k = int(m.group(1))
        if k < n:
            out[k, ("Sag", "Cor", "Tra").index(m.group(2))] = float(m.group(3))
            found = True
    return out if found else None


def _images_in_mosaic(ds: Dataset) -> int | None:
    try:
        return int(ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value)
    except (KeyError, ValueError, TypeError):
        return None


def _read_input(path: Path, ds: Dataset) -> list[InImage]:
    series, sop = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    if not sop and hasattr(ds, "file_meta"):
        sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    rows, cols = int(ds.Rows), int(ds.Columns)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    pad = _padding(ds)
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = []
        for f in range(int(ds.get("NumberOfFrames", 1) or 1)):
            pos, ori = _item(ds, "PlanePositionSequence", f), _item(ds, "PlaneOrientationSequence", f)
            meas, pvt = _item(ds, "PixelMeasuresSequence", f), _item(ds, "PixelValueTransformationSequence", f)
            if pos is None or ori is None or meas is None:
                continue
            ps = _floats(meas.PixelSpacing)
            out.append(InImage(path, sop, series, f + 1, -1, _floats(pos.ImagePositionPatient),
                               _floats(ori.ImageOrientationPatient), (ps[0], ps[1]), rows, cols,
                               float(pvt.get("RescaleSlope", 1) or 1) if pvt else 1.0,
                               float(pvt.get("RescaleIntercept", 0) or 0) if pvt else 0.0, photometric, pad))
        return out
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return []
    ipp, iop, ps = _floats(ds.ImagePositionPatient), _floats(ds.ImageOrientationPatient), _floats(ds.PixelSpacing)
    slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if "MOSAIC" not in [str(v).upper() for v in ds.get("ImageType") or []]:
        return [InImage(path, sop, series, 0, -1, ipp, iop, (ps[0], ps[1]), rows, cols, slope, icpt, photometric,
                        pad)]
    n = _images_in_mosaic(ds) or 0
    centres = _ascconv_positions(ds, n) if n else None
    if not n or centres is None:
        return []  # cannot be placed: stays uncovered unless reported
    grid = math.ceil(math.sqrt(n))
    r, c = rows // grid, cols // grid
    first = ipp + iop[3:] * ps[0] * (rows - r) / 2 + iop[:3] * ps[1] * (cols - c) / 2
    return [InImage(path, sop, series, 0, k, first + centres[k] - centres[0], iop, (ps[0], ps[1]), r, c, slope,
                    icpt, photometric, pad) for k in range(n)]


def read_inputs(in_dir: Path) -> list[InImage]:
    """Every image under ``in_dir``, once per SOPInstanceUID (+ frame, tile) as the node keeps an instance once;
    non-DICOM and non-image files are left out."""
    out: list[InImage] = []
    seen: set[tuple[str, int, int]] = set()
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name == "report.json":
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue
        try:
            images = _read_input(p, ds)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            continue
        for x in images:
            key = (x.sop, x.frame, x.tile)
            if not x.sop or key not in seen:
                seen.add(key)
                out.append(x)
    return out


@dataclass
class OutImage:
    file: Path
    ds: Dataset  # header only
    refs: list[tuple[str, int]]  # (SOPInstanceUID, frame number or 0) of SourceImageSequence

    @property
    def ipp(self) -> np.ndarray:
        return _floats(self.ds.ImagePositionPatient)

    @property
    def iop(self) -> np.ndarray:
        return _floats(self.ds.ImageOrientationPatient)


def read_outputs(out_dir: Path) -> tuple[dict[str, list[OutImage]], dict[str, list[OutImage]]]:
    """(derived image series, uncertainty Secondary Capture series), each SeriesInstanceUID -> images."""
    derived: dict[str, list[OutImage]] = {}
    sc: dict[str, list[OutImage]] = {}
    for p in sorted(out_dir.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue
        refs = [(str(it.get("ReferencedSOPInstanceUID", "")), int(it.get("ReferencedFrameNumber", 0) or 0))
                for it in ds.get("SourceImageSequence") or []]
        img = OutImage(p, ds, refs)
        target = sc if str(ds.get("SOPClassUID", "")) == SECONDARY_CAPTURE else derived
        target.setdefault(str(ds.SeriesInstanceUID), []).append(img)
    return derived, sc


class Pixels:
    """Modality values of input and output images, decoded once per file (NaN where input padding)."""

    def __init__(self) -> None:
        self._arrays: dict[Path, np.ndarray] = {}

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._arrays:
            if len(self._arrays) > 64:
                self._arrays.clear()
            self._arrays[path] = np.asarray(pydicom.dcmread(path).pixel_array)
        return self._arrays[path]

    def of_input(self, img: InImage) -> np.ndarray:
        arr = self._array(img.file)
        if img.frame:
            stored = arr[img.frame - 1]
        elif img.tile >= 0:
            grid = arr.shape[0] // img.rows
            gr, gc = divmod(img.tile, grid)
            stored = arr[gr * img.rows:(gr + 1) * img.rows, gc * img.cols:(gc + 1) * img.cols]
        else:
            stored = arr
        vals = stored.astype(np.float64) * img.slope + img.intercept
        if img.padding is not None:
            vals[(stored >= img.padding[0]) & (stored <= img.padding[1])] = np.nan
        return vals  # type: ignore[no-any-return]

    def of_output(self, img: OutImage) -> np.ndarray:
        ds = img.ds
        slope, icpt = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        return self._array(img.file).astype(np.float64) * slope + icpt  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------- checking


@dataclass
class VolumeCheck:
    """The check of one derived series (one volume, or one regular run of it)."""

    series: str
    description: str
    slices: int = 0
    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    covered: list[InImage] = field(default_factory=list)
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        head = "SKIPPED" if self.skipped else "OK" if self.ok else "FAILED"
        return (f"{head} derived series {self.series} ({self.description}): "
                + "; ".join(self.problems + self.facts))


def _dciodvfy_errors(files: Iterable[Path]) -> tuple[int, str]:
    """(number of error lines, the first one) over ``files``."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return -1, "dciodvfy not found"
    count, first = 0, ""
    for f in files:
        r = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=120)
        errs = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        if errs and not first:
            first = f"{f.name}: {errs[0]}"
        count += len(errs)
    return count, first


def check_volume(series: str, images: list[OutImage], inputs: dict[tuple[str, int], list[InImage]],
                 sc: dict[str, list[OutImage]], pixels: Pixels, run_dciodvfy: bool = True,
                 value_tol: float | None = None) -> VolumeCheck:
    """Check one derived series against the input images it references (see the module docstring)."""
    ds0 = images[0].ds
    check = VolumeCheck(series, str(ds0.get("SeriesDescription", "") or "no description"), len(images))
    p = check.problems
    src: dict[int, InImage] = {}
    for img in images:
        for ref in img.refs:
            for x in inputs.get(ref, []):
                src[id(x)] = x
    if not src:
        check.skipped = True
        check.facts.append("its source images are not in IN_DIR")
        return check
    iop = images[0].iop
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    ins = sorted(src.values(), key=lambda x: float(x.ipp @ normal))
    outs = sorted(images, key=lambda x: float(x.ipp @ normal))
    n, m = len(ins), len(outs)
    dist = np.array([float(x.ipp @ normal) for x in ins])
    if n > 1 and np.min(np.diff(dist)) < POSITION_TOL_MM:
        k = int(np.argmin(np.diff(dist)))
        p.append(f"its input images {ins[k].name} and {ins[k + 1].name} share a slice position")
        return check
    if n == 1:
        f = 1 if m == 1 else 0
    else:
        f = (m - 1) // (n - 1) if (m - 1) % (n - 1) == 0 else 0
    if f < 1:
        p.append(f"{m} derived slices from {n} input images is not (N - 1) * f + 1 for a whole factor f")
        return check
    rows_in, cols_in = ins[0].rows, ins[0].cols
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    g = rows // rows_in if rows % rows_in == 0 and rows // rows_in == cols / cols_in else 0
    if g < 1:
        p.append(f"matrix {rows}x{cols} is not a whole multiple of the input's {rows_in}x{cols_in}")
        return check
    check.facts.append(f"{m} slices from {n} input images (through-plane x{f}, in-plane x{g})")
    # orientation, pixel spacing, photometric interpretation
    worst_iop = max(float(np.max(np.abs(o.iop - i.iop))) for o in outs for i in (ins[0], ins[-1]))
    if worst_iop > IOP_TOL:
        p.append(f"orientation differs from the input's by {worst_iop:.3g} in a direction cosine")
    dy, dx = ins[0].spacing
    ps = _floats(ds0.PixelSpacing)
    if abs(ps[0] * g - dy) > SPACING_REL_TOL * dy or abs(ps[1] * g - dx) > SPACING_REL_TOL * dx:
        p.append(f"pixel spacing {ps[0]:g}/{ps[1]:g} mm, expected {dy / g:g}/{dx / g:g}")
    photometric = {str(o.ds.get("PhotometricInterpretation", "")) for o in outs}
    if photometric != {ins[0].photometric}:
        p.append(f"photometric interpretation {'/'.join(sorted(photometric))}, input {ins[0].photometric} "
                 "(the grey scale would display inverted)")
    # positions on the source slice line at step / f, first pixel moved back for the in-plane factor
    shift = (g - 1) / (2 * g) * (dx * ins[0].iop[:3] + dy * ins[0].iop[3:])
    worst, where = 0.0, ""
    for k, o in enumerate(outs):
        i, r = divmod(k, f)
        want = ins[i].ipp if i >= n - 1 else ins[i].ipp + r / f * (ins[i + 1].ipp - ins[i].ipp)
        err = float(np.linalg.norm(o.ipp + shift - want))
        if err > worst:
            worst, where = err, o.file.name
    if worst > POSITION_TOL_MM:
        p.append(f"derived slice {where} is {worst:.3g} mm off its place on the source slice line")
    # values at the acquired positions
    if g % 2 == 1:
        c = (g - 1) // 2
        worst_v = 0.0
        for i, x in enumerate(ins):
            o = outs[i * f]
            d = pixels.of_output(o)[c::g, c::g]
            v = pixels.of_input(x)
            ok = np.isfinite(v)
            slope = abs(float(o.ds.get("RescaleSlope", 1) or 1))
            big = float(np.nanmax(np.abs(v), initial=1.0)) if ok.any() else 1.0
            tol = value_tol if value_tol is not None else 0.5 * slope + 1e-5 * big + 1e-3
            diff = float(np.max(np.abs(d[ok] - v[ok]), initial=0.0))
            worst_v = max(worst_v, diff)
            if diff > tol:
                p.append(f"values at input image {x.name} differ by up to {diff:.4g} (tolerance {tol:.3g})")
                break
        else:
            check.facts.append(f"values at acquired positions equal (max |diff| {worst_v:.3g})")
    else:
        check.facts.append(f"values not compared (in-plane x{g} puts no derived pixel centre on an input one)")
    # uncertainty objects: one per derived slice
    uids = {str(o.ds.SOPInstanceUID) for o in outs}
    sig = [s for objs in sc.values() for s in objs if any(ref[0] in uids for ref in s.refs)]
    if len(sig) != m:
        p.append(f"{len(sig)} uncertainty object(s) for {m} derived slices")
    else:
        check.facts.append(f"{m} uncertainty objects")
    if run_dciodvfy:
        errors, first = _dciodvfy_errors([o.file for o in outs] + [s.file for s in sig])
        if errors < 0:
            check.facts.append("dciodvfy not run (not installed)")
        elif errors:
            p.append(f"dciodvfy: {errors} error(s), first {first}")
        else:
            check.facts.append("dciodvfy 0 errors")
    check.covered = ins  # covered by this derived series (which passed or is reported as failed)
    return check


def _reports(out_dir: Path) -> dict[str, str]:
    """SeriesInstanceUID -> the text of its report.json (written by ``srnode process``)."""
    out: dict[str, str] = {}
    for p in out_dir.rglob("report.json"):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):  # the list of the series' files is no report about any of them
            out[str(data.get("series", ""))] = json.dumps({k: v for k, v in data.items() if k != "files"})
    return out


def _reason(text: str) -> str:
    data = json.loads(text)
    return str(data.get("failed") or data.get("left_alone") or "; ".join(data.get("report", {}).get("refused", []))
               or "named in report.json")


@dataclass
class CheckResult:
    """Everything ``srnode check`` found: one check per derived series, and the input series whose images no
    derived series covers (reported with a reason in report.json, or not)."""

    volumes: list[VolumeCheck] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # lines: images left out, with the reason recorded
    unreported: list[str] = field(default_factory=list)  # lines: images left out silently (failures)

    @property
    def ok(self) -> bool:
        return not self.unreported and all(v.ok for v in self.volumes)

    def lines(self) -> list[str]:
        return [v.line() for v in self.volumes] + self.reported + self.unreported


def check_folders(in_dir: Path, out_dir: Path, run_dciodvfy: bool = True,
                  value_tol: float | None = None) -> CheckResult:
    """Check ``out_dir`` (the output of ``srnode process``) against ``in_dir`` (see the module docstring)."""
    inputs = read_inputs(in_dir)
    by_ref: dict[tuple[str, int], list[InImage]] = {}
    for x in inputs:
        by_ref.setdefault((x.sop, x.frame), []).append(x)
    derived, sc = read_outputs(out_dir)
    pixels = Pixels()
    result = CheckResult()
    covered: set[int] = set()
    for uid, images in sorted(derived.items()):
        c = check_volume(uid, images, by_ref, sc, pixels, run_dciodvfy, value_tol)
        result.volumes.append(c)
        covered.update(id(x) for x in c.covered)
    reports = _reports(out_dir)
    by_series: dict[str, list[InImage]] = {}
    for x in inputs:
        if id(x) not in covered:
            by_series.setdefault(x.series, []).append(x)
    for series, left in sorted(by_series.items()):
        text = reports.get(series, "")
        named = [x for x in left if x.file.name in text]
        whole = bool(text) and any(k in json.loads(text) for k in ("failed", "left_alone"))
        files = sorted({x.file.name for x in left})
        listed = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        label = series or "(no SeriesInstanceUID)"
        if whole or len(named) == len(left):
            result.reported.append(f"REPORTED input series {label}: {len(left)} image(s) not super-resolved "
                                   f"({listed}): {_reason(text)}")
        else:
            result.unreported.append(f"FAILED input series {label}: {len(left) - len(named)} image(s) in no "
                                     f"derived series and not reported ({listed})")
    if not inputs:
        result.unreported.append(f"FAILED no input images found in {in_dir}")
    return result


def run(args: argparse.Namespace) -> int:
    result = check_folders(Path(args.in_dir), Path(args.out_dir), not args.no_dciodvfy, args.value_tol)
    for ln in result.lines():
        print(ln)
    failed = sum(not v.ok for v in result.volumes) + len(result.unreported)
    print(f"{len(result.volumes)} derived series checked, {len(result.reported)} input series reported as not "
          f"processed, {failed} failure(s)")
    return 0 if result.ok else 1
