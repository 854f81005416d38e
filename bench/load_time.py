"""The load alone (issue #15 item 5): ``node.series.load_volumes`` of one series by two code versions, turn about,
in fresh processes; seconds (wall and CPU), the load's own peak RSS and the pydicom Datasets alive after it.

    python bench/load_time.py --code-a OLD --code-b NEW [--label NAME] [--repeats 3] SERIES_DIR

``--code-a`` / ``--code-b``: folders holding a version's ``node`` and ``models`` (``git archive <commit> node
models`` unpacked; ``.`` for this checkout). The two versions run one after the other, ``--repeats`` times each,
alternating, so that both see the same machine load; the medians are compared. Writes
``bench/results/load-time-<label>-<UTC>.json`` with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.bench.results import write_result  # noqa: E402

# run in the measured version's process: load, then report (no import of this checkout)
PROBE = """
import gc, json, resource, sys, time
from pathlib import Path
from pydicom.dataset import Dataset
from node.series import load_volumes
paths = sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_file())
w, c = time.perf_counter(), time.process_time()
vols = load_volumes(paths)
w, c = time.perf_counter() - w, time.process_time() - c
gc.collect()
alive = sum(1 for o in gc.get_objects() if isinstance(o, Dataset))
print(json.dumps({"files": len(paths), "slices": sum(v.shape[0] for v in vols), "wall_s": round(w, 2),
                  "cpu_s": round(c, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                             / 1024, 1), "datasets_alive": alive}))
"""


def _once(code: str, series: Path) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-c", PROBE, str(series)], cwd=code, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(code).resolve())}, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", type=Path)
    ap.add_argument("--code-a", required=True)
    ap.add_argument("--code-b", required=True)
    ap.add_argument("--label", default="this")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for _ in range(args.repeats):
        for key, code in (("a", args.code_a), ("b", args.code_b)):
            row = _once(code, args.series)
            runs[key].append(row)
            print(key, row, flush=True)
    median = {k: {f: statistics.median(r[f] for r in rows) for f in ("wall_s", "cpu_s", "peak_rss_mb",
                                                                      "datasets_alive")}
              for k, rows in runs.items()}
    figures = {"series": str(args.series), "code_a": args.code_a, "code_b": args.code_b, "runs": runs,
               "median": median, "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(),
               "note": "2-core machine shared with other jobs; a and b alternate, compare within this run"}
    print(median)
    print(write_result(f"load-time-{args.label}", figures,
                       command="python " + " ".join(["bench/load_time.py", *sys.argv[1:]])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
