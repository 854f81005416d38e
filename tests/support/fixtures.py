"""The shared fixtures of srnode's tests, loaded as a pytest plugin by ``tests/conftest.py``.

Real peers only: a session Orthanc (Debian's binary on a free loopback port), the shared real-data folder. The
peers themselves (dcmtk tools, Orthanc, the node as a process, a PKI) live beside this module in
``tests/support``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import _config

from tests.support.peers import Orthanc, start_orthanc

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_CASES = ROOT.parent / "shared" / "cases"


def shared_series(name: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / name
    if not p.is_dir():
        pytest.skip(f"real scanner data not present: {p} (CI always has ../shared/data)")
    return p


def shared_case(name: str, out: Path) -> list[Path]:
    """Build the rebuildable case ``../shared/cases/<name>`` (its make_case.py) into ``out``; returns its files
    sorted by name. Skips the test with the reason when ../shared is absent."""
    script = SHARED_CASES / name / "make_case.py"
    if not script.is_file() or not SHARED_DATA.is_dir():
        pytest.skip(f"shared case not present: {script} (CI always has ../shared)")
    env = {**os.environ, "SHARED_DATA": str(SHARED_DATA)}
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"{name}/make_case.py failed: {r.stdout}{r.stderr}"
    return sorted(p for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scanner data not present: {SHARED_DATA} (CI always has ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A plain real Orthanc (PACS stand-in) for the whole session; tests call ``orthanc.clear()`` if needed."""
    o = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield o
    o.stop()


@pytest.fixture
def raw_send() -> Iterator[None]:
    """Send files as they are on disk (pynetdicom's chunked send, no re-encoding): the command's UIDs come from
    the file meta, and broken bodies reach the node broken."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
