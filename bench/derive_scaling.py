"""Issue #15 item 5: ``derive_series`` alone on a generated N-slice 8x8 CT series (x2), under cProfile: CPU seconds and
the cumulative (profiled, wall) seconds of ``derived_uid``. ``PYTHONPATH=<code> python bench/derive_scaling.py
[--label NAME] N...`` measures the code version in <code>; writes ``bench/results/derive-scaling-<label>-<UTC>.json``.
"""
from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

from models.cubic import CubicEngine
from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.bench.results import write_result
from node.config import DeriveConfig
from node.derived import derive_series
from node.series import load_series

args = sys.argv[1:]
label = "this"
if args and args[0] == "--label":
    label, args = args[1], args[2:]
out = {}
for n in map(int, args):
    d = Path(f"/tmp/srnode-derive-scaling/s{n}")
    files = sorted(d.glob("*.dcm")) if d.is_dir() else write_phantom_series(d, slices=n, size=8, step_mm=0.5)
    vol = load_series(files)
    f = Factors(2, 1)
    res = CubicEngine().upscale(vol.to_engine_input(), f)
    pr = cProfile.Profile()
    t = time.process_time()
    pr.enable()
    objs = derive_series(vol, res, f, DeriveConfig(), CubicEngine.version)
    pr.disable()
    cpu = time.process_time() - t
    st = pstats.Stats(pr)
    uid_cum = next((v[3] for k, v in st.stats.items() if k[2] == "derived_uid"), 0.0)
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(8)
    out[n] = {"cpu_s": round(cpu, 2), "objects": len(objs.derived) + len(objs.uncertainty),
              "derived_uid_cum_s_profiled": round(uid_cum, 2)}
    print(n, out[n], flush=True)
    print(s.getvalue()[-2500:], file=sys.stderr)
print(json.dumps(out))

print(write_result(f"derive-scaling-{label}", {"runs": out, "matrix": "8x8", "factor": 2,
                                                "note": "2-core machine shared with other jobs"},
                   command="PYTHONPATH=<code> python " + " ".join(["bench/derive_scaling.py", *sys.argv[1:]])))
