"""Retention attacks (break18b): what a prune leaves must never let a later, partial resend retire complete results."""

from __future__ import annotations

from pathlib import Path

from node.app.dashboard_data import preview_png
from node.store import Index, Spool
from tests.support.hostile import dump, series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

RETENTION = {"node": {"retention_days": 2e-5}}  # 1.7 s


def _dcm(folder: Path) -> list[Path]:
    return sorted(folder.glob("**/*.dcm"))


def test_a_partial_resend_of_a_pruned_series_does_not_retire_its_complete_results(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 61, 4)
    node = NodeProc.start(tmp_path / "node", RETENTION)
    try:
        assert storescu(files, node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: [j for j in js if j["state"] == "delivered"], what="first delivery")
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
        before = _dcm(out)
        # a modality / PACS forwards 2 of the 4 instances again (a re-send of part of the series)
        assert storescu(files[:2], node.port).returncode == 0
        jobs = node.wait_jobs(lambda js: len(js) >= 2 and all(j["state"] not in ("queued", "processing", "sending")
                                                               for j in js), what="the resend settled")
        later = [j for j in jobs if j["id"] != first["id"]]
        # before: job 2 processed the 2 instances alone and its rejection note retired the complete 4-slice
        # results in the PACS (report rejection_notes {"out": "sent"}), replaced by a 2-slice series
        assert [j["state"] for j in later] == ["ignored"], dump(jobs)
        assert "a resend of 2 of the 4 instance(s)" in later[0]["reason"], dump(jobs)
        assert not (later[0].get("report") or {}).get("rejection_notes"), dump(jobs)
        assert _dcm(out) == before  # nothing sent: neither a note nor a partial series

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
