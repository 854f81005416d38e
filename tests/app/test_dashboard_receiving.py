"""The dashboard's job list while a series waits in its quiet period: it said "No jobs yet." as if nothing had
arrived; it now says how many series are receiving (user18)."""

from __future__ import annotations

from pathlib import Path

import httpx

from node.app.phantom import write_phantom_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until


def test_the_job_list_names_the_series_still_receiving(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=4, size=32, step_mm=3.0, seed=182)
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 600.0}}) as node:
        assert storescu(files, node.port).returncode == 0
        page = wait_until(lambda: (r := httpx.get(f"{node.http_url}/dashboard", timeout=30)).status_code == 200
                          and "1 series receiving" in r.text and r, timeout=30, what="the receiving series shown")
        assert "No jobs yet: 1 series receiving" in page.text, page.text[-1500:]
        assert node.jobs() == []
