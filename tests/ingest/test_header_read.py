"""Admission's header read (``node.ingest.admit.read_header``): a file up to ``IN_MEMORY_HEADER_BYTES`` is parsed
from one read into memory, a larger one from the file; both give the same header and the same refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.bench.ingest import write_series
from node.dimse import Status
from node.errors import IngestError
from node.ingest import admit


@pytest.fixture(params=["memory", "file"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "file":  # every file is "large": parsed from the file as before
        monkeypatch.setattr(admit, "IN_MEMORY_HEADER_BYTES", 0)
    return str(request.param)


def test_both_sources_give_the_same_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_series(tmp_path / "ct", 3, 1, 64, tag="hdr-")[0]
    in_memory = admit.read_header(path)
    monkeypatch.setattr(admit, "IN_MEMORY_HEADER_BYTES", 0)
    assert admit.read_header(path) == in_memory
    assert in_memory.sop_class == "1.2.840.10008.5.1.4.1.1.2" and in_memory.modality == "CT"


def test_a_truncated_pixel_data_element_is_refused(tmp_path: Path, mode: str) -> None:
    path = write_series(tmp_path / "ct", 4, 1, 64, tag="trunc-")[0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IngestError) as err:
        admit.read_header(path)
    assert err.value.status == Status.CANNOT_UNDERSTAND and "truncated" in str(err.value), mode


def test_garbage_is_refused_with_c210(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    with pytest.raises(IngestError) as err:
        admit.read_header(path)
    assert err.value.status == Status.CANNOT_UNDERSTAND, mode
