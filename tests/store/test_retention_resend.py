"""Retention attacks (break18b): what a prune leaves must never let a later, partial resend retire complete results."""

from __future__ import annotations

from pathlib import Path

from node.app.dashboard_data import preview_png
from node.store import Index, Spool
from tests.support.hostile import dump, series
from tests.support.nodeproc import NodeProc, dcm_files, delivered
from tests.support.peers import storescu, wait_until

RETENTION = {"node": {"retention_days": 2e-5}}  # 1.7 s


def test_a_partial_resend_of_a_pruned_series_does_not_retire_its_complete_results(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 61, 4)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(delivered(), what="first delivery")
        first = jobs[0]
        # the dashboard's preview of the job (the patient's pixels, in the job's outbox folder)
        job = Index(node.spool / "index.sqlite").job(first["id"])
        png = preview_png(Spool(node.spool), Index(node.spool / "index.sqlite"), job)
        assert png is not None and png.is_file()
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the retention to pass and the prune")
        # a replay / retry of the pruned job says why it cannot (before: "its rule is not configured (any more), or
        # its series has no instance in the spool", the rule being configured)
        r = node.cli("replay", str(first["id"]))
        assert r.returncode == 1 and "removed from the spool by the retention" in r.stderr, (r.stdout, r.stderr)
        assert not png.exists()  # before: kept, the pixels the prune says it removed
        out = tmp_path / "node" / "out"
        before = dcm_files(out)
        # a modality / PACS forwards 2 of the 4 instances again (a re-send of part of the series)
        assert storescu(files[:2], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) >= 2 and all(j["state"] not in ("queued", "processing", "sending")
                                                               for j in js), what="the resend settled")
        later = [j for j in jobs if j["id"] != first["id"]]
        # before: job 2 processed the 2 instances alone and its rejection note retired the complete 4-slice
        # results in the PACS (report rejection_notes {"out": "sent"}), replaced by a 2-slice series
        assert [j["state"] for j in later] == ["ignored"], dump(jobs)
        assert "made from 4 instance(s); 2 of them were sent again" in later[0]["reason"], dump(jobs)
        assert not (later[0].get("report") or {}).get("rejection_notes"), dump(jobs)
        assert dcm_files(out) == before  # nothing sent: neither a note nor a partial series

        # the rest of the series arrives too: the whole series is processed again, the same UIDs (no note)
        assert storescu(files[2:], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) >= 3 and all(j["state"] not in ("queued", "processing", "sending")
                                                               for j in js), what="the whole resend settled")
        last = max(jobs, key=lambda j: j["id"])
        assert last["state"] == "delivered" and last["instances"] == 4, dump(jobs)
        assert last["derived_series"] == first["derived_series"], dump(jobs)
        assert not (last.get("report") or {}).get("rejection_notes"), dump(jobs)
    finally:
        node.stop()


def test_results_a_killed_prune_left_unstripped_are_stripped_by_the_next_run(tmp_path: Path) -> None:
    """break18b: the prune marks the series pruned (one transaction) and strips the results after; a kill -9 (or a
    file it could not rewrite) between left the results' pixels for good: the next run looked only at series not
    yet pruned ("pruned 0 series"), though the module said it would strip them. Now a pruned job's report says
    when its results were all stripped, and the next run strips those it does not say it of."""
    import json
    import sqlite3

    files = series(tmp_path / "ct", 62, 3)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files, node.port).returncode == 0
        job = node.wait_jobs(delivered(), what="delivery")[0]["id"]
        results = dcm_files(node.spool / "outbox" / f"job-{job}")
        full = {p: p.read_bytes() for p in results}
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the retention to pass and the prune")
        assert all(p.stat().st_size < len(full[p]) for p in results)
        # the state a kill -9 after the prune's transaction, before its strips, leaves: the report says pruned (and
        # not stripped), the results are whole
        with sqlite3.connect(node.spool / "index.sqlite") as db:
            report = json.loads(db.execute("SELECT report FROM jobs WHERE id = ?", (job,)).fetchone()[0])
            report.pop("stripped", None)
            db.execute("UPDATE jobs SET report = ? WHERE id = ?", (json.dumps(report), job))
        for p, data in full.items():
            p.write_bytes(data)
        r = node.cli("prune")
        assert r.returncode == 0, r.stderr
        assert all(p.stat().st_size < len(full[p]) for p in results), r.stdout  # before: "pruned 0 series", whole
        assert f"series {node.jobs()[0]['series']}" in r.stdout and "derived file(s) stripped" in r.stdout, r.stdout
        assert "pruned 0 series" in node.cli("prune").stdout  # stripped once: not looked at again
    finally:
        node.stop()


def test_a_late_instance_after_a_prune_is_not_processed_without_the_pruned_ones(tmp_path: Path) -> None:
    """break18b: 2 instances of a series arriving after its first 4 were delivered and pruned were processed alone
    (a 2-slice derived series) and its rejection note retired the complete results. Now the job fails, its reason
    saying the pruned instances are missing and to send the whole series again; nothing is sent."""
    files = series(tmp_path / "ct", 63, 6)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files[:4], node.port).returncode == 0
        node.wait_jobs(delivered(), what="first delivery")
        wait_until(lambda: "pruned 1 series" in node.cli("prune").stdout, timeout=60, interval=0.5,
                   what="the retention to pass and the prune")
        out = tmp_path / "node" / "out"
        before = dcm_files(out)
        assert storescu(files[4:], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) >= 2 and all(j["state"] not in ("queued", "processing", "sending")
                                                               for j in js), what="the late instances settled")
        late = max(jobs, key=lambda j: j["id"])
        assert late["state"] == "failed", dump(jobs)
        assert "2 new instance(s) arrived since, but 4 of those are no longer in the spool" in late["reason"], late
        assert dcm_files(out) == before  # no 1-slice series, no rejection note
        # the whole series sent again: processed, all 6
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: max(js, key=lambda j: j["id"])["state"] == "delivered",
                              what="the whole series delivered")
        assert max(jobs, key=lambda j: j["id"])["instances"] == 6, dump(jobs)
    finally:
        node.stop()
