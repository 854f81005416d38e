"""Per-caller admission on every path into the real node: STOW-RS, pulls (Orthanc REST, WADO-RS) and C-STORE.

Each test runs ``python -m node.app.cli serve`` with ``[node].require_known_callers = true`` and two rules, r1 and
r2, that both match the phantom CT (r1 first; r2 with a different through-plane factor, so the derived series
shows which rule ran). An unknown caller is refused with 0x0124 (not authorized) and nothing enters the spool; a
caller listed in ``[node].allowed_callers`` with ``rules = ["r2"]`` gets its series processed by r2 although r1
also matches; a listed caller without ``rules`` gets r1.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.support.nodeproc import NodeProc
from tests.support.pacs import TOKEN, api, orthanc_dicomweb, phantom, upload, wait_job
from tests.support.peers import ECHOSCU, Orthanc, storescu, wait_until

NOT_AUTHORIZED = 0x0124  # 292: PS3.7 C.5.10 refused, not authorized
SLICES = 6
DERIVED = {"r1": (SLICES - 1) * 2 + 1, "r2": (SLICES - 1) * 3 + 1}  # through-plane factor 2 / 3

RULES = [
    {"name": "r1", "match": {"Modality": "^CT$"}, "through_plane_factor": 2, "destinations": ["out"]},
    {"name": "r2", "match": {"Modality": "^CT$"}, "through_plane_factor": 3, "destinations": ["out"]},
]


def _sections(allowed_callers: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"node": {"require_known_callers": True, "allowed_callers": allowed_callers},
            "http": {"token": TOKEN}, "rules": RULES, **extra}


def _wait_http(node: NodeProc) -> None:
    def up() -> bool:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node exited with {node.proc.returncode}:\n{node.log()[-4000:]}")
        return httpx.get(f"{node.http_url}/healthz", timeout=2).status_code == 200

    wait_until(up, 60, interval=0.2, what="node /healthz")


def _start(workdir: Path, sections: dict[str, Any]) -> NodeProc:
    # wait=False: NodeProc's readiness probe is a C-ECHO from an AE that require_known_callers refuses
    node = NodeProc.start(workdir, sections, wait=False)
    _wait_http(node)
    return node


def _restart(node: NodeProc, sections: dict[str, Any]) -> None:
    node.restart(sections, wait=False)
    _wait_http(node)


def _status(node: NodeProc) -> dict[str, Any]:
    """What ``srnode status --json`` prints: {"jobs": [...], "instances": N}."""
    r = node.cli("status", "--json", "--limit", "0")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    return {"jobs": doc["jobs"], "instances": doc["instances"]}


def _uids(files: list[Path]) -> tuple[str, str, set[str]]:
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return str(ds[0].StudyInstanceUID), str(ds[0].SeriesInstanceUID), {str(d.SOPInstanceUID) for d in ds}


def _derived(node: NodeProc, job: dict[str, Any]) -> list[Path]:
    return sorted((node.workdir / "out").glob(f"*/{job['derived_series_uid']}/*.dcm"))


def _assert_processed_by(node: NodeProc, series: str, rule: str) -> None:
    """The series' job (GET /jobs) was decided for ``rule``, delivered, with ``rule``'s number of slices."""
    job = wait_job(node, series)
    assert (job["rule"], job["state"], job["n_instances"]) == (rule, "delivered", SLICES), job
    assert len(_derived(node, job)) == DERIVED[rule], job


# ------------------------------------------------------------------------------------------ STOW-RS


def _stow(node: NodeProc, files: list[Path], source_address: str = "127.0.0.1") -> httpx.Response:
    """POST /dicom-web/studies with one part per file, from ``source_address`` (a loopback address)."""
    body = b"".join(b"--b1\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n" for f in files)
    transport = httpx.HTTPTransport(local_address=source_address)
    with httpx.Client(base_url=node.http_url, transport=transport, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        return c.post("/dicom-web/studies", content=body + b"--b1--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b1'})


def _assert_stow_refused(r: httpx.Response, sops: set[str]) -> None:
    assert r.status_code == 409, r.text
    doc = r.json()
    assert "00081199" not in doc, "some instances were stored"  # ReferencedSOPSequence
    failed = doc["00081198"]["Value"]  # FailedSOPSequence
    assert {f["00081155"]["Value"][0] for f in failed} == sops
    assert {f["00081197"]["Value"][0] for f in failed} == {NOT_AUTHORIZED}  # FailureReason
    # the reason in words, one HTTP Warning per refused part (PS3.18 10.5.3), at most 10 and a count of the rest
    warnings = r.headers.get_list("warning")
    assert len(warnings) == min(len(sops), 10) + (len(sops) > 10), warnings
    assert all(w.startswith('299 srnode "part ') for w in warnings[:10]), warnings


def test_stow_rs_obeys_allowed_callers_and_caller_rules(tmp_path: Path) -> None:
    unknown, listed, wrong_host = (phantom(tmp_path, seed=s, slices=SLICES) for s in (701, 702, 703))
    # [http].stow_caller is "STOW-RS" (the default); this node knows only CT01
    node = _start(tmp_path / "node", _sections([{"ae_title": "CT01"}]))
    try:
        _, series, sops = _uids(unknown)
        _assert_stow_refused(_stow(node, unknown), sops)
        assert _status(node) == {"jobs": [], "instances": 0}
        assert not any(node.spool.joinpath("instances").rglob("*.dcm"))

        # listed, restricted to r2: stored, and r2 takes the series although r1 matches first
        _restart(node, _sections([{"ae_title": "STOW-RS", "rules": ["r2"]}]))
        _, series, sops = _uids(listed)
        r = _stow(node, listed)
        assert r.status_code == 200, r.text
        assert {s["00081155"]["Value"][0] for s in r.json()["00081199"]["Value"]} == sops
        _assert_processed_by(node, series, "r2")
        assert [(j["series"], j["rule"]) for j in node.status_cli()] == [(series, "r2")]

        # the entry names another host: STOW-RS from 127.0.0.1 is not that caller; from 127.0.0.2 it is
        # (no rules in the entry: every rule, so r1)
        _restart(node, _sections([{"ae_title": "STOW-RS", "host": "127.0.0.2"}]))
        _, series, sops = _uids(wrong_host)
        _assert_stow_refused(_stow(node, wrong_host), sops)
        assert _status(node)["instances"] == SLICES  # only the series stored above
        r = _stow(node, wrong_host, source_address="127.0.0.2")
        assert r.status_code == 200, r.text
        _assert_processed_by(node, series, "r1")
        assert "STOW-RS" in node.log() and "not in node.allowed_callers" in node.log()
    finally:
        node.stop()


# ------------------------------------------------------------------------------------------ pulls


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    o = orthanc_dicomweb(tmp_path_factory.mktemp("callers-orthanc"))
    yield o
    o.stop()


def _pull_sources(orthanc: Orthanc) -> dict[str, Any]:
    # "pacs" (Orthanc REST) is known by its name; "web" (WADO-RS through Orthanc's DICOMweb) by its ae_title
    return {"sources": [{"name": "pacs", "kind": "orthanc", "url": orthanc.url},
                        {"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
                         "ae_title": "WEBPACS"}]}


def _post_pull(node: NodeProc, study: str, series: str, source: str, status: int = 202) -> dict[str, Any]:
    with api(node) as c:
        r = c.post("/jobs", json={"study": study, "series": series, "source": source})
    assert r.status_code == status, r.text
    return dict(r.json())


def _cli_fetch(node: NodeProc, study: str, series: str, source: str) -> tuple[int, dict[str, Any]]:
    r: subprocess.CompletedProcess[str] = node.cli("fetch", "--from", source, "--study", study, "--series", series)
    assert r.stdout, r.stderr
    return r.returncode, dict(json.loads(r.stdout))


def test_pulled_series_obey_allowed_callers_and_caller_rules(tmp_path: Path, pacs: Orthanc) -> None:
    rest, web = phantom(tmp_path, seed=711, slices=SLICES), phantom(tmp_path, seed=712, slices=SLICES)
    upload(pacs, rest + web)
    rest_study, rest_series, _ = _uids(rest)
    web_study, web_series, _ = _uids(web)
    node = _start(tmp_path / "node", _sections([{"ae_title": "CT01"}], **_pull_sources(pacs)))
    try:
        # neither source is a known caller: every pulled instance is refused (409), nothing is spooled, no job;
        # one refusal for the pull (naming the series and how many), not one per instance, in the answer and the log
        res = _post_pull(node, rest_study, rest_series, "pacs", status=409)
        assert (res["method"], res["received"], len(res["refused"])) == ("orthanc-rest", 0, 1), res
        (why,) = res["refused"]
        assert "'pacs'" in why and "not in node.allowed_callers" in why and f"{SLICES} instance(s)" in why, why
        assert rest_series in why, why
        assert node.log().count("not in node.allowed_callers") == 1, node.log()[-3000:]
        rc, res = _cli_fetch(node, web_study, web_series, "web")
        assert (rc, res["method"], res["received"], len(res["refused"])) == (1, "wado-rs", 0, 1), res
        assert "'WEBPACS'" in res["refused"][0] and web_series in res["refused"][0], res
        assert _status(node) == {"jobs": [], "instances": 0}

        # both known, restricted to r2: the same pulls now make jobs, and r2 takes both series
        _restart(node, _sections([{"ae_title": "pacs", "rules": ["r2"]},
                                  {"ae_title": "WEBPACS", "host": "127.0.0.1", "rules": ["r2"]}]))
        res = _post_pull(node, rest_study, rest_series, "pacs")
        assert (res["received"], res["refused"]) == (SLICES, []), res
        rc, res = _cli_fetch(node, web_study, web_series, "web")
        assert (rc, res["received"], res["refused"]) == (0, SLICES, []), res
        _assert_processed_by(node, rest_series, "r2")
        _assert_processed_by(node, web_series, "r2")
        assert sorted((j["series"], j["rule"]) for j in node.status_cli()) == \
            sorted([(rest_series, "r2"), (web_series, "r2")])
    finally:
        node.stop()


# ------------------------------------------------------------------------------------------ C-STORE (parity)


def _echo(node: NodeProc, calling: str) -> bool:
    r = subprocess.run([ECHOSCU, "-aet", calling, "-aec", node.ae_title, "-to", "2", "127.0.0.1", str(node.port)],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def test_c_store_obeys_the_same_caller_rules(tmp_path: Path) -> None:
    refused, restricted, free = (phantom(tmp_path, seed=s, slices=SLICES) for s in (721, 722, 723))
    node = _start(tmp_path / "node", _sections([{"ae_title": "CT01", "host": "127.0.0.1", "rules": ["r2"]},
                                                {"ae_title": "CT02"}]))
    try:
        wait_until(lambda: _echo(node, "CT01"), 60, interval=0.2, what="C-ECHO from CT01")
        r = storescu(refused, node.port, calling="INTRUDER")
        assert r.returncode != 0 and "Rejected" in r.stdout + r.stderr, r.stdout + r.stderr
        assert _status(node) == {"jobs": [], "instances": 0}

        assert storescu(restricted, node.port, calling="CT01").returncode == 0
        assert storescu(free, node.port, calling="CT02").returncode == 0
        _assert_processed_by(node, _uids(restricted)[1], "r2")
        _assert_processed_by(node, _uids(free)[1], "r1")
        assert _status(node)["instances"] == 2 * SLICES
    finally:
        node.stop()


def test_a_series_sent_by_two_callers_uses_only_rules_allowed_for_both(tmp_path: Path) -> None:
    """One series, its first half sent by CT02 (every rule), the rest by CT01 (only r2): CT01's instances are in
    the derived series, so the series may use only what both may: r2 (the first caller's rules alone gave r1).
    CT01 (r2) and CT03 (r1) together: no rule allowed for both, left alone with the reason."""
    shared, disjoint = (phantom(tmp_path, seed=s, slices=SLICES) for s in (724, 725))
    callers = [{"ae_title": "CT01", "host": "127.0.0.1", "rules": ["r2"]}, {"ae_title": "CT02"},
               {"ae_title": "CT03", "rules": ["r1"]}]
    # one quiet period over both halves: each series makes one job
    node = _start(tmp_path / "node", _sections(callers, node={"require_known_callers": True,
                                                              "allowed_callers": callers, "stable_age_s": 5.0}))
    try:
        wait_until(lambda: _echo(node, "CT01"), 60, interval=0.2, what="C-ECHO from CT01")
        half = SLICES // 2
        for files, first, second in ((shared, "CT02", "CT01"), (disjoint, "CT01", "CT03")):
            assert storescu(files[:half], node.port, calling=first).returncode == 0
            assert storescu(files[half:], node.port, calling=second).returncode == 0
        _assert_processed_by(node, _uids(shared)[1], "r2")
        jobs = wait_until(lambda: [j for j in _status(node)["jobs"] if j["state"] in ("delivered", "ignored")]
                          if len(_status(node)["jobs"]) == 2 else None, 60, interval=0.3, what="both series decided")
        (left,) = [j for j in jobs if j["series"] == _uids(disjoint)[1]]
        assert left["state"] == "ignored", left
        assert "r1: not allowed for calling AE" in left["reason"] and "CT01" in left["reason"], left["reason"]
        assert "r2: not allowed for calling AE" in left["reason"] and "CT03" in left["reason"], left["reason"]
    finally:
        node.stop()
