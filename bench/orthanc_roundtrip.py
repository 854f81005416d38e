"""Benchmark: time from an Orthanc upload to the derived series visible in the same Orthanc study.

Real peers only: Orthanc 1.10 with its DICOMweb and Python plugins and orthanc/plugin.py (SrNode section), and
the real node (``python -m node.app.cli serve``) whose destination is that Orthanc (kind "orthanc", REST). The series
is uploaded over Orthanc's REST API; nothing else is done: the plugin sends the stable series to the node, the
node sends the derived + uncertainty series back, the plugin marks the original ``srnode-done``.

    python bench/orthanc_roundtrip.py --engine cubic
    python bench/orthanc_roundtrip.py --engine selfsup --fast

The wall time includes Orthanc's StableAge and the node's stable_age_s (both printed; 2 s and 1 s here).
Figures go to bench/results/orthanc_roundtrip-<UTC>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from peers import ORTHANC_PLUGINS, Orthanc, free_port, start_orthanc, wait_until  # noqa: E402

from node.bench.command import write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
STABLE_AGE_ORTHANC = 2
STABLE_AGE_NODE = 1.0


def start_orthanc_with_srnode(workdir: Path, node_port: int, node_http: str, token: str = "") -> Orthanc:
    """Orthanc with DICOMweb + Python plugins and orthanc/plugin.py routing every CT/MR series to the node."""
    return start_orthanc(
        workdir,
        plugins=[ORTHANC_PLUGINS / "libOrthancDicomWeb.so", ORTHANC_PLUGINS / "libOrthancPython.so"],
        extra={
            "PythonScript": str(ROOT / "orthanc" / "plugin.py"),
            "UserMetadata": {"SrNodeState": 4242, "SrNodeReason": 4243},
            "StableAge": STABLE_AGE_ORTHANC,
            "SrNode": {"AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT", "MR"],
                       "HttpUrl": node_http, "Token": token, "PollSeconds": 0.5},
        },
    )


def node_config(workdir: Path, node_port: int, http_port: int, orthanc_url: str, engine: str, fast: bool,
                factor: int) -> Path:
    cfg = f"""
[node]
ae_title = "SRNODE"
host = "127.0.0.1"
port = {node_port}
spool_dir = "{workdir / 'spool'}"
stable_age_s = {STABLE_AGE_NODE}
min_free_mb = 50

[engine]
name = "{engine}"
device = "cpu"
fast = {str(fast).lower()}

[http]
port = {http_port}

[[destinations]]
name = "orthanc"
kind = "orthanc"
url = "{orthanc_url}"

[[rules]]
name = "ct-mr"
match = {{ Modality = "^(CT|MR)$" }}
through_plane_factor = {factor}
destinations = ["orthanc"]
"""
    path = workdir / "config.toml"
    path.write_text(cfg)
    return path


def roundtrip(files: list[Path], engine: str, fast: bool, factor: int, workdir: Path) -> dict[str, Any]:
    node_port, http_port = free_port(), free_port()
    node_http = f"http://127.0.0.1:{http_port}"
    orthanc = start_orthanc_with_srnode(workdir / "orthanc", node_port, node_http)
    log = (workdir / "node.log").open("wb")
    cfg = node_config(workdir, node_port, http_port, orthanc.url, engine, fast, factor)
    node = subprocess.Popen([sys.executable, "-m", "node.app.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: httpx.get(f"{node_http}/healthz", timeout=2).status_code == 200, 120,
                   what="node /healthz")
        expected = (len(files) - 1) * factor + 1
        with orthanc.client() as c:
            t0 = time.monotonic()
            for f in files:
                c.post("/instances", content=f.read_bytes()).raise_for_status()
            t_upload = time.monotonic() - t0
            series_id = c.get("/series").json()[0]
            study = c.get(f"/series/{series_id}").json()["ParentStudy"]

            def derived() -> bool:
                counts = [len(s["Instances"]) for s in c.get(f"/studies/{study}/series").json()
                          if s["ID"] != series_id]
                return counts.count(expected) >= 2  # derived and uncertainty series both complete

            wait_until(derived, 3600, interval=0.5, what="derived + uncertainty series in the same study")
            t_visible = time.monotonic() - t0
            wait_until(lambda: c.get(f"/series/{series_id}/metadata/SrNodeState").text == "srnode-done", 600,
                       interval=0.5, what="original marked srnode-done")
            t_marked = time.monotonic() - t0
            jobs = httpx.get(f"{node_http}/jobs").json()["jobs"]
        return {"slices_in": len(files), "slices_out": expected, "engine": engine, "fast": fast,
                "factor": factor, "upload_s": round(t_upload, 2), "upload_to_derived_visible_s": round(t_visible, 2),
                "upload_to_marked_done_s": round(t_marked, 2), "orthanc_stable_age_s": STABLE_AGE_ORTHANC,
                "node_stable_age_s": STABLE_AGE_NODE,
                "job": {k: jobs[-1].get(k) for k in ("state", "engine", "fallback")} if jobs else {}}
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        orthanc.stop()
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="cubic")
    p.add_argument("--fast", action="store_true", help="[engine].fast (selfsup fast mode)")
    p.add_argument("--series", default="ct_head_phantom_philips_1mm", help="folder of ../shared/data")
    p.add_argument("--factor", type=int, default=2)
    args = p.parse_args()
    src = SHARED / args.series
    files = sorted(src.glob("*.dcm"))
    if not files:
        print(f"no series at {src}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="srnode-bench-") as tmp:
        figures = roundtrip(files, args.engine, args.fast, args.factor, Path(tmp))
    figures["series"] = args.series
    out = write_result("orthanc_roundtrip", figures, command="python " + " ".join(sys.argv))
    print(json.dumps(figures, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
