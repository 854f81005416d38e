"""When is a series complete, against the real node: a series whose sender declares its size (the HTTP hint)
starts once that many instances are in, without the quiet period; ImagesInAcquisition (one acquisition's count)
is recorded but waits for the quiet period (series14); a
wrong declaration (fewer sent, more sent) falls back to the quiet period; plain duplicates resent after a kill -9
count as activity, so one job runs, on the whole series.

Times are never asserted as durations: each test proves from the index which rule made the job (a job created
less than ``stable_age_s`` after the series' last instance cannot come from the quiet period; one created later
than that did).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from node.store import HEADER_DECLARED, Index, Job
from tests.jobs.test_faults import Scanner
from tests.support.fixtures import shared_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

TOKEN = "test-token-complete"
DONE = ("delivered", "failed", "dead-letter", "ignored", "superseded")


def declaring(out: Path, seed: int, slices: int, images: int) -> list[Path]:
    """A phantom CT series of ``slices`` instances, each declaring ImagesInAcquisition = ``images``."""
    files = write_phantom_series(out, slices=slices, size=32, step_mm=3.0, seed=seed)
    for f in files:
        ds = dcmread(f)
        ds.ImagesInAcquisition = images
        ds.save_as(f)
    return files


def uids(files: list[Path]) -> tuple[str, str]:
    ds = dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def job_and_series(node: NodeProc, files: list[Path]) -> tuple[Job, dict[str, Any]]:
    """The series' latest job and its series row, read from the index."""
    study, series = uids(files)
    ix = Index(node.spool / "index.sqlite")
    try:
        row = ix.series(series, study)
        assert row is not None and row["job_id"] is not None, row
        return ix.job(int(row["job_id"])), row
    finally:
        ix.close()


def all_done(n: int) -> Any:
    return lambda js: len(js) == n and all(j["state"] in DONE for j in js)


def test_a_series_whose_sender_declares_its_size_starts_without_the_quiet_period(tmp_path: Path) -> None:
    stable_age_s = 60.0
    by_hint = write_phantom_series(tmp_path / "b", slices=6, size=32, step_mm=3.0, seed=52)  # declares nothing
    sections = {"node": {"stable_age_s": stable_age_s}, "http": {"token": TOKEN}}
    with NodeProc.start(tmp_path / "node", sections) as node:
        for files in (by_hint,):
            r = storescu(files, node.port, aet=node.ae_title)
            assert r.returncode == 0, r.stdout + r.stderr
        study, series = uids(by_hint)
        url = f"/series/{study}/{series}/complete"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=node.http_url, timeout=30) as c:
            assert c.post(url, json={"instances": 6}).status_code == 401
            for bad in ({"instances": 0}, {"instances": "6"}, {"instances": True}, {"count": 6}, [6]):
                assert c.post(url, json=bad, headers=auth).status_code == 400, bad
            assert c.post(f"/series/{study}/1.2.3.4/complete", json={"instances": 6},
                          headers=auth).status_code == 404
            assert c.post(f"/series/{study}/x'y/complete", json={"instances": 6}, headers=auth).status_code == 400
            r = c.post(url, json={"instances": 6}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["received"] == 6 and r.json()["declared_instances"] == 6
        jobs = node.wait_jobs(all_done(1), timeout=120, what="the series processed")
        assert [j["state"] for j in jobs] == ["delivered"], json.dumps(jobs, indent=1)
        job, row = job_and_series(node, by_hint)
        assert (job.n_instances, row["declared_instances"], row["declared_by"]) == (6, 6, "http from 127.0.0.1")
        # made while the quiet period had provably not elapsed: by the declaration
        assert job.created - row["last_received"] < stable_age_s, (job.created, row)
        status = node.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        shown = {s["series"]: (s["instances"], s["declared_instances"], s["declared_by"])
                 for s in json.loads(status.stdout)["series"]}
        assert shown == {series: (6, 6, "http from 127.0.0.1")}
        assert "complete, 6 of 6 declared instance(s) (by http from 127.0.0.1)" in node.log()


def test_a_wrong_declared_size_waits_for_the_quiet_period(tmp_path: Path) -> None:
    stable_age_s = 4.0
    fewer = declaring(tmp_path / "fewer", seed=53, slices=6, images=8)  # 2 never come
    more = declaring(tmp_path / "more", seed=54, slices=6, images=5)  # one more than declared
    # the settle time is long enough that the 6th of `more` (sent on the same association) always lands within it
    sections = {"node": {"stable_age_s": stable_age_s, "declared_settle_s": 3.0}}
    with NodeProc.start(tmp_path / "node", sections) as node:
        for files in (fewer, more):
            r = storescu(files, node.port, aet=node.ae_title)
            assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(all_done(2), timeout=120, what="both series processed")
        assert [j["state"] for j in jobs] == ["delivered", "delivered"], json.dumps(jobs, indent=1)
        for files, declared in ((fewer, 8), (more, 5)):
            job, row = job_and_series(node, files)
            assert (job.n_instances, row["declared_instances"]) == (6, declared)
            # made only after stable_age_s without an instance: by the quiet period
            assert job.created - row["last_received"] >= stable_age_s, (job.created, row)
        assert f"more instances (6) than declared (5, by {HEADER_DECLARED})" in node.log()
        # the job made from fewer instances than the series declared says so (the derived series looks complete)
        status = node.cli("status")
        assert status.returncode == 0, status.stderr
        said = [ln for ln in status.stdout.splitlines() if "INCOMPLETE" in ln]
        assert said == ["       INCOMPLETE: made from 6 of the 8 instance(s) the series declares (ImagesInAcquisition); "
                        "2 never came (quiet for stable_age_s 4 s)"], status.stdout
        by_series = {j["series"]: j for j in json.loads(node.cli("status", "--json").stdout)["jobs"]}
        assert by_series[uids(fewer)[1]]["report"]["declared"] == {"instances": 8, "by": HEADER_DECLARED,
                                                                  "missing": 2}
        assert "declared" not in by_series[uids(more)[1]]["report"]
        decided = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()
                   if '"job-processed"' in ln]
        assert sorted(a.get("missing_declared", 0) for a in decided) == [0, 2], decided


def test_a_count_only_the_headers_declare_waits_for_the_quiet_period(tmp_path: Path) -> None:
    """series14: ImagesInAcquisition counts one acquisition, and a series may hold several (each declaring its own
    count; the first arriving alone held "its declared count" and completed early, a job on part of the series).
    A phantom declaring 8 on its 8 slices, a GE 3D T1 whose 130 slices each say ImagesInAcquisition 130 (as the
    scanner wrote them), and a Siemens enhanced field map (two objects of 33 frames: one per echo) given
    ImagesInAcquisition 66 on both (2 instances expected): the count is recorded (shown by ``srnode status``), the
    quiet period completes each."""
    stable_age_s = 4.0
    by_header = declaring(tmp_path / "a", seed=51, slices=8, images=8)
    ge = sorted(shared_series("mr_t1_3d_axial_ge").glob("*.dcm"))
    fieldmap = []
    for f in sorted(shared_series("mr_fieldmap_enhanced_2echo_siemens_xa30").glob("*.dcm")):
        ds = dcmread(f)
        ds.ImagesInAcquisition = 66
        fieldmap.append(tmp_path / "fieldmap" / f.name)
        fieldmap[-1].parent.mkdir(exist_ok=True)
        ds.save_as(fieldmap[-1])
    assert {str(dcmread(f, stop_before_pixels=True).ImagesInAcquisition) for f in ge} == {"130"}
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": stable_age_s}}) as node:
        for files in (by_header, ge, fieldmap):
            r = storescu(files, node.port, aet=node.ae_title)
            assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(all_done(3), timeout=300, what="the three series processed")
        assert [j["state"] for j in jobs] == ["delivered"] * 3, json.dumps(jobs, indent=1)
        for files in (by_header, ge, fieldmap):
            job, row = job_and_series(node, files)
            assert (job.n_instances, row["declared_instances"], row["declared_by"]) == (len(files), len(files),
                                                                                       HEADER_DECLARED)
            # made only after stable_age_s without an instance: by the quiet period
            assert job.created - row["last_received"] >= stable_age_s, (job.created, row)
        shown = {s["series"]: (s["instances"], s["declared_instances"], s["declared_by"])
                 for s in json.loads(node.cli("status", "--json").stdout)["series"]}
        assert shown[uids(by_header)[1]] == (8, 8, HEADER_DECLARED)
        assert "declared instance(s) (by ImagesInAcquisition)" not in node.log()


def test_the_nodes_downtime_is_no_quiet(tmp_path: Path) -> None:
    """A series half received when the node stopped, the node down for longer than stable_age_s: the sender could
    not reach it, so that silence is no sign the series is complete. Restarted, the node waits stable_age_s
    before calling anything quiet: the rest, sent right after the restart, is in the one job."""
    stable_age_s = 5.0
    files = write_phantom_series(tmp_path / "ct", slices=10, size=32, step_mm=3.0, seed=56)
    study, series = uids(files)
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": stable_age_s}})
    try:
        r = storescu(files[:4], node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stdout + r.stderr
        node.stop()
        ix = Index(node.spool / "index.sqlite")
        row = ix.series(series, study)
        assert row is not None and row["n_instances"] == 4 and row["job_id"] is None
        wait_until(lambda: time.time() - row["last_received"] > stable_age_s, timeout=60, interval=0.05,
                   what="the downtime to outlast stable_age_s")
        node.launch()
        r = storescu(files[4:], node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(all_done(1), timeout=120, what="the series processed")
        assert [(j["state"], j["instances"], j["supersedes"]) for j in jobs] == [("delivered", 10, None)], \
            json.dumps(jobs, indent=1)
        ix.close()
    finally:
        node.stop()


@pytest.mark.faults
def test_duplicates_resent_after_a_kill_are_activity_one_job_on_the_whole_series(tmp_path: Path) -> None:
    """kill -9 after ~80 of 200 instances; the scanner resends all 200, slowly. The duplicates keep the series
    receiving (and the node's downtime is no quiet): one job, on 200 instances, none superseded."""
    stable_age_s = 5.0
    files = write_phantom_series(tmp_path / "ct", slices=200, size=32, step_mm=1.0, seed=55)
    study, series = uids(files)
    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": stable_age_s}})
    try:
        scanner = Scanner(node.port, files).start()
        wait_until(lambda: len(scanner.acked) >= 80, timeout=120, interval=0.02, what="80 instances acknowledged")
        node.kill9()
        scanner.thread.join(30)
        assert 80 <= len(scanner.acked) < len(files), len(scanner.acked)
        node.launch()
        ix = Index(node.spool / "index.sqlite")

        def row() -> dict[str, Any]:
            r = ix.series(series, study)
            assert r is not None
            return r

        # the resend, batch by batch; between two batches the series stays quiet for 0.6 x stable_age_s, so the
        # duplicates alone (about 80, in 4 batches) span more than stable_age_s: without them counting as
        # activity, the series would have been quiet long enough for a job on the first ~80
        batches = [files[k:k + 20] for k in range(0, len(files), 20)]
        for batch in batches:
            sent_at = time.time()
            r = storescu(batch, node.port, aet=node.ae_title, calling="SCANNER")
            assert r.returncode == 0, r.stdout + r.stderr
            assert row()["last_received"] >= sent_at, "the batch (duplicates or not) did not count as activity"
            assert node.jobs() == [], f"a job before the resend ended: {node.jobs()}"
            wait_until(lambda: time.time() - row()["last_received"] >= 0.6 * stable_age_s, timeout=60,
                       interval=0.05, what="the slow sender's pause")
        jobs = node.wait_jobs(all_done(1), timeout=180, what="the series processed")
        assert [(j["state"], j["instances"], j["supersedes"]) for j in jobs] == [("delivered", 200, None)], \
            json.dumps(jobs, indent=1)
        assert row()["n_instances"] == 200
        assert "its quiet timer restarts" in node.log()
        ix.close()
    finally:
        node.stop()
    shutil.rmtree(tmp_path / "ct", ignore_errors=True)


def test_a_series_whose_decision_could_not_be_recorded_is_decided_again(tmp_path: Path) -> None:
    """The index refuses to record a series' decision (here a trigger on the jobs table refuses new rows; in the
    field a write lock held past SQLite's 60 s busy timeout, a full disk): the series was left 'stable' with no
    job until the node restarted. Now the watcher decides it again at a later pass, once the index takes it."""
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=57)
    study, series = uids(files)
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 1.0}}) as node:
        db = sqlite3.connect(node.spool / "index.sqlite", timeout=60, isolation_level=None)
        db.execute("CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'test: the index "
                   "refuses new jobs'); END")
        r = storescu(files, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: "could not decide what to do" in node.log(), timeout=60, what="the decision refused")
        ix = Index(node.spool / "index.sqlite")
        row = ix.series(series, study)
        assert row is not None and (row["state"], row["job_id"]) == ("stable", None), row
        db.execute("DROP TRIGGER refuse_jobs")
        db.close()
        jobs = node.wait_jobs(all_done(1), timeout=60, what="the series decided again and processed")
        assert [(j["state"], j["instances"]) for j in jobs] == [("delivered", 4)], json.dumps(jobs, indent=1)
        ix.close()


def test_a_job_the_index_would_not_let_start_is_started_again(tmp_path: Path) -> None:
    """The index refuses the worker's claim of a queued job (a trigger here; in the field a lock held past the busy
    timeout, a full disk): the job stayed 'queued' and was never handed to the worker again until the node
    restarted. Now the worker tries it again a few seconds later."""
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=58)
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 1.0}}) as node:
        db = sqlite3.connect(node.spool / "index.sqlite", timeout=60, isolation_level=None)
        db.execute("CREATE TRIGGER refuse_claims BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'processing' BEGIN"
                   " SELECT RAISE(ABORT, 'test: the index refuses to start jobs'); END")
        r = storescu(files, node.port, aet=node.ae_title)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: "the worker could not record its outcome" in node.log(), timeout=60,
                   what="the claim refused")
        assert [j["state"] for j in node.jobs()] == ["queued"]
        db.execute("DROP TRIGGER refuse_claims")
        db.close()
        jobs = node.wait_jobs(all_done(1), timeout=60, what="the job started again and processed")
        assert [(j["state"], j["instances"]) for j in jobs] == [("delivered", 4)], json.dumps(jobs, indent=1)
