"""Retention (issue retain18): the spool was never cleaned -- received instances and delivered results stayed for
good (84 MB and 34 MB after two jobs) until the disk reached ``min_free_mb`` and C-STORE answered 0xA700.

Now ``[node] retention_days`` after a series' jobs ended with every delivery delivered, ``srnode prune`` (and the
serving node, hourly) removes its received instances and strips its results to their headers; the series is
marked 'pruned' and a resend is processed as new. Against the real node: storescu → node → folder destination.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom import dcmread

from node.store import Index, Spool, prune
from tests.support.hostile import dump, series
from tests.support.nodeproc import NodeProc, dcm_files, delivered
from tests.support.peers import free_port, storescu, wait_until

RETENTION = {"node": {"retention_days": 2e-5}}  # 1.7 s


def test_prune_dry_run_then_prune_frees_a_delivered_series_and_a_resend_is_new(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 51, 4)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(delivered(), what="first delivery")
        job = jobs[0]["id"]
        received = dcm_files(node.spool / "instances")
        results = dcm_files(node.spool / "outbox" / f"job-{job}")
        sent = dcm_files(tmp_path / "node" / "out")
        assert len(received) == 4 and results and sent, (received, results, sent)
        sizes = {p: p.stat().st_size for p in results}

        # dry run: says what it would free (once the retention passed), changes nothing
        def dry() -> str | None:
            r = node.cli("prune", "--dry-run")
            assert r.returncode == 0, r.stderr
            return r.stdout if "would prune 1 series" in r.stdout else None
        out = wait_until(dry, timeout=60, interval=0.5, what="the retention to pass")
        assert f"series {jobs[0]['series']}" in out and "would free" in out, out
        assert "4 instance file(s)" in out, out
        assert dcm_files(node.spool / "instances") == received
        assert {p: p.stat().st_size for p in results} == sizes
        assert node.status_cli()[0].get("report", {}).get("pruned") is None

        kept = {p: p.read_bytes() for p in received}
        r = node.cli("prune")
        assert r.returncode == 0, r.stderr
        assert "pruned 1 series" in r.stdout and "freed" in r.stdout, r.stdout
        assert dcm_files(node.spool / "instances") == []
        for p in results:  # headers kept (a later rejection note reads them), pixels gone
            ds = dcmread(p)
            assert "PixelData" not in ds and ds.SOPInstanceUID and ds.SeriesInstanceUID
            assert p.stat().st_size < sizes[p]
        assert dcm_files(tmp_path / "node" / "out") == sent  # the destination's copy is not ours to touch
        r = node.cli("status", "--json", "--limit", "0")
        assert '"state": "pruned"' in r.stdout, r.stdout
        assert "PRUNED at" in node.cli("status").stdout
        again = node.cli("prune")
        assert "pruned 0 series" in again.stdout, again.stdout

        # a kill -9 between the prune's index transaction and its removals leaves the files: the next start removes
        # them (not re-indexed as a new series, never processed again by themselves)
        node.stop()
        for p, data in kept.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        node._index = None
        node.launch()
        assert "removed 4 instance file(s) left by an interrupted prune" in node.log().split("===== start")[-1]
        assert dcm_files(node.spool / "instances") == []
        assert [j["id"] for j in node.jobs()] == [job]

        # a resend of the series is received as new and processed again
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(delivered(2), what="the resent series delivered")
        assert [j["instances"] for j in jobs if j["id"] != job] == [4], dump(jobs)
        assert len(dcm_files(node.spool / "instances")) == 4
        # the same instances make the same derived series (deterministic UIDs): no rejection note retires it
        assert {j["derived_series"] for j in jobs} == {jobs[0]["derived_series"]}, dump(jobs)
        assert not [p for p in dcm_files(tmp_path / "node" / "out") if p.name.startswith("KO-")]
    finally:
        node.stop()


def test_prune_keeps_a_series_whose_delivery_is_not_delivered(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 52, 3)
    sections = {**RETENTION, "outbox": {"max_attempts": 1, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
                "destinations": [{"name": "out", "kind": "dicom", "host": "127.0.0.1", "port": free_port(),
                                  "ae_title": "NOBODY"}]}
    node = NodeProc.start(tmp_path / "node", sections)
    try:
        assert storescu(files, node.port).returncode == 0
        node.wait_jobs(lambda js: js and js[0]["deliveries"]
                       and js[0]["deliveries"][0]["state"] == "dead-letter", what="a dead-letter delivery")
        index = Index(node.spool / "index.sqlite")
        result = prune(Spool(node.spool), index, 2e-5, now=1e12)  # long after any retention
        assert result.series == [], result
        assert len(dcm_files(node.spool / "instances")) == 3
        out = node.cli("prune").stdout
        assert out.startswith("pruned 0 series"), out
    finally:
        node.stop()


def test_serving_node_prunes_by_itself(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 53, 3)
    node = NodeProc.start(tmp_path / "node", {"node": {"retention_days": 2e-5, "prune_interval_s": 0.5}})
    try:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(delivered(), what="delivery")
        wait_until(lambda: not dcm_files(node.spool / "instances") and "prune: series" in node.log(), timeout=60,
                   what="the node's own prune")
        assert f"prune: series {jobs[0]['series']}" in node.log()
        assert node.cli("status", "--json").stdout.count('"state": "pruned"') == 1
        assert dcm_files(tmp_path / "node" / "out")  # what was delivered stays delivered
    finally:
        node.stop()


def test_a_pruned_job_says_so_and_is_neither_replayed_nor_previewed(tmp_path: Path) -> None:
    """A new user's look at a pruned job: its dashboard page said nothing of the prune, showed a broken preview
    (made again from results that are headers now: "no pixel data"), offered Replay; `srnode replay` refused with
    "its rule is not configured (any more), or its series has no instance in the spool" though the rule was."""
    files = series(tmp_path / "ct", 54, 4)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files, node.port).returncode == 0
        job = node.wait_jobs(delivered(), what="delivery")[0]["id"]
        page_url = f"{node.http_url}/dashboard/jobs/{job}"
        assert httpx.get(f"{page_url}/preview.png", timeout=60).status_code == 200
        preview = node.spool / "outbox" / f"job-{job}" / "preview.png"
        assert preview.is_file()
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the prune")
        assert not preview.exists()  # the patient's pixels too: removed with the results' pixels
        page = httpx.get(page_url, timeout=30).text
        assert 'id="pruned"' in page and "retention" in page, page
        assert 'id="replay"' not in page and 'id="preview"' not in page, page
        assert httpx.get(f"{page_url}/preview.png", timeout=30).status_code == 404
        r = node.cli("replay", str(job))
        assert r.returncode == 1 and "removed from the spool by the retention" in r.stderr, r
    finally:
        node.stop()
