"""`srnode serve` logs each association when it ends: caller, address, instances stored/refused, duration; no
patient data."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pydicom
import pytest

from node.app.phantom import write_phantom_series
from tests.ingest.test_scp import send_dataset, start_scp
from tests.support.peers import storescu, wait_until


def test_each_association_is_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = write_phantom_series(tmp_path / "ph", slices=3, size=32)
    caplog.set_level(logging.INFO, logger="node.ingest.scp")
    scp = start_scp(tmp_path)
    try:
        r = storescu(files, scp.cfg.node.port, calling="CT01")
        assert r.returncode == 0, r.stderr
        bad = pydicom.dcmread(files[0])
        bad.SOPInstanceUID = pydicom.uid.generate_uid()
        bad.SeriesInstanceUID = ""  # refused: 0xC210
        assert send_dataset(scp.cfg.node.port, bad) != 0

        def ended() -> list[str]:
            return [m for m in caplog.messages if m.startswith("association from ")]

        lines = wait_until(lambda: len(ended()) >= 2 and ended(), timeout=30, what="two association log lines")
    finally:
        scp.stop()
    assert re.fullmatch(r"association from CT01@127\.0\.0\.1 released after \d+\.\d s: 3 instance\(s\) stored, "
                        r"0 refused", lines[0]), lines
    assert re.fullmatch(r"association from PYSCU@127\.0\.0\.1 released after \d+\.\d s: 0 instance\(s\) stored, "
                        r"1 refused", lines[1]), lines
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    for text in caplog.messages:
        assert str(patient.PatientName) not in text and str(patient.PatientID) not in text
