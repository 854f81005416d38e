"""Long series (issue #15 item 5): ``srnode process`` (cubic, x2) of generated N-slice 64² CT series; seconds and
peak RSS per N, so that the growth with N shows (linear work: 5000 slices ~ 5x 1000 slices).

    python bench/long_series.py [--code DIR] [--label NAME] 1000 5000

``--code``: a folder holding another version's ``node`` and ``models`` (e.g. ``git archive <commit> node models``
unpacked) to measure that version the same way; default: this checkout. Writes
``bench/results/long-series-<label>-<UTC>.json`` with the command. Peak RSS from GNU ``/usr/bin/time -v``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.app.phantom import write_phantom_series  # noqa: E402
from node.bench.results import write_result  # noqa: E402

CONFIG = """[engine]
name = "cubic"
device = "cpu"

[[destinations]]
name = "local"
kind = "folder"
path = "{out}"

[[rules]]
name = "all"
match = {{ Modality = ".*" }}
through_plane_factor = 2
destinations = ["local"]
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slices", type=int, nargs="+")
    ap.add_argument("--code", default=str(ROOT), help="folder with the node and models packages to run")
    ap.add_argument("--label", default="this", help="name of the code version in the result file")
    ap.add_argument("--series-dir", default="", help="where the generated series are kept (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="srnode-long-"))
    series_root = Path(args.series_dir) if args.series_dir else work
    rows = []
    try:
        cfg = work / "config.toml"
        cfg.write_text(CONFIG.format(out=work / "unused"))
        for n in args.slices:
            src = series_root / f"s{n}"
            if not src.is_dir():
                write_phantom_series(src, slices=n, size=64, step_mm=0.5)
            out = work / f"out{n}"
            t = time.monotonic()
            run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "node.app.cli", "process", str(src),
                                  str(out), "--config", str(cfg), "--no-preview", "--quiet"], cwd=args.code,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": args.code})
            seconds = time.monotonic() - t
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
            written = len(list(out.rglob("*.dcm")))
            row = {"slices_in": n, "matrix": "64x64", "factor": 2, "exit": run.returncode, "wall_s": round(seconds, 1),
                   "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None, "files_written": written,
                   "load_average_after": os.getloadavg()}
            print(row, flush=True)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
        figures = {"code": args.label, "runs": rows, "cpu_count": os.cpu_count(),
                   "note": "2-core machine shared with other jobs; compare runs made at the same time"}
        print(write_result(f"long-series-{args.label}", figures,
                           command="python " + " ".join(["bench/long_series.py", *sys.argv[1:]])))
        return 0 if all(r["exit"] == 0 for r in rows) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
