"""A dead letter whose destination was removed from the configuration: `srnode retry` (and the dashboard's Retry)
re-queued its delivery to the name the node no longer knows, and it failed again ("no destination named ...").
Now the retry replays the series under the job's rule as configured now, to the destinations it names now (the
dashboard's Replay, one code path: ``node.jobs.replay``), or, when the rule is gone too, refuses with one line
naming the job and why. The real node, storescu, a PACS that is not there (a closed port), a folder destination
and the dashboard over HTTP (no token, loopback: no login)."""

from __future__ import annotations

from pathlib import Path

import httpx
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import free_port, storescu


def _dashboard_retry(node: NodeProc, job: int) -> httpx.Response:
    with httpx.Client(base_url=node.http_url, timeout=30, follow_redirects=False) as c:
        page = c.get(f"/dashboard/jobs/{job}").text
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        return c.post(f"/dashboard/jobs/{job}/retry", data={"csrf": csrf}, headers={"Origin": node.http_url})


def test_a_dead_letter_to_a_removed_destination_is_replayed_to_the_rules_destinations_now(tmp_path: Path) -> None:
    one = write_phantom_series(tmp_path / "one", slices=4, size=32, step_mm=3.0, seed=74)
    two = write_phantom_series(tmp_path / "two", slices=4, size=32, step_mm=3.0, seed=78)
    series = {str(dcmread(fs[0], stop_before_pixels=True).SeriesInstanceUID) for fs in (one, two)}
    gone = {"name": "old-pacs", "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
            "timeout_s": 2.0}
    out = {"name": "new-pacs", "kind": "folder", "path": str(tmp_path / "new")}
    rule = {"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2}
    with NodeProc.start(tmp_path / "node", {"outbox": {"max_attempts": 2, "backoff_initial_s": 0.2},
                                            "destinations": [gone],
                                            "rules": [{**rule, "destinations": ["old-pacs"]}]}) as node:
        for files in (one, two):
            assert storescu(files, node.port, aet=node.ae_title).returncode == 0
        node.wait_jobs(lambda js: [j["state"] for j in js] == ["dead-letter"] * 2, timeout=120,
                       what="both deliveries to the absent PACS dead-lettered")
        # the PACS retired: its destination removed, and the rule renamed -- nothing to send the results to
        node.restart({"destinations": [out], "rules": [{**rule, "name": "ct-new", "destinations": ["new-pacs"]}]})
        r = node.cli("retry")
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.splitlines() == [
            f"job {j}: its destination 'old-pacs' is no longer configured, nor its rule 'ct': not retried (configure "
            "the destination again, or send the series through a rule)" for j in (1, 2)], r.stderr
        page = _dashboard_retry(node, 2)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/jobs/2?done=no-destination"
        assert [j["state"] for j in node.jobs()] == ["dead-letter"] * 2  # nothing dropped: as they were
        # the rule back, now naming the new destination: the retry replays each series to it
        node.restart({"rules": [{**rule, "destinations": ["new-pacs"]}]})
        r = node.cli("retry", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == ("job 1: its destination 'old-pacs' is no longer configured: its series is "
                                    "replayed as job 3 under its rule 'ct', to new-pacs"), r.stdout
        page = _dashboard_retry(node, 2)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/jobs/4?done=replayed"
        jobs = node.wait_jobs(lambda js: len(js) == 4 and all(j["state"] == "delivered" for j in js[2:]),
                              timeout=120, what="both replays delivered to the new destination")
        for old in jobs[:2]:
            assert old["state"] == "superseded" and "replayed as a new job to new-pacs" in old["reason"], old
        assert [[d["destination"] for d in j["deliveries"]] for j in jobs[2:]] == [["new-pacs"], ["new-pacs"]]
        derived = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "new").rglob("*.dcm")]
        assert len(derived) == 14, len(derived)
        assert {str(d.ReferencedSeriesSequence[0].SeriesInstanceUID) for d in derived} == series
        r = node.cli("retry")  # no dead letter left: nothing replayed twice
        assert r.returncode == 0 and "nothing to retry" in r.stdout, r.stdout + r.stderr
        assert len(node.jobs()) == 4
