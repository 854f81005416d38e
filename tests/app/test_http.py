"""The node's HTTP API: probes, jobs listing, and Prometheus metrics that move as a job runs."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pydicom

from tests.support.pacs import api, phantom, start_node, wait_job
from tests.support.peers import free_port, storescu


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_probes_jobs_and_metrics(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    node = start_node(tmp_path / "node", {
        "destinations": [{"name": "out", "kind": "folder", "path": str(tmp_path / "node" / "out")},
                         {"name": "vna", "kind": "dicomweb", "url": down, "timeout_s": 2.0}]})
    try:
        with httpx.Client(base_url=node.http_url, timeout=60) as anon:
            assert anon.get("/healthz").json() == {"status": "ok"}
            ready = anon.get("/readyz")
            assert ready.status_code == 503  # a configured destination is unreachable: not ready, and why
            checks = ready.json()["checks"]
            assert checks["spool"] == "ok" and checks["engine:cubic"] == "ok"
            assert checks["destination:out"] == "ok"
            assert "vna" in checks["destination:vna"] and "not reachable" in checks["destination:vna"]
            assert anon.get("/jobs").status_code == 401
            before = anon.get("/metrics").text

        files = phantom(tmp_path, seed=71, slices=5)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        sent = storescu(files, node.port)
        assert sent.returncode == 0, sent.stderr
        job = wait_job(node, ref.SeriesInstanceUID)
        assert job["state"] == "delivered" and job["rule"] == "all-ct-mr" and job["reason"] == ""

        with api(node) as c:
            listed = c.get("/jobs", params={"series": ref.SeriesInstanceUID}).json()["jobs"]
            assert [j["id"] for j in listed] == [job["id"]]
            assert c.get("/jobs", params={"state": "failed"}).json()["jobs"] == []
            after = c.get("/metrics").text
        received = 'status="0x0000"'
        assert _metric(after, "srnode_instances_received_total", received) - \
            _metric(before, "srnode_instances_received_total", received) == 5
        assert _metric(after, "srnode_series_processed_total", 'outcome="processed"') == \
            _metric(before, "srnode_series_processed_total", 'outcome="processed"') + 1
        assert _metric(after, "srnode_job_seconds_count", 'stage="process"') >= 1
        assert _metric(after, "srnode_deliveries_total", 'destination="out",outcome="delivered"') >= 1
    finally:
        node.stop()
