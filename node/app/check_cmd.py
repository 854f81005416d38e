"""``srnode check IN_DIR OUT_DIR``: does the output of ``srnode process`` (or of the node's folder destination) say
the same as its input? One line per derived volume, exit 1 on any failure.

The check has its own small reader (pydicom and numpy only; nothing of ``node.series`` or ``node.derived``), so
a mistake in the pipeline's reading cannot hide itself. Per derived series (one volume) it checks:

- the input images it came from (its SourceImageSequence; every tile of a referenced Siemens mosaic) form one
  stack, and the slice count is (N - 1) * f + 1 for a whole through-plane factor f;
- every derived position lies on the source slice line at step / f (the first pixel moved back by
  (g - 1) / 2g of an input pixel for an in-plane factor g), within 0.01 mm; when every input position is written
  rounded to r = 0.1 or 0.01 mm (the pipeline then takes a regular stack's positions from the line fitted through
  them), on the line fitted the same way instead, within 0.01 mm, provided that fit moves no written position beyond
  its rounding (r/2 x sqrt(3)): a derived position merely near the written ones is no longer accepted (series14);
- orientation equal to every input image's (``node.series.planes.orientation_gap``: within 0.5 px in-plane,
  0.25 of the slice step through-plane, 0.1 deg), pixel spacing = input spacing / g;
- modality values at the acquired positions equal to the input (padding excluded; within half a stored step of
  the output, plus float rounding; in-plane factors that put no derived pixel centre on an input one are
  reported as not compared);
- photometric interpretation equal to the input's (the same grey-scale polarity);
- a derived CT's input images all state RescaleSlope and RescaleIntercept (else its values are a guess);
- LossyImageCompression 01 on every derived and uncertainty object when an input image says it was lossy
  compressed (or came in JPEG baseline / extended);
- the real-world value mapping its input images state (RealWorldValueMappingSequence, or Philips' private
  ScaleSlope (2005,100E): FP = value / (RS x SS)) stated by every derived slice as the same line of values;
- its input images state one ConvolutionKernel and one ContrastBolusAgent (two reconstructions, or a pre- and a
  post-contrast pass, are never one volume);
- its uncertainty objects: a Parametric Map has one frame per derived slice, frame k at derived slice k's position
  (0.01 mm) and in its frame of reference; a Secondary Capture card carries no plane or frame of reference; an
  engine without sigma (cubic) has none, any other at least one; dciodvfy reports 0 errors on every derived and
  uncertainty object.

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

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.app.check_read import (
    PARAMETRIC_MAP,
    POSITION_TOL_MM,
    SPACING_REL_TOL,
    InImage,
    OutImage,
    Pixels,
    declared_instances,
    floats,
    input_rounding,
    read_inputs,
    read_outputs,
    real_world_lines,
)
from node.dicom_read import read_dicom
from node.errors import VolumeError
from node.own import own_output_marker
from node.series.planes import orientation_gap


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR", type=Path, help="the input folder given to srnode process")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="its output folder")
    parser.add_argument("--no-dciodvfy", action="store_true", help="do not run dciodvfy on the output objects")
    parser.add_argument("--value-tol", type=float, default=None,
                        help="allowed |derived - input| at acquired positions, modality units (default: half a "
                             "stored step of the output plus float rounding: what an interpolating engine keeps)")


# ---------------------------------------------------------------------------------------------- reading


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


def _worst_position(outs: list[OutImage], positions: np.ndarray, f: int, shift: np.ndarray) -> tuple[float, str]:
    """(mm, file) of the derived slice farthest from its place on the slice line through ``positions`` (the
    inputs' in order along the normal), f derived slices per input step, first pixel moved back by ``shift``."""
    n = len(positions)
    worst, where = 0.0, ""
    for k, o in enumerate(outs):
        i, r = divmod(k, f)
        want = positions[i] if i >= n - 1 else positions[i] + r / f * (positions[i + 1] - positions[i])
        err = float(np.linalg.norm(o.ipp + shift - want))
        if err > worst:
            worst, where = err, o.file.name
    return worst, where


def _line_fit(positions: np.ndarray) -> np.ndarray:
    """(N, 3) positions on the straight line fitted (least squares, each component against the slice index)."""
    idx = np.arange(len(positions), dtype=np.float64)
    design = np.stack([np.ones(len(positions)), idx - idx.mean()], axis=1)
    coef, *_ = np.linalg.lstsq(design, positions, rcond=None)
    return design @ coef  # type: ignore[no-any-return]


def _engine_of(ds: Dataset) -> str:
    """The engine named in a derived object's DerivationDescription ("... by engine selfsup 1.2 ..."), or ""."""
    m = re.search(r"by engine (\S+)", str(ds.get("DerivationDescription", "") or ""))
    return m.group(1) if m else ""


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
    # every derived image against every input image, as node.series.planes judges one plane family: the largest
    # displacement the difference causes in the input's field of view (pixels in-plane, fraction of the step)
    step = float(np.median(np.diff(dist))) if n > 1 else None
    in_iops = {tuple(float(v) for v in i.iop): i.spacing for i in ins}  # each distinct orientation once
    out_iops = {tuple(float(v) for v in o.iop) for o in outs}
    gaps = [orientation_gap(np.array(a), np.array(b), rows_in, cols_in, sp, step)
            for b in out_iops for a, sp in in_iops.items()]
    worst_gap = max(gaps, key=lambda x: (not x.same, x.in_plane_px))
    if not worst_gap.same:
        p.append(f"orientation differs from an input image's by {worst_gap.describe()}")
    elif len(in_iops) > 1:
        check.facts.append(f"input orientations jitter; the derived one is within {worst_gap.in_plane_px:.2g} px "
                           f"in-plane and {worst_gap.through_mm:.2g} mm through-plane of every input image's")
    dy, dx = ins[0].spacing
    ps = floats(ds0.PixelSpacing)
    if abs(ps[0] * g - dy) > SPACING_REL_TOL * dy or abs(ps[1] * g - dx) > SPACING_REL_TOL * dx:
        p.append(f"pixel spacing {ps[0]:g}/{ps[1]:g} mm, expected {dy / g:g}/{dx / g:g}")
    photometric = {str(o.ds.get("PhotometricInterpretation", "")) for o in outs}
    if photometric != {ins[0].photometric}:
        p.append(f"photometric interpretation {'/'.join(sorted(photometric))}, input {ins[0].photometric} "
                 "(the grey scale would display inverted)")
    # positions on the source slice line at step / f, first pixel moved back for the in-plane factor
    shift = (g - 1) / (2 * g) * (dx * outs[0].iop[:3] + dy * outs[0].iop[3:])
    written = np.array([x.ipp for x in ins])
    worst, where = _worst_position(outs, written, f, shift)
    if worst > POSITION_TOL_MM:
        # input positions written rounded (0.1 / 0.01 mm): the pipeline takes a regular stack's positions from the
        # line fitted through them. Accepted only if the derived positions lie on that same fitted line (within
        # POSITION_TOL_MM) and the fit moves no written position beyond its rounding (r/2 x sqrt(3)): a derived
        # position merely within r x sqrt(3) of the written line is not enough (series14)
        rounding = input_rounding(list(written))
        fitted = _line_fit(written) if rounding else written
        moved = float(np.max(np.linalg.norm(fitted - written, axis=1)))
        worst_fit, where_fit = _worst_position(outs, fitted, f, shift)
        if rounding and moved <= rounding * float(np.sqrt(3.0)) / 2 + POSITION_TOL_MM and \
                worst_fit <= POSITION_TOL_MM:
            check.facts.append(f"positions on the line fitted through the input positions written to {rounding:g} mm "
                               f"(a written one moved up to {moved:.3f} mm)")
        else:
            fit = (f"; nor on the line fitted through the input positions written to {rounding:g} mm ("
                   f"{worst_fit:.3g} mm off at {where_fit}" + (f", the fit moving a written position {moved:.3g} mm, "
                   "beyond the rounding" if moved > rounding * float(np.sqrt(3.0)) / 2 + POSITION_TOL_MM else "")
                   + ")") if rounding else ""
            p.append(f"derived slice {where} is {worst:.3g} mm off its place on the source slice line (tolerance "
                     f"{POSITION_TOL_MM:g} mm){fit}")
    # values at the acquired positions (cubic interpolates them exactly; an SR engine keeps the acquired slices
    # through its data consistency over the slice profile, not point by point: compared for cubic only)
    engine = _engine_of(outs[0].ds)
    if engine != "cubic":
        check.facts.append(f"values at acquired positions not compared (engine {engine or 'unknown'} keeps the "
                           "acquired slices through its slice-profile data consistency, not point by point; "
                           "check a --engine cubic output for exact values)")
    elif g % 2 == 1:
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
    # uncertainty objects: a Parametric Map on the derived grid and/or an SC card; none for an engine without sigma
    uids = {str(o.ds.SOPInstanceUID) for o in outs}
    sig = [s for objs in sc.values() for s in objs if any(ref[0] in uids for ref in s.refs)]
    _check_sigma(check, outs, sig, engine)
    # made from lossy-compressed images: said on every derived object (PS3.3 C.7.6.1.1.5, never reset)
    lossy_in = [x for x in ins if x.lossy]
    unsaid = [o for o in outs + sig if str(o.ds.get("LossyImageCompression", "") or "") != "01"]
    if lossy_in and unsaid:
        p.append(f"{len(lossy_in)} input image(s) lossy compressed ({lossy_in[0].name}, ...), {len(unsaid)} derived "
                 f"or uncertainty object(s) without LossyImageCompression 01 ({unsaid[0].file.name}, ...)")
    # a derived CT's values are HU only if every input image stated its rescale (Type 1 in the CT Image module):
    # an image without one was read as slope 1 / intercept 0, a guess (field17), and compares equal to itself
    unstated = [x for x in ins if not x.rescale_stated]
    if unstated and str(ds0.get("Modality", "")).strip().upper() == "CT":
        p.append(f"{len(unstated)} of its {n} input image(s) state no RescaleSlope / RescaleIntercept "
                 f"({unstated[0].name}, ...): the derived CT values are a guess (slope 1 / intercept 0)")
    _check_real_world(check, ins, outs)
    for k, what in enumerate(("ConvolutionKernel", "ContrastBolusAgent")):
        values = {x.acquired_as[k] for x in ins}
        if len(values) > 1:  # counted, never quoted
            p.append(f"its input images state {len(values)} different {what} values: "
                     + ("two reconstructions" if k == 0 else "images without and with contrast (or two agents)")
                     + " stacked into one volume")
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


def _check_real_world(check: VolumeCheck, ins: list[InImage], outs: list[OutImage]) -> None:
    """The real-world value mapping its input images state (a RealWorldValueMappingSequence, or Philips' ScaleSlope
    (2005,100E)) must be stated by every derived slice in its own stored values: the same line of modality values
    (relative 1e-6). Before field18 the derived series carried none: a Philips-aware reader got the input in its
    precise (FP) values and the derived in displayed values, 180.9x apart on the shared fMRI."""
    stated = {x.real_world for x in ins}
    if stated == {()}:
        return
    if len(stated) > 1:
        check.problems.append(f"its input images state {len(stated)} different real-world value mappings: one "
                              "derived value stands for several real ones")
        return
    want = next(iter(stated))
    for o in outs:
        slope = float(o.ds.get("RescaleSlope", 1) or 1)
        icpt = float(o.ds.get("RescaleIntercept", 0) or 0)
        got = real_world_lines(o.ds.get("RealWorldValueMappingSequence"), None, slope, icpt)
        same = len(got) == len(want) and all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9 * max(abs(x[0]) for x in want))
            for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
        if not same:
            check.problems.append(
                f"its input images state a real-world value mapping (real = {want[0][0]:.6g} x value + "
                f"{want[0][1]:.6g}; RealWorldValueMappingSequence or Philips ScaleSlope (2005,100E)) that derived "
                f"slice {o.file.name} " + ("does not state" if not got else
                                           f"states otherwise (real = {got[0][0]:.6g} x value + {got[0][1]:.6g})")
                + ": a quantitative reader gets other values from the derived series")
            return
    check.facts.append(f"real-world value mapping of the input stated alike ({len(want)} item(s))")


def _check_sigma(check: VolumeCheck, outs: list[OutImage], sig: list[OutImage], engine: str) -> None:
    """The uncertainty objects of one derived series (``outs``, in slice order); see the module docstring."""
    p, m = check.problems, len(outs)
    if not sig:
        if engine == "cubic":
            check.facts.append("no uncertainty object (cubic has no sigma)")
        else:
            p.append(f"no uncertainty object (engine {engine or 'unknown'})")
        return
    made = []
    for s in sig:
        if str(s.ds.SOPClassUID) == PARAMETRIC_MAP:
            frames = list(s.ds.get("PerFrameFunctionalGroupsSequence") or [])
            if len(frames) != m:
                p.append(f"uncertainty map {s.file.name}: {len(frames)} frames for {m} derived slices")
                continue
            by_number = sorted(outs, key=lambda o: int(o.ds.get("InstanceNumber", 0) or 0))  # derived slice order
            worst = max(float(np.linalg.norm(floats(f.PlanePositionSequence[0].ImagePositionPatient) - o.ipp))
                        for f, o in zip(frames, by_number, strict=True))
            if worst > POSITION_TOL_MM:
                p.append(f"uncertainty map {s.file.name}: a frame lies {worst:.3g} mm off its derived slice")
            if str(s.ds.get("FrameOfReferenceUID", "")) != str(outs[0].ds.get("FrameOfReferenceUID", "")):
                p.append(f"uncertainty map {s.file.name}: another frame of reference than the derived series")
            made.append(f"uncertainty map of {m} frames on the derived positions")
        elif int(s.ds.get("SamplesPerPixel", 1) or 1) == 3:  # the colour card
            extra = [kw for kw in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID")
                     if kw in s.ds]
            if extra:
                p.append(f"uncertainty card {s.file.name} carries {', '.join(extra)} (not in the SC IOD)")
            made.append("uncertainty card")
        else:  # one grey SC per derived slice (srnode before the Parametric Map)
            made.append("uncertainty SC")
    legacy = made.count("uncertainty SC")
    if legacy and legacy != m:
        p.append(f"{legacy} uncertainty object(s) for {m} derived slices")
    check.facts.append(", ".join(dict.fromkeys(made)))


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
    incomplete: list[str] = field(default_factory=list)  # lines: series derived from part of what they declare

    @property
    def ok(self) -> bool:
        return not self.unreported and all(v.ok for v in self.volumes)

    def lines(self) -> list[str]:
        return [v.line() for v in self.volumes] + self.reported + self.incomplete + self.unreported


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
    _check_declared(inputs, reports, result)
    if not inputs:
        result.unreported.append(f"FAILED no input images found in {in_dir}")
    return result


def _check_declared(inputs: list[InImage], reports: dict[str, str], result: CheckResult) -> None:
    """An input series holding fewer instances than its images declare (``declared_instances``: a slice missing
    at an end of the stack leaves no gap to see) must be said in its report.json (``incomplete``, field19): a
    REPORTED line when it is, a FAILED one when its report does not say so (the outputs made before)."""
    by_series: dict[str, list[InImage]] = {}
    for x in inputs:
        by_series.setdefault(x.series, []).append(x)
    for series, images in sorted(by_series.items()):
        declared = declared_instances(images)
        held = len({x.sop for x in images})
        if declared <= held:
            continue
        text = reports.get(series, "")
        label = series or "(no SeriesInstanceUID)"
        if not text or "left_alone" in json.loads(text) or "failed" in json.loads(text):
            continue  # not derived: nothing made from part of it
        if json.loads(text).get("report", {}).get("incomplete"):
            result.incomplete.append(f"REPORTED input series {label}: INCOMPLETE, {held} of the {declared} "
                                   "instance(s) its images declare (ImagesInAcquisition): said in report.json")
        else:
            result.unreported.append(f"FAILED input series {label}: holds {held} of the {declared} instance(s) its "
                                     "images declare (ImagesInAcquisition), and report.json does not say its derived "
                                     "series was made from part of it")


def _only_derived(folder: Path) -> str:
    """The marker that srnode made every DICOM file under ``folder`` (``node.own``: the first of them), "" when
    one is not srnode's or there is none. Stops at the first file that is not srnode's (an input folder: one
    header read)."""
    marker = ""
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.name == "report.json":
            continue
        try:
            ds = read_dicom(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):  # not DICOM (preview.png)
            continue
        if "SeriesInstanceUID" not in ds:
            continue
        found = own_output_marker(ds)
        if not found:
            return ""
        marker = marker or found
    return marker


def run(args: argparse.Namespace) -> int:
    """Run ``srnode check``: one line per derived series and a summary; 0 when everything holds, else 1.
    VolumeError (one line, exit 1) when IN_DIR or OUT_DIR does not exist."""
    for what, path in (("IN_DIR", Path(args.in_dir)), ("OUT_DIR", Path(args.out_dir))):
        if not path.exists():
            raise VolumeError(f"{path}: {what} does not exist")
    # the folders swapped (OUTPUT INPUT): the derived objects were read as inputs, "55 image(s) in no derived
    # series" counting one Parametric Map's frames
    if marker := _only_derived(Path(args.in_dir)):
        raise VolumeError(f"{args.in_dir}: the first folder holds derived objects only (made by srnode: {marker}): "
                          f"check takes INPUT then OUTPUT: srnode check IN_DIR OUT_DIR")
    result = check_folders(Path(args.in_dir), Path(args.out_dir), not args.no_dciodvfy, args.value_tol)
    for ln in result.lines():
        print(ln)
    failed = sum(not v.ok for v in result.volumes) + len(result.unreported)
    skipped = sum(v.skipped for v in result.volumes)
    print(f"{len(result.volumes) - skipped} derived series checked"
          + (f" ({skipped} skipped: their source images are not in IN_DIR)" if skipped else "")
          + f", {len(result.reported)} input series reported as not processed"
          + (f", {len(result.incomplete)} reported as derived from part of what they declare"
             if result.incomplete else "")
          + f", {failed} failure(s)")
    return 0 if result.ok else 1
