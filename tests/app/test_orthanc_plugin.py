"""Orthanc plugin workflow: an upload to Orthanc, and nothing else, brings derived + uncertainty series back
into the same Orthanc study, with the original marked srnode-done (Orthanc 1.10: series metadata). The plugin
tells the node how many instances its store job sent, so the node starts without waiting its quiet period."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.store import Index
from tests.support.pacs import api, orthanc_dicomweb, phantom, start_node, upload, wait_job
from tests.support.peers import free_port, wait_until


def test_upload_to_orthanc_comes_back_derived_in_the_same_study(tmp_path: Path) -> None:
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT", "MR"],
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a", "PollSeconds": 0.3})
    stable_age_s = 60.0  # the plugin's size hint must make the job, never the quiet period
    node = start_node(tmp_path / "node", {
        "node": {"port": node_port, "stable_age_s": stable_age_s}, "http": {"port": http_port},
        "destinations": [{"name": "orthanc", "kind": "orthanc", "url": orthanc.url}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["orthanc"]}]})
    try:
        files = phantom(tmp_path, seed=41, slices=6)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        upload(orthanc, files)  # the only action: everything else is the plugin's and the node's doing
        original = orthanc.series_of_study(ref.StudyInstanceUID)[0]["ID"]

        def marked() -> str:
            with orthanc.client() as c:
                r = c.get(f"/series/{original}/metadata/SrNodeState")
                return r.text if r.status_code == 200 and r.text != "srnode-queued" else ""

        assert wait_until(marked, 120, interval=0.3, what="original marked") == "srnode-done", orthanc.log()
        job = wait_job(node, ref.SeriesInstanceUID)
        assert job["state"] == "delivered"
        ix = Index(node.spool / "index.sqlite")
        row = ix.series(ref.SeriesInstanceUID, ref.StudyInstanceUID)
        assert row is not None and (row["declared_instances"], row["declared_by"]) == (6, "http from 127.0.0.1")
        # created while the quiet period had provably not elapsed: by the plugin's declaration
        assert ix.job(job["id"]).created - row["last_received"] < stable_age_s, row
        ix.close()

        series = orthanc.series_of_study(ref.StudyInstanceUID)
        others = {s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"]) for s in series if s["ID"] != original}
        assert others == {job["derived_series_uid"]: 11}  # cubic has no sigma: no uncertainty series
        assert job["uncertainty_series_uid"] == ""

        # srnode's own output is never sent back to the node: once the result series is stable, the plugin
        # says it left it alone, and the node still has exactly one job
        wait_until(lambda: orthanc.log_path.read_text().count("left alone: srnode's own output") >= 1, 60,
                   interval=0.3,
                   what="plugin to skip the derived series")
        with orthanc.client() as c:
            stores = [j for j in c.get("/jobs?expand").json() if j["Type"] == "DicomModalityStore"]
        assert len(stores) == 1
        with api(node) as c:
            assert [j["series_uid"] for j in c.get("/jobs").json()["jobs"]] == [ref.SeriesInstanceUID]
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.parametrize("http", [True, False], ids=["node-jobs", "derived-series"])
def test_instances_arriving_after_the_series_was_done_are_followed_to_their_own_result(tmp_path: Path,
                                                                                      http: bool) -> None:
    """break14o: 4 of a series' 6 slices uploaded, processed, the original marked srnode-done; then the other 2.
    Orthanc reports the series stable again and the plugin sends it whole (6, declared); its tracker then took the
    node's newest job of the series, still the first one (delivered, 4 instances), and marked the original
    srnode-done again before the node had even made the job of the 6; without HttpUrl, the first job's derived
    series in the study (referencing the original) did the same. The mark must wait for a result of this send."""
    node_port, http_port = free_port(), free_port()
    to_node = {"HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a"} if http else {}
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        **to_node})
    node = start_node(tmp_path / "node", {  # declared (HttpUrl) or not, the job comes 3 s after the last instance
        "node": {"port": node_port, "stable_age_s": 60.0 if http else 3.0, "declared_settle_s": 3.0},
        "http": {"port": http_port},
        "destinations": [{"name": "orthanc", "kind": "orthanc", "url": orthanc.url}],
        "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                   "destinations": ["orthanc"]}]})
    try:
        files = phantom(tmp_path, seed=147, slices=6)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        upload(orthanc, files[:4])
        original = orthanc.series_of_study(ref.StudyInstanceUID)[0]["ID"]

        def mark() -> str:
            with orthanc.client() as c:
                r = c.get(f"/series/{original}/metadata/SrNodeState")
                return r.text if r.status_code == 200 else ""

        def stores() -> int:
            with orthanc.client() as c:
                return sum(j["Type"] == "DicomModalityStore" and j["State"] == "Success"
                           for j in c.get("/jobs?expand").json())

        wait_until(lambda: mark() == "srnode-done", 120, interval=0.2, what="the first 4 marked done")
        upload(orthanc, files[4:])
        wait_until(lambda: stores() == 2, 60, interval=0.1, what="the plugin sending the series again")
        wait_until(lambda: mark() == "srnode-done", 120, interval=0.05, what="the whole series marked done")
        with api(node) as c:
            jobs = c.get("/jobs", params={"series": ref.SeriesInstanceUID}).json()["jobs"]
        done = [j for j in jobs if j["state"] == "delivered" and j["n_instances"] == 6]
        assert done, f"marked srnode-done while the node's jobs were {[(j['n_instances'], j['state']) for j in jobs]}"
    finally:
        node.stop()
        orthanc.stop()


def test_a_plugin_token_the_node_refuses_is_said_not_retried_in_silence(tmp_path: Path) -> None:
    """break14o: SrNode.Token not the node's [http].token: the size declaration logged "HTTP Error 401:
    Unauthorized", and the tracker asked GET /jobs every PollSeconds, each 401 logged at INFO (not shown by
    Orthanc by default), for TimeoutSeconds (1 h), then marked the series srnode-failed "no result after 3600 s".
    Now one warning per series says the node refused the Token and what to set; the timeout's reason names it;
    the token itself is never logged."""
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "wrong-token-77c", "TimeoutSeconds": 8})
    node = start_node(tmp_path / "node", {"node": {"port": node_port}, "http": {"port": http_port}})
    try:
        files = phantom(tmp_path, seed=150, slices=2)
        upload(orthanc, files)
        original = orthanc.series_of_study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)[0]["ID"]
        wait_until(lambda: "refused the plugin's Token" in orthanc.log_path.read_text(), 60, interval=0.3,
                   what="the plugin saying the node refused its Token")

        def reason() -> str:
            with orthanc.client() as c:
                r = c.get(f"/series/{original}/metadata/SrNodeReason")
                return r.text if r.status_code == 200 else ""

        assert "HTTP 401" in wait_until(reason, 60, interval=0.3, what="the timeout's reason")
        log = orthanc.log_path.read_text()
        # once per call that met it (the jobs before the send, the size, the tracker), never once per round
        assert log.count("state cannot be followed") == 1 and "wrong-token-77c" not in log
    finally:
        node.stop()
        orthanc.stop()


def _meta(orthanc: Any, series_id: str, key: str) -> str:
    with orthanc.client() as c:
        r = c.get(f"/series/{series_id}/metadata/{key}")
        return str(r.text) if r.status_code == 200 else ""


def test_a_series_stable_while_the_node_is_down_is_sent_when_it_is_back(tmp_path: Path) -> None:
    """break18: the node stopped (an upgrade, a restart) when a series became stable in Orthanc: the store job
    failed and the plugin marked the series srnode-failed "C-STORE job … failed: Error in the network protocol"
    (the same words for a node down and a node out of space) and never sent it again: the series was never
    processed. Now the series stays srnode-queued, its reason naming what failed (Orthanc's ErrorDetails:
    connection refused) and when the next attempt is, and it is sent once the node is back."""
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a", "RetrySeconds": 1,
        "TimeoutSeconds": 600})
    node = None
    try:
        files = phantom(tmp_path, seed=181, slices=3)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        upload(orthanc, files)  # no node listening
        original = orthanc.series_of_study(ref.StudyInstanceUID)[0]["ID"]
        reason = wait_until(lambda: _meta(orthanc, original, "SrNodeReason"), 60, interval=0.2,
                            what="the failed attempt's reason")
        assert _meta(orthanc, original, "SrNodeState") == "srnode-queued", reason
        assert "not reachable" in reason and "Connection refused" in reason and "next attempt in" in reason, reason
        node = start_node(tmp_path / "node", {
            "node": {"port": node_port}, "http": {"port": http_port},
            "destinations": [{"name": "orthanc", "kind": "orthanc", "url": orthanc.url}],
            "rules": [{"name": "ct", "match": {"Modality": "^CT$"}, "through_plane_factor": 2,
                       "destinations": ["orthanc"]}]})
        assert wait_until(lambda: _meta(orthanc, original, "SrNodeState") in ("srnode-done", "srnode-failed")
                          and _meta(orthanc, original, "SrNodeState"), 240, interval=0.3,
                          what="the series sent once the node is back") == "srnode-done", orthanc.log()
        assert _meta(orthanc, original, "SrNodeReason") == ""  # the failed attempts' words are gone
        job = wait_job(node, ref.SeriesInstanceUID)
        assert (job["state"], job["n_instances"]) == ("delivered", 3)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_a_node_out_of_space_is_said_and_tried_until_the_timeout(tmp_path: Path) -> None:
    """break18: the node answering C-STORE 0xA700 (its spool below min_free_mb): marked srnode-failed at once
    with "Error in the network protocol", never sent again. Now the reason says out of resources with the
    status, the series is tried again, and marked srnode-failed only after TimeoutSeconds, with the count."""
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a", "RetrySeconds": 1,
        "TimeoutSeconds": 5})
    node = start_node(tmp_path / "node", {"node": {"port": node_port, "min_free_mb": 10**9},
                                          "http": {"port": http_port}})
    try:
        files = phantom(tmp_path, seed=182, slices=2)
        upload(orthanc, files)
        original = orthanc.series_of_study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)[0]["ID"]
        wait_until(lambda: _meta(orthanc, original, "SrNodeState") == "srnode-failed", 120, interval=0.2,
                   what="the series given up")
        reason = _meta(orthanc, original, "SrNodeReason")
        assert "out of resources" in reason and "0xA700" in reason, reason
        attempts = int(reason.split("after ")[1].split(" attempt")[0])
        assert attempts >= 2, reason
        log = orthanc.log_path.read_text()
        assert log.count("not sent yet: attempt") == attempts - 1, log
    finally:
        node.stop()
        orthanc.stop()


def test_a_series_the_node_rules_leave_alone_is_not_marked_failed(tmp_path: Path) -> None:
    """break18: a series no rule of the node takes (a CT where the rules name MR only; as every thin series with
    the default rule) was marked srnode-failed "no rule matched: ...", like a real failure: an Orthanc user
    looking for failed series saw every series left alone on purpose among them. Now srnode-ignored, the node's
    reason in SrNodeReason; a failure is still srnode-failed."""
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a"})
    node = start_node(tmp_path / "node", {
        "node": {"port": node_port}, "http": {"port": http_port},
        "rules": [{"name": "mr", "match": {"Modality": "^MR$"}, "through_plane_factor": 2, "destinations": []}]})
    try:
        files = phantom(tmp_path, seed=185, slices=3)
        ref = pydicom.dcmread(files[0], stop_before_pixels=True)
        upload(orthanc, files)
        original = orthanc.series_of_study(ref.StudyInstanceUID)[0]["ID"]
        state = wait_until(lambda: _meta(orthanc, original, "SrNodeState") not in ("", "srnode-queued")
                           and _meta(orthanc, original, "SrNodeState"), 120, interval=0.2, what="the series marked")
        reason = _meta(orthanc, original, "SrNodeReason")
        assert (state, reason.startswith("no rule matched")) == ("srnode-ignored", True), (state, reason)
        with api(node) as c:
            jobs = c.get("/jobs", params={"series": ref.SeriesInstanceUID}).json()["jobs"]
        assert [j["state"] for j in jobs] == ["ignored"], jobs
    finally:
        node.stop()
        orthanc.stop()


def test_an_instance_over_max_instance_mb_is_said_once_not_resent_for_an_hour(tmp_path: Path) -> None:
    """break18b: an instance over the node's [node] max_instance_mb was answered 0xA700 (out of resources, as a
    full disk): the plugin sent the whole series again ~14 times over TimeoutSeconds (3600 s), its reason blaming
    min_free_mb. Now the node answers 0xC211 (an error: sent again it is refused again) and the plugin marks the
    series srnode-failed at the first attempt, the reason naming max_instance_mb."""
    node_port, http_port = free_port(), free_port()
    orthanc = orthanc_dicomweb(tmp_path / "orthanc", srnode={
        "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": node_port, "Modalities": ["CT"], "PollSeconds": 0.2,
        "HttpUrl": f"http://127.0.0.1:{http_port}", "Token": "test-token-3f9a", "RetrySeconds": 1,
        "TimeoutSeconds": 3600})
    node = start_node(tmp_path / "node", {"node": {"port": node_port, "max_instance_mb": 1},
                                          "http": {"port": http_port}})
    try:
        files = phantom(tmp_path, seed=183, slices=2, size=1024)  # 2 MiB per slice
        upload(orthanc, files)
        original = orthanc.series_of_study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)[0]["ID"]
        # before: srnode-queued, "out of resources (… 0xA700; its spool disk is below [node].min_free_mb …)",
        # sent again every 1, 2, 4 … s for the hour
        state = wait_until(lambda: _meta(orthanc, original, "SrNodeState") in ("srnode-failed", "srnode-done")
                           and _meta(orthanc, original, "SrNodeState"), 60, interval=0.2, what="the series given up")
        reason = _meta(orthanc, original, "SrNodeReason")
        assert state == "srnode-failed", reason
        assert "max_instance_mb" in reason and "0xC211" in reason and "min_free_mb" not in reason, reason
        assert "not sent yet: attempt" not in orthanc.log_path.read_text()
        assert "node.max_instance_mb = 1" in node.log()
    finally:
        node.stop()
        orthanc.stop()
