"""A dead letter whose destination was removed from the configuration: `srnode retry` re-queued its delivery to
the name the node no longer knows, and it failed again ("no destination named ..."). Now the retry replays the
series under the job's rule as configured now, to the destinations it names now (the dashboard's Replay, one code
path: ``node.jobs.replay``), or, when the rule is gone too, refuses with one line naming the job and why. The real
node, storescu, a PACS that is not there (a closed port) and a folder destination."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import free_port, storescu


def test_a_dead_letter_to_a_removed_destination_is_replayed_to_the_rules_destinations_now(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=74)
    series = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    gone = {"name": "old-pacs", "kind": "dicom", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
            "timeout_s": 2.0}
    out = {"name": "new-pacs", "kind": "folder", "path": str(tmp_path / "new")}
    rule = {"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2}
    with NodeProc.start(tmp_path / "node", {"outbox": {"max_attempts": 2, "backoff_initial_s": 0.2},
                                            "destinations": [gone],
                                            "rules": [{**rule, "destinations": ["old-pacs"]}]}) as node:
        assert storescu(files, node.port, aet=node.ae_title).returncode == 0
        node.wait_jobs(lambda js: [j["state"] for j in js] == ["dead-letter"], timeout=120,
                       what="the delivery to the absent PACS dead-lettered")
        # the PACS retired: its destination removed, and the rule renamed -- nothing to send the results to
        node.restart({"destinations": [out], "rules": [{**rule, "name": "ct-new", "destinations": ["new-pacs"]}]})
        r = node.cli("retry")
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip() == ("job 1: its destination 'old-pacs' is no longer configured, nor its rule 'ct': "
                                    "not retried (configure the destination again, or send the series through a "
                                    "rule)"), r.stderr
        (job,) = node.jobs()
        assert job["state"] == "dead-letter", job  # nothing dropped: the dead letter stays as it was
        # the rule back, now naming the new destination: the retry replays the series to it
        node.restart({"rules": [{**rule, "destinations": ["new-pacs"]}]})
        r = node.cli("retry")
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("job 1: its destination 'old-pacs' is no longer configured: its series is replayed as job 2 under "
                "its rule 'ct', to new-pacs") in r.stdout, r.stdout
        jobs = node.wait_jobs(lambda js: len(js) == 2 and js[1]["state"] == "delivered", timeout=120,
                              what="the replay delivered to the new destination")
        assert jobs[0]["state"] == "superseded" and "replayed as a new job to new-pacs" in jobs[0]["reason"], jobs[0]
        assert [d["destination"] for d in jobs[1]["deliveries"]] == ["new-pacs"], jobs[1]
        derived = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "new").rglob("*.dcm")]
        assert len(derived) == 7 and {str(d.ReferencedSeriesSequence[0].SeriesInstanceUID) for d in derived} == {
            series}, len(derived)
        r = node.cli("retry")  # job 1 is no dead letter any more: not replayed twice
        assert r.returncode == 0 and "nothing to retry" in r.stdout, r.stdout + r.stderr
        assert len(node.jobs()) == 2
