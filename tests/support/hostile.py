"""Hostile inputs for the attack tests: small real CT series whose patient, study and series identity (and any
other attribute, well-formed or not) are set as an attack needs, written as DICOM files with pydicom."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement

from node.app.phantom import write_phantom_series


def set_raw(ds: Any, keyword: str, value: str) -> None:
    """Set ``keyword`` to ``value`` exactly as given (no pydicom validation or conversion, padded to an even
    length): a malformed value reaches the file as a hostile sender would write it."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    raw = value.encode("latin-1")
    raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def series(out: Path, seed: int, slices: int, *, study: str = "", series_uid: str = "",
           attrs: dict[str, str] | None = None, size: int = 32) -> list[Path]:
    """A phantom CT series (``slices`` x ``size``²) with StudyInstanceUID / SeriesInstanceUID replaced when given
    and every attribute of ``attrs`` written raw."""
    files = write_phantom_series(out, slices=slices, size=size, step_mm=3.0, seed=seed)
    for f in files:
        ds = dcmread(f)
        if study:
            ds.StudyInstanceUID = study
        if series_uid:
            ds.SeriesInstanceUID = series_uid
        for kw, v in (attrs or {}).items():
            set_raw(ds, kw, v)
        ds.save_as(f)
    return files


def channels(node: Any, token: str = "") -> dict[str, str]:
    """Every output channel of a running node as text: its log, the audit log, ``srnode status`` (text and
    --json), GET /jobs (every job, and the one-series filter) and /metrics."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    jobs = httpx.get(f"{node.http_url}/jobs", headers=headers, timeout=10)
    series_q = "".join(httpx.get(f"{node.http_url}/jobs", params={"series": j["series_uid"]}, headers=headers,
                                 timeout=10).text for j in jobs.json()["jobs"])
    audit = node.spool / "audit.log"
    return {
        "node log": node.log(),
        "audit log": audit.read_text() if audit.exists() else "",
        "srnode status": node.cli("status").stdout + node.cli("status").stderr,
        "srnode status --json": node.cli("status", "--json").stdout,
        "GET /jobs": jobs.text + series_q,
        "GET /metrics": httpx.get(f"{node.http_url}/metrics", timeout=10).text,
    }


def dump(jobs: list[dict[str, Any]]) -> str:
    return json.dumps(jobs, indent=1, default=str)[-3000:]
