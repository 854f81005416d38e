"""One serving node per spool: a second ``srnode serve`` on a spool in use refuses with one line before it
touches anything (it used to delete the running node's partial files and requeue its running job first)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node.app.phantom import write_phantom_series
from node.config.dump import dump_toml
from tests.support.nodeproc import ROOT, NodeProc
from tests.support.peers import free_port


def test_a_second_node_on_a_spool_in_use_refuses_before_touching_it(tmp_path: Path) -> None:
    first = NodeProc.start(tmp_path / "first")
    try:
        partial = first.spool / "incoming" / "being-received.tmp"  # as if an association were receiving it
        partial.write_bytes(b"half a dataset")
        second_cfg = dict(first.config)
        second_cfg["node"] = {**first.config["node"], "port": free_port()}  # other ports, the same spool
        second_cfg["http"] = {**first.config["http"], "port": free_port()}
        cfg_path = tmp_path / "second.toml"
        cfg_path.write_text(dump_toml(second_cfg))
        r = subprocess.run([sys.executable, "-m", "node.app.cli", "serve", "--config", str(cfg_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert "is in use by another srnode" in r.stderr and "spool_dir" in r.stderr, r.stderr[-2000:]
        assert partial.exists(), "the second node cleaned the running node's incoming/"
        assert first.echo(), "the running node stopped answering"
    finally:
        assert first.stop() == 0
    # once the first is stopped, the spool is free again
    again = NodeProc.start(tmp_path / "again", {"node": {"spool_dir": str(first.spool)}})
    assert again.stop() == 0


def test_status_of_a_killed_node_says_it_is_not_running(tmp_path: Path) -> None:
    """break18: after a kill -9 of the node during processing, `srnode status` showed the job "processing" (and
    `--json` the same), exactly as while the node ran: nothing said that no node was running it, nor that it runs
    again only when the node is started. Now a NODE NOT RUNNING line names the interrupted jobs, `--json` says
    "node_running": false, and while a node holds the spool the line is absent ("node_running": true)."""
    from tests.support.peers import storescu, wait_until

    files = write_phantom_series(tmp_path / "ct", slices=40, size=256, step_mm=3.0, seed=183)
    node = NodeProc.start(tmp_path / "node", {"rules": [{"name": "ct", "match": {"Modality": "CT"},
                                                         "through_plane_factor": 4, "destinations": []}]})
    try:
        running = node.cli("status", "--json")
        assert json.loads(running.stdout)["node_running"] is True, running.stdout + running.stderr
        assert storescu(files, node.port).returncode == 0
        wait_until(lambda: any(j["state"] == "processing" for j in node.jobs()), timeout=120, interval=0.02,
                   what="the job processing")
        node.kill9()
        job = next(j for j in node.jobs() if j["state"] == "processing")
        r = node.cli("status")
        assert r.returncode == 0, r.stderr
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("NODE NOT RUNNING")]
        assert len(line) == 1 and f"({job['id']})" in line[0] and "re-queues them" in line[0], r.stdout
        assert json.loads(node.cli("status", "--json").stdout)["node_running"] is False
        node.launch()
        node.wait_jobs(lambda js: all(j["state"] not in ("queued", "processing", "sending") for j in js),
                       timeout=300, what="the job run again")
        assert "NODE NOT RUNNING" not in node.cli("status").stdout
    finally:
        node.stop()


def test_retry_while_no_node_runs_says_the_work_waits_for_it(tmp_path: Path) -> None:
    """break18: `srnode retry` with the node stopped printed "job 1: re-queued for processing" and nothing else:
    the job then waited, queued, until someone started the node. Now a NODE NOT RUNNING line says so; with the
    node running, no such line."""
    from tests.support.peers import storescu

    files = write_phantom_series(tmp_path / "ct", slices=1, size=64, step_mm=3.0, seed=186)  # 1 slice: fails
    node = NodeProc.start(tmp_path / "node", {"rules": [{"name": "ct", "match": {"Modality": "CT"},
                                                         "through_plane_factor": 2, "destinations": []}]})
    try:
        assert storescu(files, node.port).returncode == 0
        (job,) = node.wait_jobs(lambda js: js and js[0]["state"] == "failed", timeout=120, what="the job failed")
        running = node.cli("retry", str(job["id"]))
        assert "re-queued" in running.stdout and "NODE NOT RUNNING" not in running.stdout, running.stdout
        node.wait_jobs(lambda js: js[0]["state"] == "failed" and js[0]["attempts"] >= 1, timeout=120,
                       what="the job failed again")
        assert node.stop() == 0
        r = node.cli("retry", str(job["id"]))
        assert r.returncode == 0 and "re-queued" in r.stdout, r.stdout + r.stderr
        assert [ln for ln in r.stdout.splitlines() if ln.startswith("NODE NOT RUNNING")], r.stdout
    finally:
        node.stop()


def test_reindex_beside_a_running_node_is_refused(tmp_path: Path) -> None:
    """break19: ``srnode reindex --fresh`` run while ``srnode serve`` served the spool (its docstring said "stop
    the node first", nothing enforced it): rc 0, the index moved aside under the node, which went on writing the
    moved-aside file; a series acknowledged after it was in no index the next start reads (`srnode status`: "no
    jobs", the first series listed again as 'not complete yet', to be processed again). Now refused, rc 1, one
    line saying to stop the node; the index untouched. Once the node is stopped, the reindex runs."""
    from tests.support.peers import storescu

    node = NodeProc.start(tmp_path / "node")
    try:
        storescu(write_phantom_series(tmp_path / "a", slices=6, size=64, step_mm=5.0, seed=1), node.port)
        node.wait_jobs(lambda js: js and js[0]["state"] == "delivered", 60, what="job 1 delivered")
        for extra in ((), ("--fresh",)):
            r = node.cli("reindex", *extra)
            assert r.returncode == 1, (r.stdout, r.stderr)
            assert "is in use by a running srnode serve" in r.stderr and "stop the node first" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
        assert sorted(p.name for p in node.spool.glob("index.sqlite*")) == ["index.sqlite", "index.sqlite-shm",
                                                                             "index.sqlite-wal"]
        storescu(write_phantom_series(tmp_path / "b", slices=6, size=64, step_mm=5.0, seed=2), node.port)
        node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] == "delivered" for j in js), 60,
                       what="job 2 delivered, in the one index")
    finally:
        assert node.stop() == 0
    r = node.cli("reindex", "--fresh")
    assert r.returncode == 0 and "12 added (2 series)" in r.stdout, (r.stdout, r.stderr)


def test_reindex_on_a_lock_it_cannot_open_says_why_not_that_a_node_runs(tmp_path: Path) -> None:
    """review19: every SpoolError of the lock read "is in use by a running srnode serve ... stop the node first",
    also when no node ran and the lock could not be opened (here its path is a folder; as well a user without
    write access to the spool, or a file system without flock: ENOLCK). Now only a lock held by another process
    says so; any other reason is said as it is."""
    spool = tmp_path / "spool"
    (spool / "srnode.lock").mkdir(parents=True)
    cfg = tmp_path / "srnode.toml"
    cfg.write_text(dump_toml({"node": {"spool_dir": str(spool)}}))
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "reindex", "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "cannot open its lock srnode.lock" in r.stderr, r.stderr
    assert "in use by a running srnode serve" not in r.stderr, r.stderr  # before: said, no node running
    assert r.stderr.count("\n") <= 1, r.stderr  # one line, no traceback
