"""Security against the real node process: AE allow-list and per-AE routing, DICOM TLS in and out (dcmtk),
HTTP bearer token, secrets and patient identifiers kept out of the logs, and the audit trail of a full run.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.app.phantom import write_phantom_series
from tests.support.certs import Pki, make_pki
from tests.support.fixtures import shared_series
from tests.support.nodeproc import NodeProc
from tests.support.peers import ECHOSCU, STORESCP, Orthanc, free_port, storescu, wait_until

DONE = ("delivered", "failed", "dead-letter", "ignored")
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom_series(tmp_path_factory.mktemp("phantom"), slices=4, size=32, step_mm=3.0, seed=5)


def _echo(port: int, calling: str) -> bool:
    r = subprocess.run([ECHOSCU, "-aet", calling, "-aec", "SRNODE", "-to", "2", "127.0.0.1", str(port)],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def _latest(jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each series' latest job (the highest id)."""
    out: dict[str, dict[str, Any]] = {}
    for j in sorted(jobs, key=lambda j: j["id"]):
        out[j["series"]] = j
    return out


def _whole_series_finished(sent: dict[str, int]) -> object:
    """Every series in ``sent`` (SeriesInstanceUID -> instances sent) has a finished latest job on all of them."""
    def done(jobs: list[dict[str, Any]]) -> bool:
        latest = _latest(jobs)
        return all(uid in latest and latest[uid]["instances"] == n and latest[uid]["state"] in DONE
                   for uid, n in sent.items())
    return done


def _finished(n: int) -> object:
    return lambda jobs: len([j for j in jobs if j["state"] in DONE]) >= n


# ------------------------------------------------------------------------------------------ allow-list


def test_allow_list_rejects_unknown_callers_and_routes_per_ae(tmp_path: Path, phantom: list[Path]) -> None:
    ct = write_phantom_series(tmp_path / "ct2", slices=4, size=32, step_mm=3.0, seed=6)
    sections = {
        "node": {"require_known_callers": True,
                 "allowed_callers": [{"ae_title": "CT01", "host": "127.0.0.1"},
                                     {"ae_title": "MRONLY", "host": "127.0.0.1", "rules": ["mr"]}]},
        "rules": [{"name": "mr", "match": {"Modality": "MR"}, "destinations": ["out"]},
                  {"name": "ct", "match": {"Modality": "CT"}, "destinations": ["out"]}],
    }
    with NodeProc.start(tmp_path / "node", sections, wait=False) as node:
        wait_until(lambda: _echo(node.port, "CT01"), timeout=60, what="node answers C-ECHO from CT01")
        intruder = storescu(phantom, node.port, calling="INTRUDER")
        assert intruder.returncode != 0 and "Rejected" in intruder.stdout + intruder.stderr
        # the right AE title from the wrong address is an intruder too
        ae = AE(ae_title="CT01")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=("127.0.0.2", 0))
        assert assoc.is_rejected, "CT01 calling from 127.0.0.2 was let in"
        assert storescu(phantom, node.port, calling="CT01").returncode == 0
        assert storescu(ct, node.port, calling="MRONLY").returncode == 0  # CT, but MRONLY may use only 'mr'
        jobs = node.wait_jobs(_finished(2), what="both allowed series decided")
        audit = [json.loads(ln) for ln in (node.spool / "audit.log").read_text().splitlines()]
    states = {j["series"]: j for j in jobs}
    assert states[str(dcmread(phantom[0]).SeriesInstanceUID)]["state"] == "delivered"
    restricted = states[str(dcmread(ct[0]).SeriesInstanceUID)]
    assert restricted["state"] == "ignored" and "MRONLY" in restricted["reason"], restricted
    assert len(jobs) == 2, "the intruders' instances were indexed"
    rejected = [a for a in audit if a["event"] == "association-rejected"]
    assert {(a["calling_ae"], a["address"]) for a in rejected} == {("INTRUDER", "127.0.0.1"), ("CT01", "127.0.0.2")}


# ------------------------------------------------------------------------------------------ TLS


def _storescu_tls(files: list[Path], port: int, key: Path, cert: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return storescu(files, port, calling="CT01", extra_args=["+tls", str(key), str(cert), "+cf", str(ca)])


def test_tls_in_requires_a_client_certificate_from_our_ca(tmp_path: Path, pki: Pki, phantom: list[Path]) -> None:
    tls = {"enabled": True, "cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
           "require_client_cert": True}
    with NodeProc.start(tmp_path / "node", {"node": {"tls": tls}}, wait=False) as node:
        wait_until(lambda: _storescu_tls(phantom[:1], node.port, pki.client_key, pki.client_cert, pki.ca)
                   .returncode == 0, timeout=60, what="TLS C-STORE accepted")
        ok = _storescu_tls(phantom[1:], node.port, pki.client_key, pki.client_cert, pki.ca)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        rogue = _storescu_tls(phantom[:1], node.port, pki.rogue_key, pki.rogue_cert, pki.ca)
        assert rogue.returncode != 0, "a client certificate from another CA was accepted"
        plain = storescu(phantom[:1], node.port, calling="CT01")
        assert plain.returncode != 0, "plain TCP was accepted on the TLS port"
        jobs = node.wait_jobs(_finished(1), what="the TLS series processed")
    assert [(j["state"], j["instances"]) for j in jobs] == [("delivered", len(phantom))]


def test_tls_out_to_dcmtk_storescp(tmp_path: Path, pki: Pki, phantom: list[Path]) -> None:
    port, received = free_port(), tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen([STORESCP, "+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca),
                            "-aet", "TLSPACS", "-od", str(received), str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    dest = {"name": "tlspacs", "kind": "dicom", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": port,
            "tls": True, "tls_ca": str(pki.ca), "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    try:
        with NodeProc.start(tmp_path / "node", {
                "destinations": [dest],
                "rules": [{"name": "ct", "match": {"Modality": "CT"}, "destinations": ["tlspacs"]}]}) as node:
            assert storescu(phantom, node.port).returncode == 0
            jobs = node.wait_jobs(_finished(1), timeout=120, what="delivery over TLS")
        assert jobs[0]["state"] == "delivered", jobs
        n_out = (len(phantom) - 1) * 2 + 1
        files = list(received.iterdir())
        assert len(files) == n_out, sorted(p.name for p in files)  # derived (cubic: no sigma object)
    finally:
        scp.terminate()
        out = scp.communicate(timeout=10)[0]
    assert b"TLS" in out or scp.returncode is not None


# ------------------------------------------------------------------------------------------ HTTP token, secrets


def test_http_token_and_secrets_never_logged(tmp_path: Path, phantom: list[Path]) -> None:
    token, password = "tok-7d1c0e5a9b", "pw-3f9e2a71c4"
    sections = {
        "http": {"token": "env:SRNODE_TEST_TOKEN"},
        "destinations": [{"name": "out", "kind": "folder", "path": str(tmp_path / "node" / "out")},
                         {"name": "pacs", "kind": "orthanc", "url": "http://127.0.0.1:9", "username": "srnode",
                          "password": password}],
    }
    with NodeProc.start(tmp_path / "node", sections, env={"SRNODE_TEST_TOKEN": token}) as node:
        url = node.http_url
        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, what="HTTP API up")
        assert httpx.get(f"{url}/jobs", timeout=5).status_code == 401
        assert httpx.get(f"{url}/jobs", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
        stow = httpx.post(f"{url}/dicom-web/studies", content=b"--x--",
                          headers={"Content-Type": "multipart/related; type=\"application/dicom\"; boundary=x"},
                          timeout=5)
        assert stow.status_code == 401
        assert storescu(phantom, node.port).returncode == 0

        def delivered() -> bool:
            r = httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            return [j["state"] for j in r.json()["jobs"]] == ["delivered"]

        wait_until(delivered, timeout=120, what="series delivered (seen through GET /jobs with the token)")
        logs = node.log() + (node.spool / "audit.log").read_text()
    assert token not in logs and password not in logs
    assert "***" in node.log(), "the effective configuration should be logged with secrets redacted"


# ------------------------------------------------------------------------------------------ PHI and audit


def _forms(keyword: str, value: str) -> list[str]:
    if keyword.endswith("Date") and len(value) == 8 and value.isdigit():
        return [value, f"{value[:4]}-{value[4:6]}-{value[6:]}"]
    return [value]


@pytest.fixture
def identifiers() -> Iterator[dict[str, set[str]]]:
    """Patient identifiers of the shared series (the MPRAGE keeps a birth date and study date)."""
    out: dict[str, set[str]] = {kw: set() for kw in PHI_KEYWORDS}
    for name in ("mr_t1_mprage_sag_siemens", "ct_head_phantom_philips_5mm"):
        h = dcmread(sorted(shared_series(name).glob("*.dcm"))[0], stop_before_pixels=True)
        for kw in PHI_KEYWORDS:
            value = str(h.get(kw, "") or "").strip()
            parts = {value, *value.replace("^", " ").split()} if kw == "PatientName" else {value}
            out[kw] |= {p for p in parts if len(p) >= 4}
    yield out


def test_full_run_logs_carry_no_patient_identifiers_and_audit_is_complete(
        tmp_path: Path, orthanc: Orthanc, identifiers: dict[str, set[str]]) -> None:
    # 40 central MPRAGE slices: same headers (birth date, study date) as all 192, a quarter of the CPU time
    mprage = sorted(shared_series("mr_t1_mprage_sag_siemens").glob("*.dcm"))[76:116]
    ct = sorted(shared_series("ct_head_phantom_philips_5mm").glob("*.dcm"))
    assert identifiers["PatientBirthDate"] and identifiers["StudyDate"], identifiers
    sections = {"node": {"log_level": "DEBUG"},
                "destinations": [{"name": "pacs", "kind": "dicom", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                  "port": orthanc.dicom_port}],
                "rules": [{"name": "mr", "match": {"Modality": "MR"}, "destinations": ["pacs"]},
                          {"name": "ct", "match": {"Modality": "CT"}, "destinations": ["pacs"]}]}
    with NodeProc.start(tmp_path / "node", sections) as node:
        for files in (mprage, ct):
            r = storescu(files, node.port, calling="SCANNER1")
            assert r.returncode == 0, r.stderr
        sent = {str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID): len(files)
                for files in (mprage, ct)}
        jobs = node.wait_jobs(_whole_series_finished(sent), timeout=400, what="both shared series delivered")
        status = node.cli("status").stdout + node.cli("status", "--json").stdout
        api = httpx.get(f"{node.http_url}/jobs", timeout=10).text
    # under load a sender may pause longer than the quiet period (1 s here): a job started on part of a series is
    # then superseded (or, if already delivered, followed) by the job on the whole series, the node's rule; what
    # counts is that each series' latest job, on all its instances, is delivered
    final = list(_latest(jobs).values())
    assert [j["state"] for j in final] == ["delivered", "delivered"], json.dumps(jobs, indent=1)
    texts = {"node log": node.log(), "audit log": (node.spool / "audit.log").read_text(), "srnode status": status,
             "GET /jobs": api}
    # a value counts when it stands alone: Siemens UIDs embed the acquisition date (…45152.2013030808…), and UIDs
    # are what the logs must name; a date is also looked for written as 2013-03-08
    leaks = [f"{kw} value {v!r} in the {where}" for kw, values in identifiers.items() for v in values
             for form in _forms(kw, v) for where, text in texts.items()
             if re.search(rf"(?<![\w.]){re.escape(form)}(?![\w.])", text, re.IGNORECASE)]
    assert not leaks, leaks

    audit = [json.loads(ln) for ln in texts["audit log"].splitlines()]
    events = [a["event"] for a in audit]
    assoc = [a for a in audit if a["event"] == "association" and a["calling_ae"] == "SCANNER1"]
    assert sorted(a["stored"] for a in assoc) == sorted([len(ct), len(mprage)]), assoc
    for j in final:
        mine = [a for a in audit if a.get("job") == j["id"] or a.get("series") == j["series"]]
        kinds = {a["event"] for a in mine}
        assert {"series-received", "job-decision", "job-processed", "delivery"} <= kinds, (j["id"], kinds)
        outcomes = [a["outcome"] for a in mine if a["event"] == "delivery"]  # a superseded job's too, if it sent
        assert outcomes and set(outcomes) == {"delivered"}, outcomes
    assert "node-started" in events and events[-1] == "node-stopped", events



def _raw_association(port: int, calling_ae: str) -> socket.socket:
    """An established association's socket to the node at ``port``, our own DUL reactor stopped (waited for, not
    slept on) so that only the test reads and writes it."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")

    def established() -> Any:
        # a rejection "local limit exceeded" is transient: with max_associations = 1 the readiness C-ECHO's
        # association may still hold the slot for a moment after its release (its thread not yet ended)
        a = ae.associate("127.0.0.1", port, ae_title="SRNODE")
        return a if a.is_established else None

    assoc = wait_until(established, timeout=20, interval=0.2, what="an association established")
    sock: socket.socket = assoc.dul.socket.socket
    assoc.dul._kill_thread = True
    wait_until(lambda: not assoc.dul.is_alive(), timeout=10, what="our DUL reactor stopped")
    return sock


def test_a_pdu_announcing_gigabytes_is_aborted_before_it_is_read(tmp_path: Path, phantom: list[Path]) -> None:
    """pynetdicom reads a PDU's whole announced body into memory: a peer announcing a 4 GB P-DATA-TF and streaming
    grew the node by every byte it sent (600 MB in 60 s, not cut off). The node aborts it at the header now, and
    a well-behaved sender is served as before."""
    import struct

    node = NodeProc.start(tmp_path, {"node": {"stable_age_s": 3600}})
    try:
        sock = _raw_association(node.port, "HUGE")
        sock.settimeout(20)  # a node that stops reading without closing ends the loop too (socket.timeout)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
        sent = 0
        with pytest.raises(OSError):
            while sent < 256:
                sock.sendall(b"\0" * (1 << 20))
                sent += 1
        assert sent < 64, f"the node took {sent} MB of a 4 GB PDU"
        sock.close()
        assert "above the" in node.log() and "aborted" in node.log()
        r = storescu(phantom[:2], node.port)
        assert r.returncode == 0, r.stderr
    finally:
        node.stop()


@pytest.mark.faults
def test_a_trickled_pdu_is_aborted_and_frees_its_slot(tmp_path: Path, phantom: list[Path]) -> None:
    """A slowloris peer announces a small P-DATA-TF and sends one byte a second: pynetdicom's network timeout
    counts only silence and ``association_timeout_s`` only the A-ASSOCIATE-RQ, so it held its association (and,
    with ``max_associations`` = 1, the whole node) forever. A PDU must now arrive within PDU_TIMEOUT_S (+1 s per
    64 KiB); then the slot is free for a real sender."""
    import struct
    import threading

    from node.ingest.reactor import PDU_TIMEOUT_S

    node = NodeProc.start(tmp_path, {"node": {"stable_age_s": 3600, "max_associations": 1}})
    stop = threading.Event()
    try:
        sock = _raw_association(node.port, "SLOW")
        sock.sendall(struct.pack(">BBL", 0x04, 0, 1000))

        def trickle() -> None:
            while not stop.wait(1.0):
                try:
                    sock.sendall(b"\0")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        wait_until(lambda: "did not arrive within" in node.log(), timeout=PDU_TIMEOUT_S + 30,
                   what="the trickled PDU aborted")
        r = storescu(phantom[:2], node.port)
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        node.stop()
