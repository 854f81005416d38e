"""Where the header check inflates a deflated instance of the spool (break16b, review of hostile16).

``srnode reindex`` (and every ``srnode serve`` start) reads the header of each spool instance the index lacks; a
deflated one is inflated to a copy first (``node.ingest.admit._inflated_copy``). That copy was written beside the
instance, in ``instances/<Study>/<Series>/``: a start killed meanwhile (systemd's start timeout, an OOM kill, an
operator's Ctrl-C on ``srnode reindex``) left an ``inflated-*.dcm`` of up to the instance's inflated size there for
good (``clean_incoming`` only empties ``incoming/``), and every later reindex skipped it with a warning and exited 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydicom import dcmread

from node.store import Spool
from tests.ingest.test_bombs import MiB, _instance

ROOT = Path(__file__).resolve().parents[2]


def _copies(root: Path) -> list[Path]:
    return [p for p in root.rglob("inflated-*") if p.is_file()]


def test_a_reindex_killed_while_inflating_leaves_no_copy_among_the_stored_instances(tmp_path: Path) -> None:
    src = _instance(tmp_path, 7, zeros=1024 * MiB, deflated=True)  # 1 GiB once inflated, ~5 MB as stored
    ds = dcmread(src, stop_before_pixels=True, defer_size=1024)
    spool = Spool(tmp_path / "spool", 1)
    stored = spool.instance_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    stored.parent.mkdir(parents=True)
    src.rename(stored)
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\nspool_dir = "{spool.root}"\nmin_free_mb = 1\n')
    cmd = [sys.executable, "-m", "node.app.cli", "reindex", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not _copies(spool.root):
            assert proc.poll() is None, f"reindex ended before its inflated copy was seen: {proc.stdout.read()!r}"
            assert time.monotonic() < deadline, "no inflated copy within 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = _copies(spool.root)
    assert left and all(p.parent == spool.incoming for p in left), left  # where the next start cleans up
    assert sorted(p for p in spool.instances.rglob("*") if p.is_file()) == [stored]
    spool.clean_incoming()  # what `srnode serve` does first at its start
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 added" in done.stdout and "0 skipped" in done.stdout, done.stdout + done.stderr
    assert not _copies(spool.root)
