"""Are two code versions' outputs the same? ``srnode process`` of one input by two versions (``--code`` folders
holding ``node`` and ``models``), then every output file compared: same relative paths, same SOPInstanceUID, same
PixelData / FloatPixelData bytes, and every other element equal (recursively, sequences included) except the
run's date and time (elements of VR DA, TM, DT) and the Parametric Map's DimensionOrganizationUID (highdicom
draws a random one per map). Prints one line per differing element (at most 20) and a summary;
exit 0 when all are the same.

    python bench/same_outputs.py --code-a /path/old --code-b . [--config cfg.toml] IN_DIR

(issue #15 item 5: memory work must never change an output.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

SKIP_VR = {"DA", "TM", "DT"}
# highdicom draws a new DimensionOrganizationUID (a random UID) for every Parametric Map it builds
SKIP_KEYWORDS = {"DimensionOrganizationUID"}


def _diff(a: Dataset, b: Dataset, where: str, out: list[str]) -> None:
    tags = sorted(set(a.keys()) | set(b.keys()))
    for t in tags:
        ea, eb = a.get(t), b.get(t)
        name = f"{where}{(ea or eb).keyword or t}"  # type: ignore[union-attr]
        if ea is None or eb is None:
            out.append(f"{name}: only in {'b' if ea is None else 'a'}")
            continue
        if (ea.VR in SKIP_VR and eb.VR in SKIP_VR) or ea.keyword in SKIP_KEYWORDS:
            continue
        if ea.VR == "SQ" and eb.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{name}: {len(ea.value)} vs {len(eb.value)} items")
                continue
            for k, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=True)):
                _diff(ia, ib, f"{name}[{k}].", out)
            continue
        if ea.VR != eb.VR or ea.value != eb.value:
            out.append(f"{name}: differs")


def compare(dir_a: Path, dir_b: Path) -> tuple[int, list[str]]:
    """(files compared, differences) between the .dcm files under the two folders (by relative path)."""
    fa = {p.relative_to(dir_a) for p in dir_a.rglob("*.dcm")}
    fb = {p.relative_to(dir_b) for p in dir_b.rglob("*.dcm")}
    out = [f"{p}: only in a" for p in sorted(fa - fb)] + [f"{p}: only in b" for p in sorted(fb - fa)]
    for rel in sorted(fa & fb):
        a, b = pydicom.dcmread(dir_a / rel), pydicom.dcmread(dir_b / rel)
        diffs: list[str] = []
        _diff(a.file_meta, b.file_meta, "meta.", diffs)
        _diff(a, b, "", diffs)
        out += [f"{rel}: {d}" for d in diffs]
    return len(fa & fb), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("in_dir", type=Path)
    ap.add_argument("--code-a", required=True)
    ap.add_argument("--code-b", required=True)
    ap.add_argument("--config", default="")
    ap.add_argument("--engine", default="")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="srnode-same-"))
    outs = []
    for label, code in (("a", args.code_a), ("b", args.code_b)):
        out = work / label
        cmd = [sys.executable, "-m", "node.app.cli", "process", str(args.in_dir.resolve()), str(out), "--no-preview",
               "--quiet"] + (["--config", str(Path(args.config).resolve())] if args.config else []) \
            + (["--engine", args.engine] if args.engine else [])
        run = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(Path(code).resolve())},
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{label}: exit {run.returncode}: {run.stderr.strip()[-2000:]}")
            return 2
        outs.append(out)
    n, diffs = compare(outs[0], outs[1])
    for d in diffs[:20]:
        print(d)
    print(f"{n} files compared, {len(diffs)} differences (date/time elements skipped); outputs in {work}")
    return 0 if n and not diffs else 1


if __name__ == "__main__":
    raise SystemExit(main())
