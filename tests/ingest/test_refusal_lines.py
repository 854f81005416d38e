"""Refused C-STOREs of one association write a bounded number of lines (hostile19), both receive paths, against
the real node process.

Before: one WARNING line per refused instance, however many a peer sent on one association (2,000 tiny data sets
without SeriesInstanceUID: 2,000 lines, 284 KB of log; the node's own loggers are not under the flood filter),
while a STOW-RS request logs 10 refused parts, then one line with the count (hostile17). Now the same for
C-STORE: 10 lines an association, one line saying the rest are counted, and the count by status in the
association's end line and audit record. Every refused instance still gets its status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.ingest.scp import MAX_LOGGED_REFUSALS
from tests.support.nodeproc import NodeProc
from tests.support.peers import wait_until

SENT = 30


def _refused_instance(k: int) -> Dataset:
    """A CT Image Storage data set without SeriesInstanceUID: refused 0xC210 by the header check."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.1087.19.{k + 1}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1087.19.0"
    ds.Modality = "CT"
    return ds


@pytest.fixture(params=["lean", "pynetdicom"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProc]:
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600, "receive_path": request.param}}) as n:
        yield n


def test_refused_c_stores_of_one_association_are_logged_ten_then_counted(node: NodeProc) -> None:
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(_refused_instance(k)).get("Status") for k in range(SENT)]
    finally:
        assoc.release()
    assert statuses == [0xC210] * SENT, statuses
    wait_until(lambda: "association from FLOOD@127.0.0.1 released" in node.log(), timeout=30,
               what="the association's end line")
    log = node.log().splitlines()
    named = [ln for ln in log if "C-STORE from FLOOD refused (0xC210)" in ln]
    assert len(named) == MAX_LOGGED_REFUSALS, len(named)
    assert sum("more than 10 C-STOREs refused: the next ones are counted" in ln for ln in log) == 1
    end = next(ln for ln in log if "association from FLOOD@127.0.0.1 released" in ln)
    assert f"{SENT} refused ({SENT - MAX_LOGGED_REFUSALS} of them not logged one by one: 0xC210 x20)" in end, end
    audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
    rec = next(r for r in audit if r["event"] == "association" and r["calling_ae"] == "FLOOD")
    assert rec["refused"] == SENT and rec["refused_not_logged"] == {"0xC210": SENT - MAX_LOGGED_REFUSALS}, rec


@pytest.fixture(params=["lean", "pynetdicom"])
def small_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeProc]:
    with NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600, "receive_path": request.param,
                                                    "max_instance_mb": 1}}) as n:
        yield n


def test_a_refusal_of_another_kind_after_the_flood_is_still_logged(small_node: NodeProc) -> None:
    """review19: the bound was 10 lines an association whatever the status, so once 10 instances had been refused
    for one reason, a refusal for another reason on the same association (here an instance over max_instance_mb,
    0xC211; as well an unexpected error, 0x0110, whose traceback was the only trace of a bug) wrote nothing but a
    count in the end line: its instance and reason were lost. Now the bound is per status."""
    node = small_node
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    big = _refused_instance(SENT)
    big.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1087.19.99"
    big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 1024, 1024, 16, 16, 15
    big.SamplesPerPixel, big.PixelRepresentation, big.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    big.PixelData = bytes(2 << 20)  # 2 MiB: over max_instance_mb = 1
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(_refused_instance(k)).get("Status") for k in range(SENT)]
        statuses.append(assoc.send_c_store(big).get("Status"))
    finally:
        assoc.release()
    assert statuses == [0xC210] * SENT + [0xC211], statuses
    wait_until(lambda: "association from FLOOD@127.0.0.1 released" in node.log(), timeout=30,
               what="the association's end line")
    log = node.log().splitlines()
    assert sum("C-STORE from FLOOD refused (0xC210)" in ln for ln in log) == MAX_LOGGED_REFUSALS
    too_large = [ln for ln in log if "C-STORE from FLOOD refused (0xC211)" in ln]
    assert len(too_large) == 1 and big.SOPInstanceUID in too_large[0], too_large  # before: none
    end = next(ln for ln in log if "association from FLOOD@127.0.0.1 released" in ln)
    assert f"{SENT + 1} refused ({SENT - MAX_LOGGED_REFUSALS} of them not logged one by one: 0xC210 x20)" in end, end
