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


def test_integers_beyond_the_index_are_refused_not_a_server_error(tmp_path: Path) -> None:
    """break13p: ``POST /series/.../complete {"instances": 10**20}`` and a dashboard job id of 10**25 reached SQLite
    as they were: OverflowError, 500 with a traceback in the node's log. Now 400 (a declared size of 1 to
    MAX_DECLARED_INSTANCES) and 404 (no such job)."""
    from node.store import MAX_DECLARED_INSTANCES
    from tests.support.pacs import TOKEN

    node = start_node(tmp_path / "node", {})
    try:
        files = phantom(tmp_path, seed=72, slices=3)
        assert storescu(files, node.port).returncode == 0
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        url = f"/series/{ref.StudyInstanceUID}/{ref.SeriesInstanceUID}/complete"
        with api(node) as c:
            for n in (10**20, 2**63, MAX_DECLARED_INSTANCES + 1):
                r = c.post(url, json={"instances": n})
                assert r.status_code == 400 and "integer" in r.json()["error"], (n, r.status_code, r.text[:200])
            assert c.post(url, json={"instances": 3}).status_code == 200
        origin = {"Origin": node.http_url}
        with httpx.Client(base_url=node.http_url, timeout=30, follow_redirects=False) as c:
            assert c.post("/dashboard/login", data={"token": TOKEN}, headers=origin).status_code == 303
            big = 10**25
            assert c.get(f"/dashboard/jobs/{big}").status_code == 404
            assert c.get(f"/dashboard/jobs/{big}/preview.png").status_code == 404
            assert c.post(f"/dashboard/jobs/{big}/retry", data={"csrf": "x"}, headers=origin).status_code == 403
        assert "Traceback" not in node.log()
    finally:
        node.stop()


def test_a_page_of_jobs_is_read_as_a_page_and_bounded(tmp_path: Path) -> None:
    """hostile18: ``GET /jobs`` loaded every job of the index for any page (100,000 jobs with 1 KB reports: 2.5 s
    and +380 MB per request, whatever ``limit``), and ``?limit=0`` (``jobs[-0:]``) or ``?limit=10**9`` answered the
    whole history in one JSON; the dashboard's job list loaded it all too (3.3 s, +379 MB a page). Now the newest
    ``limit`` jobs (of ``?series=``, ``?state=``) and the counts per state are read by SQLite; ``limit`` out of
    1..10000 is 400 naming the range."""
    import json
    import time

    from node.store import Index

    (tmp_path / "node" / "spool").mkdir(parents=True)
    ix = Index(tmp_path / "node" / "spool" / "index.sqlite")
    with ix.tx() as c:
        for i in range(3000):
            c.execute("INSERT INTO jobs (series_uid, study_uid, rule, state, reason, n_instances, created, updated,"
                      " report) VALUES (?, '1.2', 'all-ct-mr', 'delivered', '', 4, ?, ?, ?)",
                      (f"1.2.{i}", time.time(), time.time(), json.dumps({"notes": ["x" * 100]})))
    ix.close()
    node = start_node(tmp_path / "node", {})
    try:
        with api(node) as c:
            for bad in ("0", "-5", str(10**9), "10001"):
                r = c.get("/jobs", params={"limit": bad})
                assert r.status_code == 400 and "from 1 to 10000" in r.json()["error"], (bad, r.text[:200])
            newest = c.get("/jobs", params={"limit": "2"}).json()["jobs"]
            assert [j["series_uid"] for j in newest] == ["1.2.2998", "1.2.2999"], newest
            assert len(c.get("/jobs").json()["jobs"]) == 500
            old = c.get("/jobs", params={"series": "1.2.7", "limit": "1"}).json()["jobs"]
            assert [j["series_uid"] for j in old] == ["1.2.7"], old
            assert c.get("/jobs", params={"state": "failed", "limit": "5"}).json()["jobs"] == []
        from tests.support.pacs import TOKEN  # the dashboard's job list: a page and counts, read the same way

        origin = {"Origin": node.http_url}
        with httpx.Client(base_url=node.http_url, timeout=30, follow_redirects=False) as c:
            assert c.post("/dashboard/login", data={"token": TOKEN}, headers=origin).status_code == 303
            page = c.get("/dashboard")
            assert page.status_code == 200 and "3000" in page.text, page.text[:500]
        assert "Traceback" not in node.log()
    finally:
        node.stop()
