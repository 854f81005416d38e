"""One serving node per spool: a second ``srnode serve`` on a spool in use refuses with one line before it
touches anything (it used to delete the running node's partial files and requeue its running job first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
