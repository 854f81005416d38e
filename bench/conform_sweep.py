"""Sweep: what srnode sends to PACS, checked end to end on every ../shared/data series (issue conform19).

For each series: ``srnode process --engine cubic`` (every CT/MR rule, x2 through-plane) and ``srnode check``
(slices, positions, values at acquired positions, dciodvfy errors), then on every written object: new UIDs,
DERIVED\\SECONDARY, every Patient / General Study / Patient Study attribute of the input (PS3.3 C.7.1.1, C.7.2.1,
C.7.2.2) present and equal, SpecificCharacterSet kept, Source / Referenced image references naming input
SOPInstanceUIDs, geometry (IOP, PixelSpacing, SliceThickness, SpacingBetweenSlices against the IPP steps),
dciodvfy warnings by kind. With ``--sigma``: the same series through the ``sigma-test`` engine (cubic + a sigma
ramp) and ``[derive] uncertainty = "both"``, the Parametric Map read back by highdicom (RWVM, units, frame
geometry). With ``--orthanc``: the objects through the three delivery paths (C-STORE, STOW-RS, Orthanc REST) into
a real Orthanc 1.10.1, read back by REST file download and compared byte for byte, else element by element; then
a rejection note (the series sent again with one more slice) through the same three paths.

    PYTHONPATH=. .venv/bin/python bench/conform_sweep.py [--sigma] [--orthanc] [--only NAME] OUT_DIR

Prints one table row per series and check; figures to OUT_DIR/sweep.json. Not part of ``make test`` (minutes on a
2-core machine); tests/derived/test_patient_study_modules.py and tests/send/test_delivery_paths_keep_objects.py
keep the findings.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from node.app import process_cmd  # noqa: E402
from node.app.check_cmd import check_folders  # noqa: E402
from node.derived.modules import PATIENT, STUDY  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.2.2 Patient Study: the attributes compared (the node's list
# plus anything else of these modules a source might carry)
MODULE_KWS = tuple(dict.fromkeys((*PATIENT, *STUDY, "SpecificCharacterSet")))

RULE = """
[[destinations]]
name = "none"
kind = "folder"
path = "unused"

[[rules]]
name = "every-ct-mr"
match = { Modality = "^(CT|MR)$" }
through_plane_factor = 2
"""


def _process(in_dir: Path, out_dir: Path, engine: str, uncertainty: str = "") -> int:
    cfg = out_dir.parent / f"{out_dir.name}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    text = (f'[derive]\nuncertainty = "{uncertainty}"\n' if uncertainty else "") + RULE
    cfg.write_text(text)
    parser = argparse.ArgumentParser()
    process_cmd.configure(parser)
    return process_cmd.run(parser.parse_args([str(in_dir), str(out_dir), "--engine", engine, "--no-preview",
                                              "--quiet", "--config", str(cfg)]))


def _read_dir(d: Path) -> list[tuple[Path, Dataset]]:
    out = []
    for p in sorted(d.rglob("*")):
        if p.is_file():
            try:
                out.append((p, pydicom.dcmread(p, stop_before_pixels=True)))
            except Exception:  # noqa: BLE001, S112 - not DICOM (a report, a preview)
                continue
    return out


def _val(ds: Dataset, kw: str) -> Any:
    if kw not in ds:
        return None
    v = ds[kw].value
    if isinstance(v, pydicom.sequence.Sequence):
        return [sorted((str(e.keyword), str(e.value)) for e in it) for it in v]
    if v is None or v == "":
        return None
    return str(v)


def _refs(ds: Dataset) -> set[str]:
    refs: set[str] = set()
    for seq in ("SourceImageSequence", "ReferencedImageSequence"):
        for it in ds.get(seq, []) or []:
            refs.add(str(it.ReferencedSOPInstanceUID))
    for grp in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
        for der in grp.get("DerivationImageSequence", []) or []:
            for src in der.get("SourceImageSequence", []) or []:
                refs.add(str(src.ReferencedSOPInstanceUID))
    return refs


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=300)
    lines = (r.stdout + r.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def _kind(line: str) -> str:
    """A dciodvfy line without its numbers and quoted values: one kind per message."""
    return re.sub(r"<[^>]*>|\d+", "#", line)[:160]


def check_objects(in_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Every object in ``out_dir`` against the input headers (see the module docstring)."""
    inputs = _read_dir(in_dir)
    in_sops = {str(ds.SOPInstanceUID) for _, ds in inputs if "SOPInstanceUID" in ds}
    in_sops |= {str(ds.file_meta.MediaStorageSOPInstanceUID) for _, ds in inputs}
    in_series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in inputs}
    by_sop = {str(ds.SOPInstanceUID): ds for _, ds in inputs if "SOPInstanceUID" in ds}
    outputs = _read_dir(out_dir)
    out_sops = {str(ds.SOPInstanceUID) for _, ds in outputs}
    problems: collections.Counter[str] = collections.Counter()
    warn_kinds: collections.Counter[str] = collections.Counter()
    errors = 0
    by_class: collections.Counter[str] = collections.Counter()
    per_series: dict[str, list[Dataset]] = collections.defaultdict(list)
    dcio_done: set[str] = set()
    for p, ds in outputs:
        cls = str(ds.SOPClassUID)
        by_class[getattr(ds.SOPClassUID, "name", cls)] += 1
        if str(ds.SOPInstanceUID) in in_sops:
            problems["SOPInstanceUID of an input"] += 1
        if str(ds.SeriesInstanceUID) in in_series:
            problems["SeriesInstanceUID of the input"] += 1
        it = list(ds.get("ImageType", []) or [])
        # a Parametric Map's ImageType is DERIVED\PRIMARY (PS3.3 C.8.32.3.1 Value 2 "shall be PRIMARY")
        want = ["DERIVED", "PRIMARY"] if "Parametric" in str(getattr(ds.SOPClassUID, "name", "")) else \
            ["DERIVED", "SECONDARY"]
        if it[:2] != want:
            problems[f"ImageType {it[:2]}"] += 1
        refs = _refs(ds)
        if not refs:
            problems["no source reference"] += 1
        if refs - in_sops - out_sops:
            problems["a reference to no input or derived instance"] += 1
        src = by_sop.get(sorted(refs)[0]) if refs else inputs[0][1]
        src = src if src is not None else inputs[0][1]
        for kw in MODULE_KWS:
            a, b = _val(src, kw), _val(ds, kw)
            if a is not None and a != b:
                problems[f"{kw} {'lost' if b is None else 'changed'}"] += 1
        per_series[str(ds.SeriesInstanceUID)].append(ds)
        series = str(ds.SeriesInstanceUID)
        if series not in dcio_done or int(ds.get("InstanceNumber", 0) or 0) in (1,):
            dcio_done.add(series)
            errs, warns = _dciodvfy(p)
            errors += len(errs)
            for e in errs:
                problems[f"dciodvfy {_kind(e)}"] += 1
            for w in warns:
                warn_kinds[_kind(w)] += 1
    for _series, dss in per_series.items():
        imgs = [d for d in dss if "ImagePositionPatient" in d]
        if len(imgs) < 2:
            continue
        imgs.sort(key=lambda d: int(d.InstanceNumber))
        import numpy as np

        iop = np.array([float(v) for v in imgs[0].ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        z = [float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])) for d in imgs]
        steps = np.abs(np.diff(sorted(z)))
        sbs = float(imgs[0].get("SpacingBetweenSlices", 0) or 0)
        if sbs and np.max(np.abs(steps - sbs)) > 1e-3:
            problems["SpacingBetweenSlices differs from the IPP steps"] += 1
        for d in imgs:
            src = by_sop.get(sorted(_refs(d))[0]) if _refs(d) else None
            if src is None:
                continue
            if "ImageOrientationPatient" in src and np.max(np.abs(
                    np.array([float(v) for v in d.ImageOrientationPatient]) -
                    np.array([float(v) for v in src.ImageOrientationPatient]))) > 1e-4:
                problems["IOP differs from its source slice"] += 1
            if "PixelSpacing" in src and [float(v) for v in d.PixelSpacing] != \
                    [float(v) for v in src.PixelSpacing]:
                problems["PixelSpacing differs from its source slice"] += 1
            if "SliceThickness" not in d or d.SliceThickness in (None, ""):
                problems["no SliceThickness"] += 1
    return {"objects": len(outputs), "by_class": dict(by_class), "problems": dict(problems),
            "dciodvfy_errors": errors, "warning_kinds": dict(warn_kinds)}


def check_pm(out_dir: Path) -> dict[str, Any]:
    """Every Parametric Map in ``out_dir`` read back by highdicom: RWVM, units, frame geometry."""
    import highdicom as hd
    import numpy as np

    found: dict[str, Any] = {"maps": 0, "problems": []}
    for p in sorted(out_dir.rglob("PM*.dcm")):
        found["maps"] += 1
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(p))
        shared = pm.SharedFunctionalGroupsSequence[0]
        rwvm = (shared.get("RealWorldValueMappingSequence")
                or pm.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence)[0]
        units = rwvm.MeasurementUnitsCodeSequence[0]
        arr = pm.pixel_array
        if arr.dtype.kind != "f":
            found["problems"].append(f"{p.name}: frames {arr.dtype}")
        if int(pm.NumberOfFrames) != len(pm.PerFrameFunctionalGroupsSequence):
            found["problems"].append(f"{p.name}: frames / per-frame groups")
        ipp = np.array([[float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]
                        for g in pm.PerFrameFunctionalGroupsSequence])
        found.setdefault("units", set()).add(f"{units.CodeValue} ({units.CodingSchemeDesignator})")
        found.setdefault("frames", []).append(int(pm.NumberOfFrames))
        if len(ipp) > 1 and not np.all(np.isfinite(ipp)):
            found["problems"].append(f"{p.name}: IPP not finite")
    found["units"] = sorted(found.get("units", set()))
    return found


def sweep(names: list[str], work: Path, sigma: bool) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in names:
        src = SHARED / name
        out = work / "cubic" / name
        rc = _process(src, out, "cubic")
        chk = check_folders(src, out)
        row: dict[str, Any] = {"process_rc": rc, "check_ok": chk.ok, "derived_series": len(chk.volumes),
                               "check_lines": chk.lines()}
        row.update(check_objects(src, out))
        if sigma:
            from tests.support import engines as test_engines

            process_cmd.EngineCache = test_engines.sigma_engines  # type: ignore[misc,assignment]
            sout = work / "sigma" / name
            _process(src, sout, test_engines.SIGMA_TEST_ENGINE, "both")
            row["sigma_check_ok"] = check_folders(src, sout).ok
            row["sigma_objects"] = check_objects(src, sout)
            row["pm"] = check_pm(sout)
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "check_lines"}, default=str), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--sigma", action="store_true")
    ap.add_argument("--orthanc", action="store_true", help="only the delivery paths, on an earlier --sigma sweep")
    ap.add_argument("--sample", type=int, default=60)
    args = ap.parse_args()
    names = args.only or sorted(d.name for d in SHARED.iterdir() if d.is_dir() and d.name != "licenses")
    if args.orthanc:
        rows = orthanc_paths(args.out, [n for n in names if (args.out / "sigma" / n).is_dir()], args.sample)
        (args.out / "orthanc.json").write_text(json.dumps(rows, indent=1, default=str))
        return 0
    rows = sweep(names, args.out, args.sigma)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0



def orthanc_paths(work: Path, names: list[str], sample: int) -> dict[str, Any]:
    """The ``--sigma`` outputs of ``names`` through C-STORE, STOW-RS and Orthanc REST into a real Orthanc 1.10.1
    (DICOMweb plugin), each read back by REST file download and compared (tests/send/test_delivery_paths_keep_
    objects.py's ``differences``); series of more than ``sample`` objects: every k-th derived slice + every map."""
    sys.path[:0] = [str(ROOT / "tests")]
    import httpx

    from node.config import DicomDestination, DicomwebDestination, OrthancDestination
    from node.send import make_sender
    from tests.send.test_delivery_paths_keep_objects import differences

    def _held(o: Any, sop_uid: str) -> bytes:  # a map of 279 512² float frames is 292 MB: a long read timeout
        with httpx.Client(base_url=o.url, timeout=600, auth=o.auth) as c:
            found = [x for x in c.post("/tools/lookup", content=sop_uid).json() if x["Type"] == "Instance"]
            assert found, f"instance {sop_uid} not in Orthanc"
            return c.get(f"/instances/{found[0]['ID']}/file").content
    from tests.support.pacs import orthanc_dicomweb

    o = orthanc_dicomweb(work / "orthanc")
    dests = {"dicom": DicomDestination(name="pacs", ae_title=o.aet, host="127.0.0.1", port=o.dicom_port),
             "dicomweb": DicomwebDestination(name="web", url=f"{o.url}/dicom-web"),
             "orthanc": OrthancDestination(name="rest", url=o.url)}
    rows: dict[str, Any] = {}
    try:
        for name in names:
            objs = [p for p, _ in _read_dir(work / "sigma" / name)]
            if len(objs) > sample:
                step = max(1, len(objs) // sample)
                objs = sorted(set(objs[::step]) | {p for p in objs if not p.name.startswith("IM")})
            for path, dest in dests.items():
                o.clear()
                make_sender(dest).send(objs)
                diffs: collections.Counter[str] = collections.Counter()
                same_bytes = 0
                for p in objs:
                    ds = pydicom.dcmread(p, stop_before_pixels=True)
                    held = _held(o, str(ds.SOPInstanceUID))
                    same_bytes += held == p.read_bytes()
                    for d in differences(p, held):
                        diffs[f"{ds.SOPClassUID.name}: {d}"] += 1
                rows[f"{name} {path}"] = {"sent": len(objs), "byte_identical": same_bytes, "differences": dict(diffs)}
                print(name, path, json.dumps(rows[f"{name} {path}"]), flush=True)
    finally:
        o.stop()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
