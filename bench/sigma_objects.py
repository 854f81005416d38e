"""Time and size of the sigma objects for a 512 x 512 x 281 derived CT (a 141-slice 512² phantom, x2 cubic, a
random |N(0, 5)| + 1 HU sigma): ``parametric_map`` / ``secondary_capture`` (this code), ``old`` (one 16-bit SC per
derived slice; runs only on a checkout before the Parametric Map, e.g. 6df0fbe, with PYTHONPATH pointing at it).

    PYTHONPATH=. python bench/sigma_objects.py parametric_map     # prints one JSON line
"""
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from models.cubic import CubicEngine
from models.engine import Factors
from node.app.phantom import write_phantom_series
from node.config import DeriveConfig
from node.derived import derive_series
from node.derived.modules import contributing_equipment
from node.process import write_atomic
from node.series import load_series

which = sys.argv[1]
work = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/sigma-bench")
src = work / "src"
if not src.exists():
    write_phantom_series(src, slices=141, size=512, step_mm=2.0)
vol = load_series(sorted(src.glob("*.dcm")))
f = Factors(2, 1)
res = CubicEngine().upscale(vol.to_engine_input(), f)
rng = np.random.default_rng(0)
sigma = (np.abs(rng.normal(0, 5, res.data.shape)) + 1).astype(np.float32)
eq = contributing_equipment("selfsup", "1", "", dt.datetime.now())
out_dir = work / f"out-{which}"
shutil.rmtree(out_dir, ignore_errors=True)
if which == "old":
    from node.derived.uncertainty import uncertainty_series  # type: ignore[attr-defined]
    cfg = DeriveConfig(uncertainty=False)
    objs = derive_series(vol, res, f, cfg, "1")
    t = time.perf_counter()
    sc = uncertainty_series(objs.derived, sigma, vol, "1.2.3.4", cfg, f, "selfsup", eq, description="x sigma")
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    for k, ds in enumerate(sc):
        write_atomic(ds, out_dir / f"SC{k+1:05d}.dcm")
    t_write = time.perf_counter() - t
else:
    from node.config import UncertaintyObject
    from node.derived.uncertainty import SigmaSeries, uncertainty_objects
    cfg = DeriveConfig(uncertainty=UncertaintyObject.NONE)
    objs = derive_series(vol, res, f, cfg, "1")
    kind = UncertaintyObject(which)
    t = time.perf_counter()
    sc = uncertainty_objects(objs.derived, sigma, "CT", kind, "selfsup", eq,
                             parametric_map=SigmaSeries("1.2.3.4", "1.2.3.4.1", 2, "x sigma"),
                             card=SigmaSeries("1.2.3.5", "1.2.3.5.1", 3, "x sigma card"))
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    for k, ds in enumerate(sc):
        write_atomic(ds, out_dir / f"U{k+1:05d}.dcm")
    t_write = time.perf_counter() - t
files = sorted(out_dir.glob("*.dcm"))
doc = {"which": which, "derived_shape": list(res.data.shape), "instances": len(files),
       "bytes": sum(p.stat().st_size for p in files), "build_s": round(t_build, 2), "write_s": round(t_write, 2)}
print(json.dumps(doc))
