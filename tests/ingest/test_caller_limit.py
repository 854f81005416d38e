"""One caller cannot hold every association slot: ``[node] max_associations_per_caller`` bounds the associations
one caller (calling AE title + peer address) has open at once; beyond it an A-ASSOCIATE-RJ (transient, "local
limit exceeded"), one log line and one audit record, while other modalities still get in. ``[node]
idle_timeout_s`` closes an association that says nothing (peer13b)."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from node.config import DicomDestination, config_from_dict
from node.errors import ConfigError
from node.send import make_sender
from tests.ingest.test_scp import start_scp
from tests.support.nodeproc import NodeProc
from tests.support.peers import ECHOSCU, wait_until

LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, DUL service-provider (presentation), local limit exceeded (PS3.8)


def _associate(port: int, calling: str = "HOG", source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="SRNODE", bind_address=(source, 0))


def _rejection(assoc: Any) -> tuple[int, int, int] | None:
    if not assoc.is_rejected:
        return None
    p = assoc.acceptor.primitive
    return int(p.result), int(p.result_source), int(p.diagnostic)


def _echoscu(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ECHOSCU, "-aet", "CT01", "-aec", "SRNODE", "-to", "5", "-ta", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def _audit(node: NodeProc) -> list[dict[str, Any]]:
    path = node.spool / "audit.log"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def test_one_caller_cannot_hold_every_slot(tmp_path: Path) -> None:
    """The real node, 6 slots, 2 per caller: a caller opening 6 associations (and keeping them, as one echoing
    every < 60 s would) gets 2; the same AE title from another address is another caller; a modality still
    gets in; a released slot is the caller's again. Before: the first caller took all 6 and dcmtk echoscu got
    "local limit exceeded"."""
    with NodeProc.start(tmp_path / "node", {"node": {"max_associations": 6, "max_associations_per_caller": 2,
                                                     "stable_age_s": 3600}}) as node:
        held: list[Any] = []
        try:
            first = [_associate(node.port) for _ in range(6)]
            held += first
            assert [_rejection(a) for a in first] == [None, None] + [LOCAL_LIMIT] * 4, node.log()[-2000:]
            other = [_associate(node.port, source="127.0.0.2") for _ in range(3)]
            held += other
            assert [_rejection(a) for a in other] == [None, None, LOCAL_LIMIT]
            ok = _echoscu(node.port)
            assert ok.returncode == 0, ok.stdout + ok.stderr
            assert first[0].send_c_echo().Status == 0x0000  # the caller's own associations go on
            first[0].release()
            again = _associate(node.port)
            held.append(again)
            assert _rejection(again) is None and again.is_established
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        wait_until(lambda: len([a for a in _audit(node) if a["event"] == "association-rejected"]) >= 5, timeout=10,
                   what="the rejections audited")
        log = node.log()
    rejected = [a for a in _audit(node) if a["event"] == "association-rejected"]
    assert len(rejected) == 5, rejected
    assert {(a["calling_ae"], a["address"]) for a in rejected} == {("HOG", "127.0.0.1"), ("HOG", "127.0.0.2")}
    assert all("node.max_associations_per_caller = 2" in a["reason"] for a in rejected), rejected
    lines = [ln for ln in log.splitlines() if "max_associations_per_caller" in ln and "rejected" in ln]
    assert len(lines) == 5, lines  # one line per rejection, nothing from pynetdicom's own limit
    assert "HOG@127.0.0.1" in lines[0] and "2 open" in lines[0], lines[0]


def test_requests_at_the_same_moment_get_exactly_the_limit(tmp_path: Path) -> None:
    """Four associations of one caller requested at once against a limit of 2: exactly 2 accepted (counting
    every association still being negotiated refused all four at once)."""
    scp = start_scp(tmp_path, max_associations=10, max_associations_per_caller=2)
    held: list[Any] = []
    try:
        for _ in range(5):
            with ThreadPoolExecutor(4) as pool:
                burst = list(pool.map(lambda _: _associate(scp.cfg.node.port), range(4)))
            held += burst
            assert sorted(str(_rejection(a)) for a in burst) == sorted(["None"] * 2 + [str(LOCAL_LIMIT)] * 2)
            for a in burst:
                if a.is_established:
                    a.release()
            wait_until(lambda b=burst: all(not a.is_alive() for a in b), timeout=10,  # type: ignore[misc]
                       what="the burst's associations ended")
    finally:
        for a in held:
            if a.is_established:
                a.release()
        scp.stop()


def test_srnode_delivering_over_more_associations_than_a_peer_allows_uses_those_it_gets(tmp_path: Path) -> None:
    """A destination (srnode itself here) that allows 2 associations per caller, a sender configured for 4: the
    delivery goes over the associations the peer accepts, every instance stored once (before: the rejected
    ones failed the delivery, retried until dead-lettered)."""
    scp = start_scp(tmp_path, max_associations_per_caller=2)
    files = write_phantom_series(tmp_path / "in", slices=24, size=16)
    try:
        for _ in range(3):
            make_sender(DicomDestination(name="peer", ae_title="SRNODE", host="127.0.0.1",
                                         port=scp.cfg.node.port, associations=4)).send(files)
            assert scp.admission.index.count_instances() == 24
    finally:
        scp.stop()


def test_zero_turns_the_per_caller_limit_off(tmp_path: Path) -> None:
    scp = start_scp(tmp_path, max_associations=3, max_associations_per_caller=0)
    held: list[Any] = []
    try:
        held = [_associate(scp.cfg.node.port) for _ in range(4)]
        assert [_rejection(a) for a in held] == [None, None, None, LOCAL_LIMIT]  # only max_associations
    finally:
        for a in held:
            if a.is_established:
                a.release()
        scp.stop()


def test_an_idle_association_is_closed_after_idle_timeout_s(tmp_path: Path) -> None:
    """An association that says nothing for ``idle_timeout_s`` is aborted (pynetdicom's network timeout, 60 s
    unless set); its slot is free again. Each PDU restarts the timer: a caller echoing more often than that keeps
    its association, which is what the per-caller limit bounds."""
    scp = start_scp(tmp_path, idle_timeout_s=1.0)
    try:
        assoc = _associate(scp.cfg.node.port)
        assoc.network_timeout = 120  # hostile18: the caller's own 10 s timeout ended it while the node's was 60 s
        assert assoc.is_established
        wait_until(lambda: not assoc.is_established and assoc.is_aborted, timeout=20, what="the idle association closed")
    finally:
        scp.stop()


@pytest.mark.parametrize(("node", "key"), [
    ({"max_associations_per_caller": -1}, "node.max_associations_per_caller"),
    ({"max_associations": 0}, "node.max_associations"),
    ({"idle_timeout_s": 0}, "node.idle_timeout_s"),
    ({"idle_timeout_s": 90000}, "node.idle_timeout_s"),
    ({"max_associations_per_address": -1}, "node.max_associations_per_address"),
])
def test_limits_are_validated_at_load(node: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict({"node": node})


def test_the_defaults() -> None:
    n = config_from_dict({}).node
    assert (n.max_associations, n.max_associations_per_caller, n.idle_timeout_s) == (32, 8, 60.0)
    assert n.max_associations_per_address == 16


def test_one_address_cannot_hold_every_slot_under_many_ae_titles(tmp_path: Path) -> None:
    """hostile16: the per-caller limit counts a calling AE title + address, and any AE title is accepted by default
    (``require_known_callers = false``): one host opening 6 associations as HOG1..HOG6 (keeping each with a
    C-ECHO, as a slowloris would) held all 6 slots, and a modality from another address got "local limit
    exceeded". Now ``max_associations_per_address`` (here 3) bounds one address whatever titles it uses: HOG4..6
    rejected (transient, local limit exceeded), one line and one audit record each naming the key; a caller from
    another address gets in; a slot released is the address's again."""
    sections = {"node": {"max_associations": 6, "max_associations_per_caller": 2,
                         "max_associations_per_address": 3, "stable_age_s": 3600}}
    with NodeProc.start(tmp_path / "node", sections) as node:
        held: list[Any] = []
        try:
            hogs = [_associate(node.port, calling=f"HOG{i}") for i in range(1, 7)]
            held += hogs
            assert [_rejection(a) for a in hogs] == [None] * 3 + [LOCAL_LIMIT] * 3, node.log()[-2000:]
            assert hogs[0].send_c_echo().Status == 0x0000  # its own associations go on
            modality = _associate(node.port, calling="CT01", source="127.0.0.2")
            held.append(modality)
            assert _rejection(modality) is None and modality.is_established, node.log()[-2000:]
            hogs[0].release()
            again = _associate(node.port, calling="HOG7")
            held.append(again)
            assert _rejection(again) is None and again.is_established
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        wait_until(lambda: len([a for a in _audit(node) if a["event"] == "association-rejected"]) >= 3, timeout=10,
                   what="the rejections audited")
        log = node.log()
    rejected = [a for a in _audit(node) if a["event"] == "association-rejected"]
    assert [a["calling_ae"] for a in rejected] == ["HOG4", "HOG5", "HOG6"], rejected
    assert all("node.max_associations_per_address = 3" in a["reason"] for a in rejected), rejected
    lines = [ln for ln in log.splitlines() if "max_associations_per_address" in ln and "rejected" in ln]
    assert len(lines) == 3 and "HOG4@127.0.0.1" in lines[0] and "3 open from 127.0.0.1" in lines[0], lines
