"""srnode plugin for Orthanc (orthanc-python >= 3.2, Orthanc >= 1.10; stdlib only).

Load it with ``"PythonScript": "/path/to/orthanc/plugin.py"`` next to ``libOrthancPython.so`` in ``Plugins``.
It reads the ``"SrNode"`` section of the Orthanc configuration:

    "SrNode": {
      "AeTitle": "SRNODE", "Host": "127.0.0.1", "Port": 11112,   // the node's DICOM SCP
      "Modalities": ["CT", "MR"],          // series modalities to route (default: every image series)
      "SeriesDescriptionRegex": "",        // optional: only series whose description matches (re.search)
      "Label": "",                         // optional (Orthanc >= 1.12): only series of studies with this label
      "HttpUrl": "http://127.0.0.1:8480",  // optional: the node's HTTP API, to follow the job to its end (and
                                           //   to say how many instances were sent, see DeclareSize)
      "DeclareSize": true,                 // with HttpUrl: after the store job, tell the node the series' size
      "Token": "",                         // bearer token of the node's HTTP API ([http].token)
      "DerivedSuffix": " SR",              // [derive].series_description_suffix of the node
      "TimeoutSeconds": 3600,              // a series not done after this long is marked srnode-failed
      "RetrySeconds": 30                   // a store the node could not take (down, restarting, out of space:
                                           //   0xA7xx) is tried again after this, doubling up to 300 s, until
                                           //   TimeoutSeconds after its first failure; meanwhile srnode-queued
    }

Flow: on STABLE_SERIES the callback only queues the series id (Orthanc must never wait on us). A worker thread
filters it, skips srnode's own output (ImageType DERIVED, the suffix followed by "x<factor>" in the description,
Contributing Equipment Sequence naming manufacturer "srnode"), registers the node as modality ``srnode`` and sends
the series with Orthanc's own store job (``/modalities/srnode/store``, asynchronous); once it succeeded, and when
HttpUrl is set, it tells the node how many instances it sent (``POST /series/{study}/{series}/complete``
``{"instances": N}``), so the node starts as soon as they are in instead of waiting its quiet period (a failure
to tell is logged; the node then waits the quiet period). A tracker thread follows each
series to its end — the node's ``GET /jobs?series=UID`` when HttpUrl is set, else the arrival of a derived series
in the same study that references the original — and marks the original. A series sent again (instances came
after it was stable) is marked srnode-queued before the store job, and only a result of that send marks it
again: a node job newer than the send, or holding every instance sent; a derived series not in the study before
the send.

A store job that fails because the node could not take the series (not reachable: stopped, restarting; or a
C-STORE status 0xA7xx, out of resources: its disk below min_free_mb) is tried again (RetrySeconds, doubling up
to 300 s) until TimeoutSeconds after the first failure; the series stays srnode-queued, its SrNodeReason saying
what failed (Orthanc's ErrorDetails: the address refused, the DIMSE status), how many attempts and when the next
is. Any other refusal (a C-STORE status the node gives a bad instance; 0xC211: an instance over the node's
[node].max_instance_mb, said so), or the last attempt, marks it srnode-failed with the same words.

Marks: Orthanc 1.10 has no labels, so the state is the series metadata ``SrNodeState`` (declare it in
``UserMetadata``, e.g. ``"UserMetadata": {"SrNodeState": 4242, "SrNodeReason": 4243}``) with values
``srnode-queued`` / ``srnode-done`` / ``srnode-failed``, or ``srnode-ignored`` (with HttpUrl: the node's rules
left the series alone on purpose, e.g. a thin series; not a failure); the reason of a failure or of being left
alone goes to ``SrNodeReason``. When the server supports labels (Orthanc >= 1.12) the same words are also set as
series labels.

The Orthanc Python plugin is AGPL-3.0; this script runs inside it (see docs/integration.md, Orthanc plugin).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orthanc  # type: ignore[import-not-found]  # provided by libOrthancPython at run time

MODALITY_NAME = "srnode"
STATE_KEY = "SrNodeState"
REASON_KEY = "SrNodeReason"
QUEUED, DONE, FAILED, IGNORED = "srnode-queued", "srnode-done", "srnode-failed", "srnode-ignored"
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "SEG", "REG", "DOC", "AU", "ECG"}


class _Settings:
    def __init__(self, section: dict[str, Any]) -> None:
        self.ae_title = str(section.get("AeTitle", "SRNODE"))
        self.host = str(section.get("Host", "127.0.0.1"))
        self.port = int(section.get("Port", 11112))
        self.modalities = {str(m).upper() for m in section.get("Modalities", [])}
        rx = str(section.get("SeriesDescriptionRegex", ""))
        self.description_rx = re.compile(rx) if rx else None
        self.label = str(section.get("Label", ""))
        self.http_url = str(section.get("HttpUrl", "")).rstrip("/")
        self.token = str(section.get("Token", ""))
        self.declare_size = bool(section.get("DeclareSize", True))
        self.suffix = str(section.get("DerivedSuffix", " SR"))
        self.timeout_s = float(section.get("TimeoutSeconds", 3600))
        self.poll_s = float(section.get("PollSeconds", 1.0))
        self.retry_s = max(0.1, float(section.get("RetrySeconds", 30.0)))


class _StoreFailed(RuntimeError):
    """Orthanc's store job to the node failed; ``retryable`` when the node could not take it (not reachable, or
    a C-STORE status 0xA7xx: out of resources), not when it refused an instance."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _store_failure(job_id: str, info: dict[str, Any]) -> _StoreFailed:
    """The words of a failed store job: Orthanc's ErrorDetails (the address refused, the DIMSE status), which its
    ErrorDescription ("Error in the network protocol" for every one of them) does not say."""
    details = str(info.get("ErrorDetails", "") or "").strip()
    words = details or str(info.get("ErrorDescription", "") or "?")
    status = re.search(r"status 0x([0-9A-Fa-f]{4})", details)
    if status is None:  # no DIMSE answer: no connection, no association, a lost link
        return _StoreFailed(f"C-STORE job {job_id} failed: srnode not reachable ({words})", retryable=True)
    code = status.group(1).upper()
    if code == "C211":  # node.dimse.Status.TOO_LARGE: the same instance is refused the same way every time
        return _StoreFailed(f"C-STORE job {job_id} failed: srnode refused an instance over its "
                            f"[node].max_instance_mb ({words}): not sent again (raise max_instance_mb on the node, "
                            "then send the series again)", retryable=False)
    if code.startswith("A7"):
        return _StoreFailed(f"C-STORE job {job_id} failed: srnode out of resources ({words}; its spool disk "
                            "is below [node].min_free_mb, or the node is busy: see its log)", retryable=True)
    return _StoreFailed(f"C-STORE job {job_id} failed: srnode refused it ({words}; the reason is in the node's "
                        "log)", retryable=False)


def _srnode_description(description: str, suffix: str) -> bool:
    """A SeriesDescription srnode wrote: "<source><suffix> x2 <engine>..." (node.derived.labels), or the older
    "<source><suffix>"."""
    if not suffix:
        return False
    return description.endswith(suffix) or re.search(re.escape(suffix) + r" x\d+(?: x\d+)?(?: in-plane)? \S",
                                                     description) is not None


def _log(msg: str) -> None:
    orthanc.LogWarning(f"srnode plugin: {msg}")


def _node_problem(exc: Exception) -> str:
    """Why a call to the node's HTTP API failed, in words; a 401 / 403 names the setting to fix (never its value)."""
    if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403):
        return f"srnode refused the plugin's Token (HTTP {exc.code}): set SrNode.Token to the node's [http].token"
    return str(exc)


def _get(uri: str) -> Any:
    return json.loads(orthanc.RestApiGet(uri))


class SrNodePlugin:
    """State of the plugin: a work queue, a tracker table and two daemon threads."""

    def __init__(self, settings: _Settings) -> None:
        self.s = settings
        self.work: queue.Queue[str] = queue.Queue()
        self.pending: dict[str, dict[str, Any]] = {}  # orthanc series id -> {uid, study, since}
        self.retries: dict[str, dict[str, Any]] = {}  # orthanc series id -> {attempts, first, next}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.labels = False
        self.threads = [threading.Thread(target=self._dispatch_loop, name="srnode-dispatch", daemon=True),
                        threading.Thread(target=self._track_loop, name="srnode-track", daemon=True)]

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def shutdown(self) -> None:
        self.stop.set()
        self.work.put("")
        for t in self.threads:
            t.join(timeout=10)

    def _setup(self) -> None:
        modality = {"AET": self.s.ae_title, "Host": self.s.host, "Port": self.s.port}
        orthanc.RestApiPut(f"/modalities/{MODALITY_NAME}", json.dumps(modality))
        try:
            orthanc.RestApiGet("/tools/labels")  # Orthanc >= 1.12
            self.labels = True
        except Exception:  # noqa: BLE001 - older server: metadata only
            self.labels = False
        _log(f"routing stable series to {self.s.ae_title}@{self.s.host}:{self.s.port}"
             f" (labels {'on' if self.labels else 'unsupported, metadata only'})")

    # ---------------------------------------------------------------------------------- marks
    def mark(self, series_id: str, state: str, reason: str = "") -> None:
        try:
            orthanc.RestApiPut(f"/series/{series_id}/metadata/{STATE_KEY}", state)
            if reason:
                orthanc.RestApiPut(f"/series/{series_id}/metadata/{REASON_KEY}", reason[:500])
            else:  # an earlier failure's words must not stay beside a later state
                try:
                    orthanc.RestApiDelete(f"/series/{series_id}/metadata/{REASON_KEY}")
                except Exception:  # noqa: BLE001 - there was none
                    pass
            if self.labels:
                for other in (QUEUED, DONE, FAILED, IGNORED):
                    if other != state:
                        try:
                            orthanc.RestApiDelete(f"/series/{series_id}/labels/{other}")
                        except Exception:  # noqa: BLE001 - label was not set
                            pass
                orthanc.RestApiPut(f"/series/{series_id}/labels/{state}", "")
        except Exception as exc:  # noqa: BLE001 - a failed mark must not stop the plugin
            _log(f"series {series_id}: could not set {state}: {exc}")

    # ---------------------------------------------------------------------------------- filter
    def is_own_output(self, tags: dict[str, Any]) -> bool:
        image_type = tags.get("ImageType", "")
        if "DERIVED" in str(image_type).upper().split("\\"):
            return True
        if _srnode_description(str(tags.get("SeriesDescription", "")), self.s.suffix):
            return True
        for item in tags.get("ContributingEquipmentSequence", []) or []:
            if isinstance(item, dict) and str(item.get("Manufacturer", "")).strip().lower() == "srnode":
                return True
        return False

    def wanted(self, series_id: str) -> tuple[bool, str, dict[str, Any]]:
        series = _get(f"/series/{series_id}")
        main = series.get("MainDicomTags", {})
        instances = series.get("Instances", [])
        if not instances:
            return False, "no instances", main
        tags = _get(f"/instances/{instances[0]}/tags?simplify")
        modality = str(main.get("Modality", tags.get("Modality", ""))).upper()
        if self.is_own_output(tags):
            return False, "srnode's own output", main
        if self.s.modalities and modality not in self.s.modalities:
            return False, f"modality {modality!r} not routed", main
        if not self.s.modalities and (modality in NON_IMAGE_MODALITIES or "PixelData" not in tags
                                      and "Rows" not in tags):
            return False, f"not an image series ({modality})", main
        if self.s.description_rx and not self.s.description_rx.search(str(main.get("SeriesDescription", ""))):
            return False, "series description does not match", main
        if self.s.label:
            study_labels = _get(f"/studies/{series['ParentStudy']}").get("Labels", [])
            if self.s.label not in study_labels:
                return False, f"study has no label {self.s.label!r}", main
        return True, "", main

    # ---------------------------------------------------------------------------------- threads
    def _dispatch_loop(self) -> None:
        try:
            self._setup()
        except Exception as exc:  # noqa: BLE001 - keep the thread alive; a later store names the failure
            _log(f"could not register modality {MODALITY_NAME}: {exc}")
        while not self.stop.is_set():
            due = [sid for sid, r in self.retries.items() if r["next"] <= time.monotonic()]
            if due:
                for sid in due:
                    self._attempt(sid)
                continue
            wait = min((r["next"] for r in self.retries.values()), default=None)
            try:
                series_id = self.work.get(timeout=None if wait is None else max(0.0, wait - time.monotonic()))
            except queue.Empty:
                continue
            if series_id:
                self._attempt(series_id)

    def _attempt(self, series_id: str) -> None:
        """One send of a series; a failure the node may get over is tried again later (``retries``)."""
        try:
            self._dispatch(series_id)
            self.retries.pop(series_id, None)
        except _StoreFailed as exc:
            now = time.monotonic()
            retry = self.retries.setdefault(series_id, {"attempts": 0, "first": now})
            retry["attempts"] += 1
            n, spent = retry["attempts"], now - retry["first"]
            delay = min(self.s.retry_s * 2 ** (n - 1), max(self.s.retry_s, 300.0))
            if exc.retryable and spent + delay <= self.s.timeout_s:
                retry["next"] = now + delay
                reason = (f"not sent yet: attempt {n} failed: {exc}; next attempt in {delay:.0f} s (until "
                          f"{self.s.timeout_s:.0f} s after the first failure)")
                _log(f"series {series_id}: {reason}")
                self.mark(series_id, QUEUED, reason)
                return
            self.retries.pop(series_id, None)
            reason = f"not sent to srnode after {n} attempt(s) over {spent:.0f} s: {exc}"
            _log(f"series {series_id}: {reason}")
            self.mark(series_id, FAILED, reason)
        except Exception as exc:  # noqa: BLE001 - one bad series must not stop routing
            self.retries.pop(series_id, None)
            _log(f"series {series_id}: not sent: {exc}")
            self.mark(series_id, FAILED, f"not sent to srnode: {exc}")

    def _dispatch(self, series_id: str) -> None:
        ok, why, main = self.wanted(series_id)
        if not ok:
            _log(f"series {series_id} left alone: {why}")
            return
        # sent again (instances came after it was stable, maybe after it was done): an earlier mark and the
        # tracking of an earlier send no longer say anything about the series as it is now
        with self.lock:
            self.pending.pop(series_id, None)
        if series_id not in self.retries:  # a retry keeps the words of the failure before it until it is sent
            self.mark(series_id, QUEUED)
        after = self._last_job_id(str(main.get("SeriesInstanceUID", "")))
        known: list[str] = []  # without HttpUrl: the study's series before this send (an earlier result among them)
        if not self.s.http_url:
            study_id = _get(f"/series/{series_id}").get("ParentStudy", "")
            known = [str(s.get("ID", "")) for s in _get(f"/studies/{study_id}/series")] if study_id else []
        body = {"Resources": [series_id], "Asynchronous": True, "Priority": 0}
        job = json.loads(orthanc.RestApiPost(f"/modalities/{MODALITY_NAME}/store", json.dumps(body)))
        job_id = job["ID"]
        deadline = time.monotonic() + self.s.timeout_s
        info: dict[str, Any] = {}
        while not self.stop.is_set():
            info = _get(f"/jobs/{job_id}")
            if info.get("State") == "Success":
                break
            if info.get("State") == "Failure":
                raise _store_failure(job_id, info)
            if time.monotonic() > deadline:
                raise RuntimeError(f"C-STORE job {job_id} did not finish in {self.s.timeout_s:.0f} s")
            self.stop.wait(0.5)
        if series_id in self.retries:  # sent at last: the words of the failed attempts no longer hold
            self.mark(series_id, QUEUED)
        now = _get(f"/series/{series_id}")
        parent = now["ParentStudy"]
        content = (info.get("Content", {}) or {}) if info.get("State") == "Success" else {}
        if "InstancesCount" in content:  # what the store job sent, less what failed
            sent = int(content.get("InstancesCount") or 0) - int(content.get("FailedInstancesCount", 0) or 0)
        else:  # an Orthanc whose job content lacks it: the series as it is now (never fewer than were sent)
            sent = len(now.get("Instances", [])) if info.get("State") == "Success" else 0
        self.declare(str(_get(f"/studies/{parent}").get("MainDicomTags", {}).get("StudyInstanceUID", "")),
                     str(main.get("SeriesInstanceUID", "")), sent)
        with self.lock:
            self.pending[series_id] = {"uid": main.get("SeriesInstanceUID", ""), "study": parent,
                                       "since": time.monotonic(), "sent": sent, "after": after, "known": known}
        _log(f"series {series_id} sent to srnode ({sent} instance(s))")

    def declare(self, study_uid: str, series_uid: str, instances: int) -> bool:
        """Tell the node the series holds ``instances`` instances (all sent): it completes the series once they
        are in, without its quiet period. Needs HttpUrl (and DeclareSize); False, logged, when not told."""
        if not (self.s.http_url and self.s.declare_size) or instances < 1 or not study_uid or not series_uid:
            return False
        url = (f"{self.s.http_url}/series/{urllib.parse.quote(study_uid, safe='')}/"
               f"{urllib.parse.quote(series_uid, safe='')}/complete")
        req = urllib.request.Request(url, data=json.dumps({"instances": instances}).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        if self.s.token:
            req.add_header("Authorization", f"Bearer {self.s.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
            return True
        except (urllib.error.URLError, OSError, ValueError) as exc:
            _log(f"series {series_uid}: could not tell srnode its size ({instances}): {_node_problem(exc)}; it "
                 "waits its quiet period instead")
            return False

    def _track_loop(self) -> None:
        while not self.stop.wait(self.s.poll_s):
            with self.lock:
                items = list(self.pending.items())
            for series_id, info in items:
                try:
                    state, reason = self._result(info)
                except Exception as exc:  # noqa: BLE001 - node or REST hiccup: try again next round
                    problem = _node_problem(exc)
                    if problem != str(exc) and info.get("problem") != problem:  # refused: said once, not at INFO
                        _log(f"series {series_id}: state cannot be followed: {problem}")
                    else:
                        orthanc.LogInfo(f"srnode plugin: series {series_id}: state unknown yet: {exc}")
                    info["problem"] = problem
                    state, reason = "", ""
                if not state and time.monotonic() - info["since"] > self.s.timeout_s:
                    state, reason = FAILED, f"no result after {self.s.timeout_s:.0f} s" + (
                        f" (last: {info['problem']})" if info.get("problem") else "")
                if state:
                    self.mark(series_id, state, reason)
                    with self.lock:
                        self.pending.pop(series_id, None)
                    _log(f"series {series_id}: {state}" + (f" ({reason})" if reason else ""))

    # ---------------------------------------------------------------------------------- results
    def _result(self, info: dict[str, Any]) -> tuple[str, str]:
        if self.s.http_url:
            return self._result_from_node(info)
        return self._result_from_study(info)

    def _node_jobs(self, series_uid: str) -> list[dict[str, Any]]:
        url = f"{self.s.http_url}/jobs?series={urllib.parse.quote(series_uid)}"
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.s.token:
            req.add_header("Authorization", f"Bearer {self.s.token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            jobs = json.loads(resp.read().decode("utf-8")).get("jobs", [])
        return [j for j in jobs if isinstance(j, dict)]

    def _last_job_id(self, series_uid: str) -> int:
        """The id of the node's newest job of the series before a send (0: none, no HttpUrl, or not known)."""
        if not self.s.http_url or not series_uid:
            return 0
        try:
            return max((int(j.get("id", 0) or 0) for j in self._node_jobs(series_uid)), default=0)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            _log(f"series {series_uid}: could not ask srnode for its jobs ({_node_problem(exc)})")
            return 0

    def _result_from_node(self, info: dict[str, Any]) -> tuple[str, str]:
        # only a job made after this send, or one holding all it sent: an earlier job of the series (made before
        # instances that came late) says nothing of the series as it was sent
        jobs = [j for j in self._node_jobs(str(info["uid"]))
                if int(j.get("id", 0) or 0) > int(info.get("after", 0))
                or int(j.get("n_instances", 0) or 0) >= int(info.get("sent", 0))]
        if not jobs:
            return "", ""
        job = max(jobs, key=lambda j: int(j.get("id", 0) or 0))
        state = str(job.get("state", ""))
        if state == "delivered":
            return DONE, ""
        if state in ("ignored", "skipped"):  # left alone by the node's rules on purpose: no failure
            return IGNORED, str(job.get("reason", state))
        if state in ("failed", "dead-letter"):
            return FAILED, str(job.get("reason", state))
        return "", ""

    def _result_from_study(self, info: dict[str, Any]) -> tuple[str, str]:
        for other in _get(f"/studies/{info['study']}/series"):
            if other.get("ID") in info.get("known", ()):  # there before this send: a result of an earlier one
                continue
            instances = other.get("Instances", [])
            if not instances:
                continue
            tags = _get(f"/instances/{instances[0]}/tags?simplify")
            if not self.is_own_output(tags):
                continue
            for ref in tags.get("ReferencedSeriesSequence", []) or []:
                if isinstance(ref, dict) and ref.get("SeriesInstanceUID") == info["uid"]:
                    return DONE, ""
        return "", ""


_PLUGIN: SrNodePlugin | None = None


def on_change(change_type: int, level: int, resource_id: str) -> None:
    """Orthanc's change callback: never blocks; the threads do the work."""
    global _PLUGIN
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        section = json.loads(orthanc.GetConfiguration()).get("SrNode", {})
        _PLUGIN = SrNodePlugin(_Settings(section))
        _PLUGIN.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        if _PLUGIN is not None:
            _PLUGIN.shutdown()
            _PLUGIN = None
    elif change_type == orthanc.ChangeType.STABLE_SERIES and _PLUGIN is not None:
        _PLUGIN.work.put(resource_id)


orthanc.RegisterOnChangeCallback(on_change)
