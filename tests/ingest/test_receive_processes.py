"""``[node] receive_processes = 2`` (``node.ingest.procs``): the real node receiving in its main process and in one
child on the same port (SO_REUSEPORT), with real dcmtk ``storescu`` senders.

- a burst of associations lands every instance once in the index (and once on disk), the series is processed
  once, both processes received some of it, the metrics and the audit log count every process, and SIGTERM
  stops the child before the node;
- ``max_associations`` is one limit for both processes;
- a child killed -9 is restarted (one line) and receives again; a kill -9 of the node ends its child, and the
  node starts again at once on the same port;
- a port another program listens on stops the start with one line (SO_REUSEPORT would share it otherwise);
- Storage Commitment N-EVENT-REPORTs reach the main process whichever process receives them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]

from node.bench.ingest import write_series
from node.store import Index
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu, wait_until

TWO = {"node": {"receive_processes": 2}}


def start(workdir: Path, extra: dict[str, Any] | None = None) -> NodeProc:
    sections: dict[str, Any] = {"node": {**TWO["node"], **(extra or {}).get("node", {})}}
    sections.update({k: v for k, v in (extra or {}).items() if k != "node"})
    node = NodeProc.start(workdir, sections)
    wait_until(lambda: " ready (DICOM " in node.log(), timeout=60, what="the node ready (its child listening)")
    return node


def child_pid(node: NodeProc) -> int:
    """The child's pid, from the last start or restart line of the node's log."""
    pids = re.findall(r"receiving processes on port \d+ \(pids (\d+) and|receiving process 1 \(pid (\d+)\) listening "
                      r"again", node.log())
    assert pids, node.log()[-2000:]
    return int(next(p for p in pids[-1] if p))


def gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie nobody reaped)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def send_parts(parts: list[list[Path]], port: int, calling: str = "CT01") -> list[int]:
    codes: list[int] = [-1] * len(parts)

    def one(i: int) -> None:
        codes[i] = storescu(parts[i], port, calling=calling).returncode

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_a_burst_of_associations_lands_every_instance_once_and_the_series_is_processed_once(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 5, 96, 64, tag="burst-")
    node = start(tmp_path / "node", {"node": {"stable_age_s": 3.0}})
    try:
        parts = [files[i::12] for i in range(12)] + [files[:10]]  # 12 associations, and one resending 10
        assert send_parts(parts, node.port) == [0] * 13
        jobs = node.wait_jobs(lambda js: js and js[-1]["state"] == "delivered", timeout=180,
                              what="the series processed and delivered")
        assert len(jobs) == 1 and jobs[0]["instances"] == len(files), jobs
        idx = Index(node.spool / "index.sqlite")
        assert idx.count_instances() == len(files)
        assert len(list((node.spool / "instances").rglob("*.dcm"))) == len(files)
        log = node.log()
        by_child = len(re.findall(r"receiver 1: association from CT01@", log))
        by_main = len(re.findall(r"INFO    node\.ingest\.scp: association from CT01@", log))
        assert by_child + by_main == 13 and by_child and by_main, (by_child, by_main)

        def counted() -> bool:
            text = httpx.get(f"{node.http_url}/metrics", timeout=10).text
            ok = metric(text, 'srnode_instances_received_total{status="0x0000"}')
            return ok == len(files) + 10 and metric(text, "srnode_active_associations") == 0.0

        wait_until(counted, timeout=30, what="the metrics of both processes")
        records = [json.loads(line) for line in (node.spool / "audit.log").read_text().splitlines()]
        assert sum(1 for r in records if r["event"] == "association" and r["calling_ae"] == "CT01") == 13
        assert node.stop() == 0
        log = node.log()
        assert log.index("receiver 1: DICOM SCP stopped") < log.index("node.app.service: stopped")
    finally:
        node.kill9()


def test_max_associations_is_one_limit_for_every_process(tmp_path: Path) -> None:
    node = start(tmp_path / "node", {"node": {"max_associations": 2}})
    ae = AE(ae_title="ECHO1")
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(2):
            a = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
            assert a.is_established
            held.append(a)
        for _ in range(4):  # wherever the kernel sends them, both processes count the same two
            a = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
            assert a.is_rejected, "a third association was accepted with max_associations = 2"
        held.pop().release()

        def accepted() -> bool:
            a = ae.associate("127.0.0.1", node.port, ae_title="SRNODE")
            if a.is_established:
                held.append(a)
                return True
            return False

        wait_until(accepted, timeout=20, interval=0.3, what="a slot given back after a release")
    finally:
        for a in held:
            a.release()
        node.stop()


def test_a_killed_child_is_restarted_and_a_killed_node_takes_its_child_along(tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 6, 24, 64, tag="restart-")
    node = start(tmp_path / "node")
    try:
        first = child_pid(node)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: f"receiving process 1 (pid {first}) ended with exit code -9: restarted" in node.log(),
                   timeout=30, what="the restart line")
        wait_until(lambda: "listening again" in node.log(), timeout=60, what="the child listening again")
        second = child_pid(node)
        assert second != first
        assert send_parts([files[i::6] for i in range(6)], node.port) == [0] * 6
        node.kill9()
        wait_until(lambda: gone(second), timeout=20, what="the child ended with the node (PR_SET_PDEATHSIG)")
        node.launch()  # the same port at once
        wait_until(lambda: " ready (DICOM " in node.log().rsplit("===== start", 1)[-1], timeout=60, what="ready")
        assert Index(node.spool / "index.sqlite").count_instances() == len(files)
        assert node.stop() == 0
    finally:
        node.kill9()


def test_a_port_another_program_listens_on_stops_the_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would share it with the node's processes
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        node = NodeProc.start(tmp_path / "node", {"node": {"receive_processes": 2, "port": port}}, wait=False)
        try:
            assert node.proc is not None
            code = node.proc.wait(60)
        finally:
            node.kill9()
    assert code != 0
    assert f"DICOM port 127.0.0.1:{port} ([node] host, port): in use by another program" in node.log(), \
        node.log()[-2000:]


def _report(port: int, calling: str) -> int:
    """An N-EVENT-REPORT for a transaction nobody opened, from ``calling``: the status the node answers."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = StorageCommitmentPushModel, False, True
    assoc = ae.associate("127.0.0.1", port, ae_title="SRNODE", ext_neg=[role])
    assert assoc.is_established
    info = Dataset()
    info.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    info.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_event_report(info, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
    assoc.release()
    return int(status.Status)


def test_commitment_reports_reach_the_main_process_whichever_process_receives_them(tmp_path: Path) -> None:
    node = start(tmp_path / "node")
    child = r"INFO    node\.ingest\.scp: receiver 1: association from PACS@"
    try:
        statuses = [_report(node.port, "PACS") for _ in range(12)]
        # the kernel's hash picks the process: go on (at most 64 in all) until one report went to the child
        while len(statuses) < 64 and not re.search(child, node.log()):
            statuses.append(_report(node.port, "PACS"))
        assert statuses == [0x0110] * len(statuses)  # no delivery awaits
        log = node.log()
        assert re.search(child, log), "64 reports, none went to the child"
        ignored = re.findall(r"(receiver 1: )?storage commitment report for transaction [0-9.]+: no delivery", log)
        assert ignored == [""] * len(statuses), ignored  # every one recorded (here: looked up) by the main process
    finally:
        node.stop()


def test_shared_slots_are_one_limit_and_a_dead_owner_gives_all_back() -> None:
    from node.ingest.procs import SharedSlots

    slots = SharedSlots(3)
    main, child = slots.owner(0), slots.owner(1)
    assert [main.take(), child.take(), child.take(), main.take(), child.take()] == [True, True, True, False, False]
    slots.reset(1)  # the child died holding two
    assert slots.held == 1 and child.take() and main.take() and not main.take()
    main.give()
    assert slots.held == 2


def test_metrics_relay_adds_the_childrens_differences_and_takes_back_a_dead_childs_gauges() -> None:
    from node.ingest.procs import MetricsRelay, metric_snapshot
    from node.metrics import Metrics

    main, child = Metrics.create(), Metrics.create()
    relay = MetricsRelay(main)
    main.instances_received.labels(status="0x0000").inc(5)
    child.instances_received.labels(status="0x0000").inc(3)
    child.active_associations.inc(2)
    relay.apply(1, metric_snapshot(child))
    child.instances_received.labels(status="0x0000").inc(4)
    child.active_associations.dec()
    relay.apply(1, metric_snapshot(child))
    relay.apply(1, metric_snapshot(child))  # the same again: nothing more
    got = metric_snapshot(main)
    assert got[("srnode_instances_received", (("status", "0x0000"),))] == 12
    assert got[("srnode_active_associations", ())] == 1
    relay.forget(1)  # it died with one association open
    got = metric_snapshot(main)
    assert got[("srnode_active_associations", ())] == 0
    assert got[("srnode_instances_received", (("status", "0x0000"),))] == 12
