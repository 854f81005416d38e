"""Delivery confirmed, not assumed (``node.send.confirm``), against real peers: Orthanc's Storage Commitment SCP
(report on a new association to our SCP), Orthanc REST counts, dcmtk's dcmqrscp (C-STORE + C-FIND, no Storage
Commitment: the count fallback) and dcmtk's storescp (neither: 'unconfirmed'). Instances deleted from Orthanc
between the send and the check make a shortfall: retried, then dead-lettered with the numbers. A node restarted
while a commitment report is outstanding asks again and is confirmed.

The outbox runs in-process here (its attempts called directly, one at a time) with a pynetdicom listener that
hands N-EVENT-REPORTs to the same handler the node's SCP uses; the last test runs the real node process.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from node.app.status_cmd import job_dict, job_line
from node.config import Config, config_from_dict
from node.metrics import Metrics
from node.send import Outbox
from node.send.confirm import NEITHER
from node.store import Delivery, DeliveryState, Index, Instance, JobState
from tests.support.nodeproc import NodeProc
from tests.support.peers import (
    ORTHANC_PLUGINS,
    STORESCP,
    STORESCU,
    Orthanc,
    free_port,
    start_orthanc,
    storescu,
    wait_until,
)

DCMQRSCP = "/usr/bin/dcmqrscp"
ECHOSCU = "/usr/bin/echoscu"
FAST = {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.01, "confirm_timeout_s": 60.0}


def _cfg(tmp: Path, dest: dict[str, Any], outbox: dict[str, Any] | None = None) -> Config:
    return config_from_dict({"node": {"spool_dir": str(tmp / "spool")}, "outbox": {**FAST, **(outbox or {})},
                             "destinations": [dest],
                             "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": [dest["name"]]}]})


class Harness:
    """An index with one job in 'sending' whose delivery holds ``files``, and the outbox (not started)."""

    def __init__(self, tmp: Path, cfg: Config, files: Sequence[Path], index: Index | None = None) -> None:
        self.cfg, self.metrics = cfg, Metrics.create()
        self.index = index or Index(tmp / "index.sqlite")
        self.outbox = Outbox(cfg, self.index, self.metrics)
        self.files = list(files)

    def job(self, seed: int) -> Delivery:
        series = f"1.2.826.0.1.77.{seed}"
        self.index.add_instance(Instance(f"{series}.1", series, "1.2.826.0.1.76", "1.2.840.10008.5.1.4.1.1.2",
                                         "1.2.840.10008.1.2.1", "/x.dcm", "CT01", ""), "CT", 1)
        assert self.index.mark_stable(series, time.time() + 1)
        job = self.index.create_job(series, "ct")
        assert self.index.claim_job(job) is not None
        self.index.add_deliveries(job, {self.cfg.destinations[0].name: [str(f) for f in self.files]})
        self.index.finish_job(job, JobState.SENDING)
        (d,) = self.index.deliveries(job)
        return d

    def now(self, d: Delivery) -> Delivery:
        fresh = self.index.delivery(d.id)
        assert fresh is not None
        return fresh

    def wait_state(self, d: Delivery, *states: DeliveryState, timeout: float = 30, interval: float = 0.1) -> Delivery:
        got: Delivery = wait_until(lambda: (x := self.now(d)).state in states and x, timeout, interval=interval,
                                   what=f"delivery in {[str(s) for s in states]}")
        return got

    def wait_job(self, d: Delivery, state: JobState, timeout: float = 30) -> None:
        wait_until(lambda: self.index.job(d.job_id).state is state, timeout, what=f"job {d.job_id} {state}")

    def confirmed(self, method: str, outcome: str) -> float:
        return float(self.metrics.registry.get_sample_value(
            "srnode_delivery_confirmations_total",
            {"destination": self.cfg.destinations[0].name, "method": method, "outcome": outcome}) or 0)


def report_listener(port: int, harness_ref: list[Harness], ae_title: str = "SRNODE") -> Any:
    """A DICOM listener that hands N-EVENT-REPORTs to the current harness' outbox (as the node's SCP does)."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    return ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda e: harness_ref[0].outbox.confirm.on_report(e))])


def put_modality(orthanc: Orthanc, name: str, aet: str, port: int) -> None:
    """Declare (or change) the node as a modality of Orthanc: where its commitment reports go. The tests' own
    modalities (named ``confirm-*``) are removed after each test (``_forget_modalities``)."""
    with orthanc.client() as c:
        c.put(f"/modalities/{name}", json={"AET": aet, "Host": "127.0.0.1", "Port": port}).raise_for_status()


@pytest.fixture(autouse=True)
def _forget_modalities(request: pytest.FixtureRequest) -> Iterator[None]:
    """The session's Orthanc forgets the modalities a test declared: a later test's node with the same AE title
    (SRNODE) on another port would otherwise have its commitment reports sent to this test's closed port."""
    yield
    if "orthanc" not in request.fixturenames:
        return
    orthanc: Orthanc = request.getfixturevalue("orthanc")
    with orthanc.client() as c:
        for name in c.get("/modalities").json():
            if str(name).startswith("confirm-"):
                c.delete(f"/modalities/{name}").raise_for_status()


def delete_from_orthanc(orthanc: Orthanc, files: Sequence[Path]) -> None:
    with orthanc.client() as c:
        for f in files:
            sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for hit in c.post("/tools/lookup", content=sop).json():
                if hit["Type"] == "Instance":
                    c.delete(f"/instances/{hit['ID']}").raise_for_status()


class Losing:
    """A sender that sends, then makes Orthanc lose ``lose`` of the files (the first ``times`` sends)."""

    def __init__(self, inner: Any, orthanc: Orthanc, lose: Sequence[Path], times: int) -> None:
        self.inner, self.orthanc, self.lose, self.times = inner, orthanc, list(lose), times
        self.name = inner.name

    def send(self, paths: Sequence[Path]) -> None:
        self.inner.send(paths)
        if self.times > 0:
            self.times -= 1
            delete_from_orthanc(self.orthanc, self.lose)

    def check(self) -> None:
        self.inner.check()


def _dicom(orthanc: Orthanc, calling: str, **extra: Any) -> dict[str, Any]:
    return {"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
            "port": orthanc.dicom_port, "calling_ae_title": calling, "timeout_s": 10.0, **extra}


# ---------------------------------------------------------------------------------------------- commitment


def test_orthanc_storage_commitment_confirms_then_a_shortfall_is_retried(orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=31)
    port, ref = free_port(), list[Harness]()
    put_modality(orthanc, "confirm-a", "SRCONFA", port)
    h = Harness(tmp_path, _cfg(tmp_path, _dicom(orthanc, "SRCONFA")), files)
    ref.append(h)
    server = report_listener(port, ref)
    try:
        d = h.job(1)
        h.outbox.attempt(d)  # C-STORE, then N-ACTION; the report comes on a new association
        got = h.wait_state(d, DeliveryState.DELIVERED)
        assert (got.confirm_method, got.expected, got.confirmed, got.attempts) == ("commitment", 3, 3, 1)
        assert got.confirmed_at and "all 3 instance(s) committed" in got.confirm_note and not got.transaction_uid
        h.wait_job(d, JobState.DELIVERED)
        assert h.confirmed("commitment", "confirmed") == 1

        # a second job: Orthanc loses one instance before the commitment is asked: its report lists it as failed
        d2 = h.job(2)
        h.outbox._senders["pacs"] = Losing(h.outbox.sender("pacs"), orthanc, files[:1], times=1)
        h.outbox.attempt(d2)
        got = h.wait_state(d2, DeliveryState.PENDING)
        h.wait_job(d2, JobState.SENDING)
        assert "storage commitment: expected 3, PACS has 2" in got.reason and "1 failed, reason 0x0112" in got.reason
        assert (got.attempts, got.confirmed, got.expected) == (1, 2, 3)
        assert h.confirmed("commitment", "mismatch") == 1
        h.outbox.attempt(got)  # the retry sends all files again: committed
        got = h.wait_state(d2, DeliveryState.DELIVERED)
        assert (got.attempts, got.confirmed, got.expected) == (2, 3, 3)
        h.wait_job(d2, JobState.DELIVERED)
    finally:
        server.shutdown()


def test_restart_between_commitment_request_and_report(orthanc: Orthanc, tmp_path: Path) -> None:
    """The report of the first request is lost (the node was down: Orthanc could not connect); the restarted
    node finds the delivery awaiting its report in the index, asks again and is confirmed."""
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=32)
    port = free_port()
    put_modality(orthanc, "confirm-b", "SRCONFB", port)  # nothing listens there yet
    cfg = _cfg(tmp_path, _dicom(orthanc, "SRCONFB"))
    first = Harness(tmp_path, cfg, files)
    d = first.job(1)
    with orthanc.client() as c:
        jobs_before = set(c.get("/jobs").json())
    first.outbox.attempt(d)
    sent = first.now(d)
    assert sent.state is DeliveryState.SENT and sent.transaction_uid and len(sent.sop_refs) == 2

    def report_failed() -> bool:  # Orthanc's StorageCommitmentScp job could not reach the node
        with orthanc.client() as c:
            new = [c.get(f"/jobs/{j}").json() for j in set(c.get("/jobs").json()) - jobs_before]
        return any(j["Type"] == "StorageCommitmentScp" and j["State"] == "Failure" for j in new)

    wait_until(report_failed, 30, what="Orthanc's commitment report to fail")
    assert first.now(d).state is DeliveryState.SENT
    first.index.close()

    # "restart": a new index connection, a new outbox; its SCP listens now
    second = Harness(tmp_path, cfg, files, index=Index(tmp_path / "index.sqlite"))
    server = report_listener(port, [second])
    try:
        second.outbox.start()
        second.outbox.resume()  # as the node does once its SCP listens: a new N-ACTION for the delivery left 'sent'
        got = second.wait_state(d, DeliveryState.DELIVERED)
        assert got.transaction_uid == "" and got.confirmed == got.expected == 2 and got.attempts == 1
        second.wait_job(d, JobState.DELIVERED)
    finally:
        second.outbox.stop()
        server.shutdown()


def test_orthanc_that_does_not_know_the_node_is_counted_by_c_find(orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc refuses the N-ACTION of a caller not in its DicomModalities: ``auto`` falls back to C-FIND."""
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=39)
    h = Harness(tmp_path, _cfg(tmp_path, _dicom(orthanc, "SRNOBODY")), files)
    d = h.job(1)
    h.outbox.attempt(d)
    got = h.now(d)
    assert (got.state, got.confirm_method, got.confirmed, got.expected) == (DeliveryState.DELIVERED, "count", 2, 2)
    assert "storage commitment refused (N-ACTION not answered" in got.confirm_note


def test_orthanc_that_lets_no_stranger_query_ends_unconfirmed_not_dead_lettered(tmp_path: Path) -> None:
    """Orthanc with its default ``DicomAlwaysAllowFind`` (false) aborts both the N-ACTION and the C-FIND of a caller
    it does not know: the instances were stored, so the delivery is 'unconfirmed' with both reasons, never resent
    until dead-lettered."""
    pacs = start_orthanc(tmp_path / "orthanc", extra={"DicomAlwaysAllowFind": False})
    try:
        files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=41)
        h = Harness(tmp_path, _cfg(tmp_path, _dicom(pacs, "SRSTRANGER")), files)
        d = h.job(1)
        h.outbox.attempt(d)
        got = h.now(d)
        assert got.state is DeliveryState.UNCONFIRMED and got.confirmed is None and got.attempts == 1
        assert got.confirm_note.startswith(NEITHER)
        assert "N-ACTION not answered" in got.confirm_note and "C-FIND not answered" in got.confirm_note
        assert len(httpx.get(f"{pacs.url}/instances", timeout=10).json()) == 2  # they were stored all the same
    finally:
        pacs.stop()


def test_a_report_that_never_comes_is_a_failed_attempt(orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=33)
    put_modality(orthanc, "confirm-c", "SRCONFC", free_port())  # reports go nowhere
    h = Harness(tmp_path, _cfg(tmp_path, _dicom(orthanc, "SRCONFC"), {"confirm_timeout_s": 0.5,
                                                                     "max_attempts": 1}), files)
    d = h.job(1)
    h.outbox.attempt(d)
    assert h.now(d).state is DeliveryState.SENT
    wait_until(lambda: h.outbox.run_due() == 0 and h.now(d).state is DeliveryState.DEAD_LETTER, 30,
               what="overdue report -> dead-letter")
    got = h.now(d)
    assert "no report within 0.5 s" in got.reason and "after 1 attempt(s)" in got.reason
    assert h.index.job(d.job_id).state is JobState.DEAD_LETTER and h.confirmed("commitment", "overdue") == 1


# ---------------------------------------------------------------------------------------------- counts


def test_orthanc_rest_count_confirms_and_a_persistent_shortfall_dead_letters_with_numbers(
        orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=34)
    dest = {"name": "rest", "kind": "orthanc", "url": orthanc.url}
    h = Harness(tmp_path, _cfg(tmp_path, dest, {"max_attempts": 2}), files)
    d = h.job(1)
    h.outbox.attempt(d)
    got = h.now(d)
    assert (got.state, got.confirm_method, got.confirmed, got.expected) == (DeliveryState.DELIVERED, "count", 3, 3)

    d2 = h.job(2)
    h.outbox._senders["rest"] = Losing(h.outbox.sender("rest"), orthanc, files[1:], times=2)
    h.outbox.attempt(d2)
    assert h.now(d2).state is DeliveryState.PENDING and "expected 3, PACS has 1" in h.now(d2).reason
    h.outbox.attempt(h.now(d2))
    got = h.now(d2)
    assert got.state is DeliveryState.DEAD_LETTER and got.confirmed == 1 and got.expected == 3
    assert got.reason.startswith("after 2 attempt(s): count check: expected 3, PACS has 1")
    job = h.index.job(d2.job_id)
    assert job.state is JobState.DEAD_LETTER and "expected 3, PACS has 1" in job.reason
    assert h.confirmed("count", "mismatch") == 2 and h.confirmed("count", "confirmed") == 1


def test_dicomweb_qido_count_confirms(tmp_path: Path) -> None:
    from tests.support.pacs import orthanc_dicomweb

    web = orthanc_dicomweb(tmp_path / "orthanc")
    try:
        files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=40)
        h = Harness(tmp_path, _cfg(tmp_path, {"name": "web", "kind": "dicomweb", "url": f"{web.url}/dicom-web"}),
                    files)
        d = h.job(1)
        h.outbox.attempt(d)
        got = h.now(d)
        assert (got.state, got.confirm_method, got.confirmed, got.expected) == (DeliveryState.DELIVERED, "count", 2,
                                                                                2)
        # the series loses an instance: QIDO-RS lists one
        d2 = h.job(2)
        h.outbox._senders["web"] = Losing(h.outbox.sender("web"), web, files[:1], times=1)
        h.outbox.attempt(d2)
        assert "count check: expected 2, PACS has 1" in h.now(d2).reason
    finally:
        web.stop()


@pytest.fixture
def dcmqrscp(tmp_path: Path) -> Iterator[int]:
    """dcmtk's dcmqrscp: a real archive that takes C-STORE and answers C-FIND, without Storage Commitment."""
    port, db = free_port(), tmp_path / "qrdb"
    db.mkdir()
    cfg = tmp_path / "dcmqrscp.cfg"
    cfg.write_text(f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                   "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                   f"AETable BEGIN\nQRSCP {db} RW (200, 1024mb) ANY\nAETable END\n")
    proc = subprocess.Popen([DCMQRSCP, "-c", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: subprocess.run([ECHOSCU, "-aec", "QRSCP", "127.0.0.1", str(port)],
                                      capture_output=True).returncode == 0, timeout=20, what="dcmqrscp up")
    yield port
    proc.terminate()
    proc.wait(10)


def test_dcmqrscp_count_fallback_when_commitment_is_refused(dcmqrscp: int, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=35)
    # one association: dcmqrscp answers 0xC000 to concurrent stores into its index (seen once the sender got
    # fast: TCP_NODELAY and files streamed from disk)
    dest = {"name": "qr", "kind": "dicom", "ae_title": "QRSCP", "host": "127.0.0.1", "port": dcmqrscp,
            "timeout_s": 10.0, "associations": 1}
    h = Harness(tmp_path, _cfg(tmp_path, dest), files)
    d = h.job(1)
    h.outbox.attempt(d)
    got = h.now(d)
    assert (got.state, got.confirm_method, got.confirmed, got.expected) == (DeliveryState.DELIVERED, "count", 3, 3)
    assert got.confirm_note.startswith("storage commitment refused") and "3 of 3" in got.confirm_note
    # confirm = "commitment" with this peer: refused for good, not retried (one association: dcmqrscp answers
    # 0xC000 to concurrent re-stores of instances its index already holds)
    strict = Harness(tmp_path / "strict", _cfg(tmp_path / "strict", {**dest, "confirm": "commitment"}), files)
    (tmp_path / "strict").mkdir(exist_ok=True)
    d = strict.job(2)
    strict.outbox.attempt(d)
    got = strict.now(d)
    assert got.state is DeliveryState.DEAD_LETTER and "refuses Storage Commitment" in got.reason


def test_storescp_supports_neither_and_ends_unconfirmed(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "in"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run([ECHOSCU, "-aec", "STORESCP", "127.0.0.1", str(port)],
                                          capture_output=True).returncode == 0, timeout=20, what="storescp up")
        files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=36)
        dest = {"name": "scp", "kind": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                "timeout_s": 10.0}
        h = Harness(tmp_path, _cfg(tmp_path, dest), files)
        d = h.job(1)
        h.outbox.attempt(d)
        got = h.now(d)
        assert got.state is DeliveryState.UNCONFIRMED and got.confirm_note.startswith(NEITHER) and got.confirmed is None
        assert len(list(out.iterdir())) == 2
        job = h.index.job(d.job_id)
        assert job.state is JobState.DELIVERED and f"scp: sent, unconfirmed: {NEITHER}" in job.reason
        assert h.confirmed("count", "unconfirmed") == 1
        line = job_line(job_dict(h.index, job))  # `srnode status`: the note once, not the job's copy of it too
        assert line.count(NEITHER) == 1 and line.startswith("scp:unconfirmed ["), line
    finally:
        proc.terminate()
        proc.wait(10)


def test_folder_and_none_are_delivered_but_not_confirmed(orthanc: Orthanc, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=37)
    folder = Harness(tmp_path / "f", _cfg(tmp_path / "f", {"name": "out", "kind": "folder",
                                                            "path": str(tmp_path / "out")}), files)
    d = folder.job(1)
    folder.outbox.attempt(d)
    got = folder.now(d)
    assert (got.state, got.confirm_method, got.confirmed) == (DeliveryState.DELIVERED, "none", None)
    assert "fsync" in got.confirm_note
    none = Harness(tmp_path / "n", _cfg(tmp_path / "n", {"name": "rest", "kind": "orthanc", "url": orthanc.url,
                                                          "confirm": "none"}), files)
    d = none.job(1)
    none.outbox.attempt(d)
    got = none.now(d)
    assert (got.state, got.confirm_method, got.confirm_note) == (DeliveryState.DELIVERED, "none",
                                                                 "not confirmed (confirm = none)")


def test_commitment_for_a_web_destination_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"destinations\[0\]\.confirm: 'commitment'"):
        _cfg(tmp_path, {"name": "rest", "kind": "orthanc", "url": "http://x", "confirm": "commitment"})


# ---------------------------------------------------------------------------------------------- the real node


def test_real_node_confirmed_by_commitment_after_a_restart(orthanc: Orthanc, tmp_path: Path) -> None:
    """The real node: its first commitment report cannot reach it (Orthanc knows it at a wrong port), the job
    waits in 'sending' with the delivery 'sent'; once Orthanc knows the right port, a restart asks again, the
    node's own SCP takes the report, and ``srnode status`` shows the confirmation."""
    put_modality(orthanc, "confirm-node", "SRNODE", free_port())
    sections = {"destinations": [_dicom(orthanc, "SRNODE", name="pacs")],
                "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"],
                           "through_plane_factor": 2}],
                "node": {"require_known_callers": False}}
    files = write_phantom_series(tmp_path / "ct", slices=3, size=32, seed=38)
    with NodeProc.start(tmp_path / "node", sections) as node:
        assert storescu(files, node.port).returncode == 0, STORESCU
        (job,) = node.wait_jobs(lambda js: js and js[-1]["deliveries"]
                                and js[-1]["deliveries"][0]["state"] == "sent", timeout=120, what="sent")
        assert job["state"] == "sending"
        put_modality(orthanc, "confirm-node", "SRNODE", node.port)
        node.restart()
        (job,) = node.wait_jobs(lambda js: js[-1]["state"] == "delivered", timeout=60, what="delivered")
        (d,) = job["deliveries"]
        n = d["files"]
        assert d["state"] == "delivered" and d["confirmation"]["method"] == "commitment"
        assert d["confirmation"]["confirmed"] == d["confirmation"]["expected"] == n and d["confirmation"]["confirmed_at"]
        r = node.cli("status")
        assert r.returncode == 0 and f"confirmed by commitment {n}/{n} at" in r.stdout, r.stdout
        metrics = httpx.get(f"{node.http_url}/metrics", timeout=10).text
        assert 'srnode_delivery_confirmations_total{destination="pacs",method="commitment",outcome="confirmed"} 1.0' \
            in metrics


def _send_report(port: int, calling: str, uid: str, refs: Sequence[Sequence[str]],
                 failed: Sequence[Sequence[str]] = ()) -> int:
    """An N-EVENT-REPORT for ``refs`` under ``uid``, from AE ``calling`` (event 1: all committed; with ``failed``,
    event 2 listing those as failed, reason 0x0110)."""
    from pydicom.dataset import Dataset
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = StorageCommitmentPushModel, False, True
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE", ext_neg=[role])
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = uid
    items = []
    for _, _, cls, sop in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, sop
        items.append(item)
    info.ReferencedSOPSequence = items
    if failed:
        info.FailedSOPSequence = []
        for _, _, cls, sop in failed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID, item.FailureReason = cls, sop, 0x0110
            info.FailedSOPSequence.append(item)
    status, _ = assoc.send_n_event_report(info, 2 if failed else 1, StorageCommitmentPushModel,
                                          "1.2.840.10008.1.20.1.1")
    assoc.release()
    return int(status.Status)


def test_a_report_listing_an_instance_both_committed_and_failed_is_a_failed_attempt(tmp_path: Path) -> None:
    """break13p: a report (event 2) listing every instance in ReferencedSOPSequence and one of them again in
    FailedSOPSequence was "all 3 committed", delivered. The PACS said it failed: a failed attempt, resent."""
    files = write_phantom_series(tmp_path / "ct", slices=3, size=16, seed=42)
    pacs = _Pacs(0.0)  # a real PACS that takes the N-ACTION and sends nothing else
    dest = {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
    h = Harness(tmp_path, _cfg(tmp_path, dest), files)
    server = None
    try:
        d = h.job(1)
        assert h.outbox.confirm.after_send(d, files) is False
        sent = h.now(d)
        port = free_port()
        server = report_listener(port, [h])
        assert _send_report(port, "PACS", sent.transaction_uid, sent.sop_refs, failed=sent.sop_refs[1:2]) == 0
        got = h.now(d)
        assert got.state is DeliveryState.PENDING and "expected 3, PACS has 2" in got.reason, (got.state, got.reason)
        assert "1 failed, reason 0x0110" in got.reason
    finally:
        if server is not None:
            server.shutdown()
        pacs.server.shutdown()


def test_a_report_from_another_ae_does_not_confirm(tmp_path: Path) -> None:
    """A third party that learnt the transaction UID (it is logged, and travels in clear) cannot make a delivery
    'delivered': only the destination's AE title, from its host's address, settles it."""
    files = write_phantom_series(tmp_path / "ct", slices=3, size=16, seed=41)
    pacs = _Pacs(0.0)  # a real PACS that takes the N-ACTION and sends nothing else
    dest = {"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}
    h = Harness(tmp_path, _cfg(tmp_path, dest), files)
    server = None
    try:
        d = h.job(1)
        assert h.outbox.confirm.after_send(d, files) is False
        sent = h.now(d)
        port = free_port()
        server = report_listener(port, [h])
        assert _send_report(port, "EVIL", sent.transaction_uid, sent.sop_refs) == 0x0110
        assert h.now(d).state is DeliveryState.SENT and h.now(d).transaction_uid == sent.transaction_uid
        assert _send_report(port, "PACS", sent.transaction_uid, sent.sop_refs) == 0
        got = h.now(d)
        assert got.state is DeliveryState.DELIVERED and got.confirmed == 3
    finally:
        if server is not None:
            server.shutdown()
        pacs.server.shutdown()


def test_an_orthanc_answer_that_is_not_json_is_a_counted_attempt(tmp_path: Path) -> None:
    """A 200 with an HTML body to POST /instances (a proxy's page, not Orthanc) raised a bare JSONDecodeError out of
    the outbox's attempt: never counted, the loop resent the delivery every 0.5 s forever. Now: retried with
    backoff, dead-lettered after max_attempts, the reason says what came back."""
    import http.server
    import threading

    posts: list[int] = []

    class Html(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(1)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "15")
            self.end_headers()
            self.wfile.write(b"<html>ok</html>")

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Html)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        files = write_phantom_series(tmp_path / "ct", slices=3, size=16, seed=43)
        h = Harness(tmp_path, _cfg(tmp_path, {"name": "pacs", "kind": "orthanc", "url": f"http://127.0.0.1:{port}",
                                              "parallel": 3}), files)
        d = h.job(1)
        for _ in range(3):
            h.outbox.attempt(h.now(d))
        got = h.now(d)
        assert got.state is DeliveryState.DEAD_LETTER and got.attempts == 3, (got.state, got.attempts)
        assert "not Orthanc's JSON" in got.reason
    finally:
        srv.shutdown()


def test_an_unexpected_sender_exception_is_a_counted_attempt(tmp_path: Path) -> None:
    class Broken:
        name = "pacs"

        def send(self, paths: Sequence[Path]) -> None:
            raise RuntimeError("a client library bug")

    files = write_phantom_series(tmp_path / "ct", slices=2, size=16, seed=44)
    h = Harness(tmp_path, _cfg(tmp_path, {"name": "pacs", "kind": "folder", "path": str(tmp_path / "out")}), files)
    d = h.job(1)
    h.outbox._senders["pacs"] = Broken()
    h.outbox.attempt(h.now(d))
    got = h.now(d)
    assert got.state is DeliveryState.PENDING and got.attempts == 1 and "RuntimeError" in got.reason


# ---------------------------------------------------------------------------------------------- a PACS that fails


class _Pacs:
    """A pynetdicom PACS on a free port that answers C-STORE Success, stores nothing, accepts Storage Commitment
    and C-FIND, and answers both after ``delay`` seconds (an empty C-FIND: nothing stored)."""

    def __init__(self, delay: float) -> None:
        from pynetdicom import AllStoragePresentationContexts
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

        self.port, self.stored = free_port(), 0
        ae = AE(ae_title="SLOWPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(StorageCommitmentPushModel)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)

        def on_store(event: Any) -> int:
            self.stored += 1
            return 0x0000

        def on_action(event: Any) -> Any:
            time.sleep(delay)  # the slow PACS itself
            return 0x0000, None

        def on_find(event: Any) -> Any:
            time.sleep(delay)
            yield 0x0000, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action), (evt.EVT_C_FIND, on_find)])

    def dest(self, **extra: Any) -> dict[str, Any]:
        return {"name": "pacs", "kind": "dicom", "ae_title": "SLOWPACS", "host": "127.0.0.1", "port": self.port,
                "timeout_s": 2.0, **extra}


@pytest.mark.parametrize("confirm", ["auto", "count"])
def test_a_pacs_that_vanishes_after_the_c_stores_is_a_failed_attempt(tmp_path: Path, confirm: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted C-STOREs, then the PACS is gone (crash, restart) before confirming: no association at all is a
    failed attempt to retry, never 'unconfirmed' (which settles the job) nor a non-retryable refusal."""
    pacs = _Pacs(0.0)
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=43)
    h = Harness(tmp_path, _cfg(tmp_path, pacs.dest(confirm=confirm)), files)
    from node.send import dimse

    original = dimse.DimseSender.send

    def send_then_vanish(self: Any, paths: Any) -> None:  # the PACS shuts down right after its last Success
        original(self, paths)
        pacs.server.shutdown()

    monkeypatch.setattr(dimse.DimseSender, "send", send_then_vanish)
    d = h.job(1)
    h.outbox.attempt(d)
    got = h.now(d)
    assert pacs.stored == 2
    assert got.state is DeliveryState.PENDING and got.attempts == 1, (got.state, got.confirm_note)
    assert h.index.job(d.job_id).state is JobState.SENDING


def test_a_pacs_slower_than_timeout_is_a_failed_attempt_not_a_refusal(tmp_path: Path) -> None:
    """The N-ACTION and C-FIND answered after the destination's timeout_s: our own DIMSE timeout ends them, which
    is a failed attempt (retried), not 'the peer refuses'."""
    pacs = _Pacs(3.0)
    try:
        files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=44)
        h = Harness(tmp_path, _cfg(tmp_path, pacs.dest()), files)
        d = h.job(1)
        h.outbox.attempt(d)
        got = h.now(d)
        assert got.state is DeliveryState.PENDING and got.attempts == 1, (got.state, got.confirm_note)
    finally:
        pacs.server.shutdown()


# ---------------------------------------------------------------------------------------------- a PACS that caps answers


@pytest.fixture(scope="module")
def capped_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc (REST, DICOMweb, C-FIND) answering at most 5 instances per query (``LimitFindInstances``, a common
    setting to protect a large PACS)."""
    o = start_orthanc(tmp_path_factory.mktemp("capped"), plugins=[ORTHANC_PLUGINS / "libOrthancDicomWeb.so"],
                      extra={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "LimitFindInstances": 5,
                             "LimitFindResults": 5})
    yield o
    o.stop()


def _attempt_past_server_errors(h: Harness, d: Delivery, tries: int = 3) -> Delivery:
    """Attempt ``d`` until it is no longer pending on an HTTP 5xx: a PACS's passing server error leaves the delivery
    pending and the outbox retries it (CI once saw Orthanc 1.10.1 answer one upload HTTP 500 here); what the tests
    below check is the count, not that a PACS never fails."""
    got = h.now(d)
    for _ in range(tries):
        h.outbox.attempt(got)
        got = h.now(d)
        if not (got.state is DeliveryState.PENDING and ": HTTP 5" in got.reason):
            break
    return got


@pytest.mark.parametrize("kind", ["dicom", "orthanc", "dicomweb"])
def test_a_pacs_that_answers_a_page_of_the_series_is_still_counted_whole(tmp_path: Path, capped_orthanc: Orthanc,
                                                                         kind: str) -> None:
    """Found by break13p: an Orthanc answering at most 5 instances per query held all 12 sent, yet the count found
    6 (QIDO-RS, REST /tools/find) or failed (C-FIND ended 0xFE00): every attempt resent the delivery, which was
    dead-lettered "expected 12, PACS has 6". Instances the series' answer leaves out are asked for one by one."""
    files = write_phantom_series(tmp_path / "ct", slices=12, size=16, seed=81)
    dest = {"dicom": {"name": "pacs", "kind": "dicom", "ae_title": capped_orthanc.aet, "host": "127.0.0.1",
                      "port": capped_orthanc.dicom_port, "confirm": "count", "timeout_s": 10.0},
            "orthanc": {"name": "pacs", "kind": "orthanc", "url": capped_orthanc.url},
            "dicomweb": {"name": "pacs", "kind": "dicomweb", "url": f"{capped_orthanc.url}/dicom-web"}}[kind]
    h = Harness(tmp_path, _cfg(tmp_path, dest), files)
    d = h.job(1)
    got = _attempt_past_server_errors(h, d)
    assert got.state is DeliveryState.DELIVERED and got.confirmed == 12, \
        (got.state, got.reason, got.confirm_note, capped_orthanc.log()[-2000:])
    d2 = h.job(2)  # the PACS loses two of them after accepting them: still two missing
    h.outbox._senders["pacs"] = Losing(h.outbox.sender("pacs"), capped_orthanc, files[3:5], times=1)
    h.outbox.attempt(d2)
    got = h.now(d2)
    assert got.state is DeliveryState.PENDING and "expected 12, PACS has 10" in got.reason, got.reason
    h.outbox.attempt(h.now(d2))  # resent: all 12 held again
    assert h.now(d2).state is DeliveryState.DELIVERED


def test_a_report_from_a_stranger_is_not_decoded(tmp_path: Path) -> None:
    """hostile17: the Storage Commitment context is open to any caller of the node's AE title, and the report was
    decoded before its sender was checked: 11 MB of event information listing 160,000 references (within the
    16 MiB a data set may take in memory) cost the real node 12.8 s of CPU and ~350 MB (an in-process measure;
    32 associations at once: ~11 GB), then 0x0110. Now a report from an AE title and address that are no DICOM
    destination's is answered 0x0110 without being decoded."""
    from tests.support.nodeproc import NodeProc

    node = NodeProc.start(tmp_path / "node", {"node": {"stable_age_s": 3600}})
    try:
        pid = node.proc.pid if node.proc else 0

        def hwm_mb() -> int:
            text = Path(f"/proc/{pid}/status").read_text()
            return next(int(line.split()[1]) // 1024 for line in text.splitlines() if line.startswith("VmHWM"))

        before = hwm_mb()
        refs = [("", "", "1.2.840.10008.5.1.4.1.1.2", f"1.2.3.4.5.6.7.8.9.{i}") for i in range(160_000)]
        assert _send_report(node.port, "EVIL", "1.2.3.4.5", refs) == 0x0110
        grown = hwm_mb() - before
        assert grown < 150, f"the node grew by {grown} MB for a stranger's report"  # 11 MB received; before ~350
        assert node.echo()
    finally:
        node.stop()
    log = node.log()
    assert "storage commitment report from EVIL@127.0.0.1 ignored unread" in log, log[-2000:]
    assert "no delivery awaits it" not in log  # before: decoded, then found to concern no delivery


class _CountHangs:
    """An Orthanc REST stand-in that takes every upload (``POST /instances``: Success) and holds every count
    (``POST /tools/find``) until ``release`` is set: a PACS whose query side hangs while the node is killed."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        self.release = threading.Event()
        release = self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, obj: Any) -> None:
                body = json.dumps(obj).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the node was killed while it waited

            def do_GET(self) -> None:
                self._json({})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/instances"):
                    self._json({"ID": "x", "Status": "Success"})
                else:
                    release.wait(120)
                    self._json([])

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_delivery_awaiting_a_count_from_a_removed_destination_does_not_stop_the_outbox(tmp_path: Path) -> None:
    """break19: the node killed -9 while a delivery to 'pacs' awaited its count check (state 'sent'), then
    config.toml edited to remove 'pacs' (the rule now sends to the folder 'out'), the node started again. Before:
    the start's re-check raised "no destination named 'pacs'" out of the outbox's resume, and once the delivery's
    confirmation deadline passed out of every pass of the outbox (86 ERROR tracebacks in 40 s): job 2's delivery to
    'out' stayed pending for ever, job 1 'sending' "pacs:sent [awaiting count of 11]". Now the re-check's failure
    is that delivery's own attempt: job 1 dead-lettered naming the missing destination, job 2 delivered."""
    from node.config.dump import dump_toml
    from tests.support.nodeproc import NodeProc

    pacs = _CountHangs()
    folder = {"name": "out", "kind": "folder", "path": str(tmp_path / "out")}
    dests = [{"name": "pacs", "kind": "orthanc", "url": f"http://127.0.0.1:{pacs.port}", "confirm": "count",
              "timeout_s": 60.0}, folder]
    rule = {"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2}
    node = NodeProc.start(tmp_path / "node", {"destinations": dests, "rules": [{**rule, "destinations": ["pacs"]}],
                                              "outbox": {"confirm_timeout_s": 1.0}})
    try:
        storescu(write_phantom_series(tmp_path / "a", slices=6, size=64, step_mm=5.0, seed=1), node.port)
        node.wait_jobs(lambda js: js and any(str(d["state"]) == "sent" for d in js[0]["deliveries"]), 60,
                       what="job 1's delivery awaiting its count")
        node.kill9()
        pacs.release.set()
        node.config["destinations"] = [folder]
        node.config["rules"] = [{**rule, "destinations": ["out"]}]
        node.config_path.write_text(dump_toml(node.config))
        node.launch()
        storescu(write_phantom_series(tmp_path / "b", slices=6, size=64, step_mm=5.0, seed=2), node.port)
        jobs = node.wait_jobs(lambda js: len(js) == 2 and str(js[1]["state"]) == "delivered"
                              and str(js[0]["state"]) == "dead-letter", 60,
                              what="job 2 delivered to 'out', job 1 dead-lettered")
    finally:
        node.stop()
        pacs.close()
    (d1,) = jobs[0]["deliveries"]
    assert "no destination named 'pacs'" in d1["reason"], d1
    assert "outbox: destinations" not in node.log()  # the outbox's pass never failed


# ---------------------------------------------------------------------------------------------- ops19: asked once


def _commitment_jobs(orthanc: Orthanc, before: set[str]) -> list[dict[str, Any]]:
    with orthanc.client() as c:
        new = [c.get(f"/jobs/{j}").json() for j in set(c.get("/jobs").json()) - before]
    return [j for j in new if j["Type"] == "StorageCommitmentScp"]


def test_resume_does_not_ask_again_for_a_delivery_this_process_sent(orthanc: Orthanc, tmp_path: Path) -> None:
    """ops19: the node started its outbox before the start-up resume ran; a pending delivery sent by the first pass
    (transaction T1) was then asked again by the resume (T2, 70 ms later) and T1's report found "no delivery
    awaits it". Now resume asks only for transactions this process did not open."""
    files = write_phantom_series(tmp_path / "ct", slices=2, size=32, seed=61)
    put_modality(orthanc, "confirm-o19", "SRCONO19", free_port())  # reports cannot come: the delivery stays 'sent'
    h = Harness(tmp_path, _cfg(tmp_path, _dicom(orthanc, "SRCONO19")), files)
    d = h.job(1)
    with orthanc.client() as c:
        before = set(c.get("/jobs").json())
    h.outbox.attempt(d)  # the outbox's first pass sent it: transaction T1
    sent = h.now(d)
    assert sent.state is DeliveryState.SENT and sent.transaction_uid
    h.outbox.confirm.resume()  # the start-up resume that follows: nothing was left by a stopped node
    assert h.now(d).transaction_uid == sent.transaction_uid  # not asked again under a new transaction
    assert len(_commitment_jobs(orthanc, before)) == 1


def test_real_node_restarted_with_a_pending_delivery_asks_once_and_says_so(orthanc: Orthanc, tmp_path: Path) -> None:
    """ops19, as hospital IT saw it: the PACS down (the delivery pending, retried every second), the node stopped
    with SIGTERM, then both back: exactly one Storage Commitment request, no "no delivery awaits it", and the start
    line counts the resumed delivery; a job's run (selfsup) leaves nothing in incoming/ for the next start to
    remove (before: torch's torchinductor_<user>/ folder, counted "1 partial file(s) removed")."""
    port = free_port()
    sections = {"destinations": [{**_dicom(orthanc, "SRNODE", name="pacs"), "port": free_port()}],  # PACS "down"
                "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"],
                           "through_plane_factor": 2}],
                "engine": {"name": "selfsup", "device": "cpu", "fast": True, "finetune_steps": 5, "tta_passes": 1,
                           "samples": 2},
                "outbox": {"max_attempts": 100, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
                "node": {"require_known_callers": False, "port": port}}
    files = write_phantom_series(tmp_path / "ct", slices=4, size=64, seed=62)
    with NodeProc.start(tmp_path / "node", sections) as node:
        put_modality(orthanc, "confirm-o19n", "SRNODE", node.port)
        assert storescu(files, node.port).returncode == 0, STORESCU
        node.wait_jobs(lambda js: js and js[-1]["deliveries"] and js[-1]["deliveries"][0]["attempts"] >= 2,
                       timeout=180, what="delivery failing")
        node.restart({"destinations": [_dicom(orthanc, "SRNODE", name="pacs")]})  # PACS back, node restarted
        (job,) = node.wait_jobs(lambda js: js[-1]["state"] == "delivered", timeout=60, what="delivered")
        log = node.log().split("===== start 2 =====")[1]
        assert log.count("storage commitment of") == 1, log
        assert "no delivery awaits it" not in log, log
        assert "1 delivery(ies) resumed (1 to send, 0 awaiting confirmation" in log, log
        assert "0 partial file(s) removed" in log and "spool incoming/: removed" not in log, log
