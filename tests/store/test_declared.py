"""A series' declared size in the index (format 2): what the headers say (ImagesInAcquisition agreed by every
instance, frames counted per multi-frame object), what a puller says (``declare_series``), when such a series is
complete (``complete_series``: exactly its declared count, then a settle time), and a plain duplicate restarting
the quiet timer of a series still receiving (``note_duplicate``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import config_from_dict
from node.errors import ConfigError
from node.ingest.admit import size_hint
from node.store import HEADER_DECLARED, Index, Instance, SeriesState, SizeHint
from tests.support.hostile import set_raw

STUDY, SERIES = "1.2.826.0.1.7.1", "1.2.826.0.1.7.2"


def _inst(k: int, series: str = SERIES) -> Instance:
    return Instance(f"{series}.{k}", series, STUDY, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                    f"/x/{series}/{k}.dcm", "CT01", "")


def _header(images: object = None, frames: object = None, acquisition: object = 1) -> Dataset:
    ds = Dataset()
    if images is not None:
        ds.ImagesInAcquisition = images
    if frames is not None:
        ds.NumberOfFrames = frames
    if acquisition is not None:
        ds.AcquisitionNumber = acquisition
    return ds


def _settled(ix: Index) -> list[tuple[str, str]]:
    """The series complete by declaration if the settle time ended now (and a second from now)."""
    return ix.complete_series(time.time() + 1)


def test_size_hint_reads_images_in_acquisition_and_counts_frames_per_object() -> None:
    assert size_hint(_header()) == SizeHint()  # nothing declared
    single = size_hint(_header(images=200))
    assert single.instances == 200 and "ImagesInAcquisition=200" in single.signature
    assert size_hint(_header(images=33, frames=33)).instances == 1  # one enhanced object holds the acquisition
    assert size_hint(_header(images=66, frames=33)).instances == 2  # two objects of 33 frames
    assert size_hint(_header(images=50, frames=33)).instances == 0  # does not divide: not trusted
    assert size_hint(_header(images=0)).instances == 0
    # another acquisition number or frame count is another signature: a series mixing them declares nothing
    assert size_hint(_header(images=200, acquisition=2)).signature != single.signature
    # a hostile value is never echoed into the signature (it is logged when instances disagree)
    hostile = _header(images=200)
    set_raw(hostile, "AcquisitionNumber", "QZPID-4417")
    set_raw(hostile, "NumberOfFrames", "1\\2")
    hint = size_hint(hostile)
    assert "QZPID" not in hint.signature and "AcquisitionNumber=?" in hint.signature and hint.instances == 0


def test_a_count_only_the_headers_declare_is_recorded_but_never_completes_the_series(tmp_path: Path) -> None:
    """series14: ImagesInAcquisition counts one acquisition. A series of two acquisitions, each declaring its own
    count (3), whose first arrives alone and then pauses longer than the settle time, completed at 3 (a job on
    half the series); now only the quiet period completes it, and it ends with both acquisitions."""
    ix = Index(tmp_path / "index.sqlite")
    first = size_hint(_header(images=3, acquisition=1))
    for k in range(2):
        ix.add_instance(_inst(k), "CT", 1, first)
    row = ix.series(SERIES, STUDY)
    assert row is not None and (row["declared_instances"], row["declared_by"]) == (3, HEADER_DECLARED)
    ix.add_instance(_inst(2), "CT", 1, first)  # the first acquisition, whole: "its declared count"
    assert _settled(ix) == []  # past the settle time: not complete by the header's count
    assert not ix.mark_stable(SERIES, time.time() + 1, STUDY, complete=True)
    for k in range(3, 6):  # the second acquisition, after the pause
        ix.add_instance(_inst(k), "CT", 1, size_hint(_header(images=3, acquisition=2)))
    assert _settled(ix) == []
    assert ix.quiet_series(time.time() + 1) == [(STUDY, SERIES)]  # the quiet period decides
    assert ix.mark_stable(SERIES, time.time() + 1, STUDY)
    row = ix.series(SERIES, STUDY)
    assert row is not None and row["state"] is SeriesState.STABLE and row["n_instances"] == 6


def test_a_site_may_let_the_headers_count_complete_a_series(tmp_path: Path) -> None:
    """``[node] images_in_acquisition_completes = true`` (#15 item 3, for modalities that send a series as one
    acquisition): the count every instance agrees on completes the series after the settle time, as a sender's."""
    assert config_from_dict({}).node.images_in_acquisition_completes is False
    assert config_from_dict({"node": {"images_in_acquisition_completes": True}}).node.images_in_acquisition_completes
    ix = Index(tmp_path / "index.sqlite")
    for k in range(3):
        ix.add_instance(_inst(k), "CT", 1, size_hint(_header(images=3)))
    assert _settled(ix) == []
    assert ix.complete_series(time.time() + 1, headers=True) == [(STUDY, SERIES)]
    assert ix.mark_stable(SERIES, time.time() + 1, STUDY, complete=True, headers=True)
    row = ix.series(SERIES, STUDY)
    assert row is not None and row["state"] is SeriesState.STABLE and row["n_instances"] == 3


def test_more_instances_than_declared_fall_back_to_the_quiet_period(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    ix = Index(tmp_path / "index.sqlite")
    hint = size_hint(_header(images=2))
    for k in range(3):
        ix.add_instance(_inst(k), "CT", 1, hint)
    assert _settled(ix) == []
    assert not ix.mark_stable(SERIES, time.time() + 1, STUDY, complete=True)
    assert "more instances (3) than declared (2" in caplog.text
    assert ix.quiet_series(time.time() + 1) == [(STUDY, SERIES)]  # the quiet period still applies


def test_instances_that_disagree_declare_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ix = Index(tmp_path / "index.sqlite")
    ix.add_instance(_inst(0), "CT", 1, size_hint(_header(images=2)))
    ix.add_instance(_inst(1), "CT", 1, size_hint(_header(images=2, acquisition=2)))  # a second acquisition
    row = ix.series(SERIES, STUDY)
    assert row is not None and (row["declared_instances"], row["declared_by"], row["header_sig"]) == (None, "",
                                                                                                      "mixed")
    assert _settled(ix) == [] and "disagree" in caplog.text
    # the first instance without the attribute: a later one that has it is not trusted either
    other = "1.2.826.0.1.7.3"
    ix.add_instance(_inst(0, other), "CT", 1, size_hint(_header()))
    ix.add_instance(_inst(1, other), "CT", 1, size_hint(_header(images=2)))
    row = ix.series(other, STUDY)
    assert row is not None and row["declared_instances"] is None and row["header_sig"] == "mixed"
    assert _settled(ix) == []


def test_a_puller_declaration_overrides_the_headers_and_needs_a_received_series(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    assert ix.declare_series(STUDY, SERIES, 3, "c-move from pacs") is None  # nothing received: not kept
    ix.add_instance(_inst(0), "CT", 1, size_hint(_header(images=1)))
    row = ix.declare_series(STUDY, SERIES, 3, "c-move from pacs")
    assert row is not None and (row["declared_instances"], row["declared_by"]) == (3, "c-move from pacs")
    ix.add_instance(_inst(1), "CT", 1, size_hint(_header(images=1, acquisition=9)))  # headers disagree now
    row = ix.series(SERIES, STUDY)
    assert row is not None and row["declared_instances"] == 3  # the puller's word stands
    assert _settled(ix) == []
    ix.add_instance(_inst(2), "CT", 1)
    assert _settled(ix) == [(STUDY, SERIES)]
    with pytest.raises(ValueError):
        ix.declare_series(STUDY, SERIES, 0, "http")


def test_a_plain_duplicate_restarts_the_quiet_timer_only_while_receiving(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.sqlite")
    ix.add_instance(_inst(0), "CT", 1)
    before = ix.series(SERIES, STUDY)
    assert before is not None
    assert not ix.add_instance(_inst(0), "CT", 1)  # the index alone: a duplicate changes nothing
    assert ix.series(SERIES, STUDY) == before
    while time.time() <= before["last_received"]:  # the clock must move on for the check below to mean anything
        pass
    assert ix.note_duplicate(STUDY, SERIES)
    after = ix.series(SERIES, STUDY)
    assert after is not None and after["last_received"] > before["last_received"]
    assert after["n_instances"] == 1
    assert ix.quiet_series(after["last_received"]) == []  # quiet counted from the duplicate
    ix.mark_stable(SERIES, time.time() + 1, STUDY)
    stable = ix.series(SERIES, STUDY)
    assert not ix.note_duplicate(STUDY, SERIES)  # not receiving any more: a resend brings nothing new
    assert ix.series(SERIES, STUDY) == stable
    assert not ix.note_duplicate(STUDY, "1.2.9.9")  # unknown series


def test_declared_settle_s_must_not_be_negative() -> None:
    assert config_from_dict({"node": {"declared_settle_s": 0.0}}).node.declared_settle_s == 0.0
    with pytest.raises(ConfigError, match="node.declared_settle_s"):
        config_from_dict({"node": {"declared_settle_s": -1.0}})
