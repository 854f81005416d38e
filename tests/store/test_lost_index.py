"""The spool files are the truth (issue #16, item 4), against the real node and the real ``srnode`` commands.

Attacks: spool/index.sqlite deleted, or emptied, while instances sit in the spool; garbage written over pages of
index.sqlite. Before: ``serve`` started with 0 instances and said nothing (the series were silently forgotten);
a damaged index gave a raw sqlite3.DatabaseError traceback. Now: the start re-indexes every instance file the
index lacks, with a warning naming the spool and the count (and the series are processed again); a damaged
index stops the start with one line naming the file and what to do, and ``srnode reindex`` moves it aside and
rebuilds the index from the spool.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node.store import Index
from tests.support.hostile import dump, series
from tests.support.nodeproc import NodeProc, delivered
from tests.support.peers import storescu, wait_until


def _index_files(spool: Path) -> list[Path]:
    return [spool / f"index.sqlite{s}" for s in ("", "-wal", "-shm")]


def _start_again(node: NodeProc) -> None:
    node._index = None  # the test's own connection must not outlive the file it read
    node.launch()


def test_lost_or_emptied_index_is_rebuilt_from_the_spool_at_start(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 41, 4)
    node = NodeProc.start(tmp_path / "node")
    try:
        assert storescu(files, node.port).returncode == 0
        node.wait_jobs(delivered(), what="first delivery")
        node.stop()
        for how in ("deleted", "emptied"):
            for p in _index_files(node.spool):
                p.unlink(missing_ok=True)
            if how == "emptied":
                node.spool.joinpath("index.sqlite").write_bytes(b"")
            _start_again(node)
            log = node.log().split("===== start")[-1]
            assert f"spool {node.spool}: 4 instance file(s) of 1 series were not in the index" in log, log
            status = node.cli("status", "--json")
            assert '"instances": 4' in status.stdout, status.stdout + status.stderr
            # the series takes the normal way again: a new job, delivered
            jobs = node.wait_jobs(delivered(), what=f"delivery after the index was {how}")
            assert [(j["state"], j["instances"]) for j in jobs] == [("delivered", 4)], dump(jobs)
            node.stop()
        # a start with a complete index re-indexes nothing and says nothing about it
        _start_again(node)
        assert "were not in the index" not in node.log().split("===== start")[-1]
    finally:
        node.stop()


def test_damaged_index_stops_serve_with_one_line_and_reindex_rebuilds_it(tmp_path: Path) -> None:
    files = series(tmp_path / "ct", 42, 4)
    other = series(tmp_path / "ct2", 43, 3)
    node = NodeProc.start(tmp_path / "node")
    try:
        assert storescu([*files, *other], node.port).returncode == 0
        node.wait_jobs(delivered(2), what="both series delivered")
        node.stop()
        db = node.spool / "index.sqlite"
        c = sqlite3.connect(db)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        data = bytearray(db.read_bytes())
        assert len(data) >= 4 * 4096, len(data)
        data[1 * 4096:3 * 4096] = b"\xba\xad\xf0\x0d" * 2048  # garbage over pages 2 and 3
        db.write_bytes(bytes(data))

        node._index = None
        node.launch(wait=False)
        assert node.proc is not None
        rc = node.proc.wait(timeout=60)
        out = node.log().split("===== start")[-1]
        errors = [ln for ln in out.splitlines() if "error:" in ln]
        assert rc == 1 and "Traceback" not in out, out
        assert len(errors) == 1 and str(db) in errors[0] and "srnode reindex" in errors[0], out
        assert "damaged" in errors[0] and "move it aside" in errors[0], errors

        r = node.cli("reindex")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "moved aside as" in r.stdout and "7 added (2 series)" in r.stdout, r.stdout
        assert list(node.spool.glob("index.sqlite.damaged-*")), "the damaged index was not kept"
        assert Index(db).count_instances() == 7
        _start_again(node)
        jobs = node.wait_jobs(delivered(2), what="both series delivered again after reindex")
        assert sorted(j["instances"] for j in jobs) == [3, 4], dump(jobs)
        wait_until(lambda: node.echo(), timeout=10, what="node up")
    finally:
        node.stop()
