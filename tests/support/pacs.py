"""Helpers for the PACS-ecosystem tests: Orthanc with the DICOMweb + Python plugins, the real node, phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support.nodeproc import NodeProc
from tests.support.peers import ORTHANC_PLUGINS, Orthanc, start_orthanc, wait_until

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "orthanc" / "plugin.py"
TOKEN = "test-token-3f9a"


def orthanc_dicomweb(workdir: Path, *, srnode: dict[str, Any] | None = None,
                     modalities: dict[str, list[Any]] | None = None) -> Orthanc:
    """Orthanc 1.10 with DICOMweb; with ``srnode`` (the SrNode section) also the Python plugin + our script."""
    plugins = [ORTHANC_PLUGINS / "libOrthancDicomWeb.so"]
    extra: dict[str, Any] = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    if srnode is not None:
        plugins.append(ORTHANC_PLUGINS / "libOrthancPython.so")
        extra.update({"PythonScript": str(PLUGIN), "SrNode": srnode,
                      "UserMetadata": {"SrNodeState": 4242, "SrNodeReason": 4243}})
    return start_orthanc(workdir, plugins=plugins, modalities=modalities, extra=extra)


def start_node(workdir: Path, sections: dict[str, Any]) -> NodeProc:
    """The real node (nodeproc's fast base: cubic, stable_age_s 1) with the HTTP token and ``sections``."""
    sections = {**sections, "http": {"token": TOKEN, **sections.get("http", {})}}
    node = NodeProc.start(workdir, sections)
    wait_until(lambda: httpx.get(f"{node.http_url}/healthz", timeout=2).status_code == 200, 30,
               what="node /healthz")
    return node


def api(node: NodeProc, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=node.http_url, timeout=60,
                        headers={"Authorization": f"Bearer {token}"} if token else {})


def wait_job(node: NodeProc, series_uid: str, timeout: float = 120) -> dict[str, Any]:
    """The finished job of ``series_uid`` (from GET /jobs)."""
    def done() -> dict[str, Any] | None:
        with api(node) as c:
            for j in c.get("/jobs").json()["jobs"]:
                if j["series_uid"] == series_uid and j["state"] in ("delivered", "failed", "dead-letter"):
                    return dict(j)
        return None

    try:
        job: dict[str, Any] = wait_until(done, timeout, interval=0.3, what=f"job of series {series_uid}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nnode log:\n{node.log()[-4000:]}") from None
    return job


def phantom(workdir: Path, seed: int, slices: int = 6, size: int = 64) -> list[Path]:
    """A small generated CT series (distinct UIDs per seed)."""
    from node.app.phantom import write_phantom_series

    return write_phantom_series(workdir / f"phantom-{seed}", slices=slices, size=size, step_mm=3.0, seed=seed)


def upload(orthanc: Orthanc, files: list[Path]) -> None:
    with orthanc.client() as c:
        for f in files:
            c.post("/instances", content=f.read_bytes()).raise_for_status()
