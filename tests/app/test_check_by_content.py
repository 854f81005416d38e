"""`srnode check` reads its folders by content, not by name: the folder a dcmtk storescp filled (``CT.<uid>``,
``PM.<uid>``, no ``.dcm``) is checked like the one ``srnode process`` wrote."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.app.check_cmd import check_folders
from node.app.phantom import write_phantom_series
from node.dicom_read import dicom_files
from tests.support.peers import STORESCP, free_port, storescu, wait_until


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with its default file names (``<modality>.<SOPInstanceUID>``, no extension)."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    with (tmp_path / "storescp.log").open("wb") as logf:
        proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), str(port)],
                                stdout=logf, stderr=subprocess.STDOUT)
        yield port, out
        proc.terminate()
        proc.wait(timeout=10)


def test_check_reads_a_storescp_folder_whose_files_have_no_dcm_extension(tmp_path: Path,
                                                                        pacs: tuple[int, Path]) -> None:
    """Before: every ``CT.<uid>`` / ``PM.<uid>`` was skipped and the input blamed ("8 image(s) in no derived
    series and not reported", rc 1). Now the derived series and its uncertainty map are read and checked."""
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--no-preview", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    written = sorted(out.rglob("*.dcm"))
    assert written
    port, received = pacs
    wait_until(lambda: storescu(written, port, aet="PACS", timeout=60).returncode == 0, timeout=60,
               what="storescp accepting the derived files")
    wait_until(lambda: len([p for p in received.iterdir() if p.is_file()]) >= len(written), timeout=60,
               what="storescp writing every file")
    names = sorted(p.name for p in received.iterdir())
    assert not any(n.endswith(".dcm") for n in names) and any(n.startswith("CT.") for n in names), names
    result = check_folders(files[0].parent, received, run_dciodvfy=False)
    assert result.ok and len(result.volumes) == 1, result.lines()
    assert not result.unreported, result.lines()
    # `srnode bench e2e --series` lists a folder the same way (by content)
    (received / "notes.txt").write_text("not DICOM\n")
    assert [p.name for p in dicom_files(received)] == names


def test_check_with_its_folders_swapped_says_so(tmp_path: Path) -> None:
    """``srnode check OUT IN`` read the derived objects as inputs and failed with "55 image(s) in no derived series"
    (one Parametric Map's frames counted as images; helper user19). Now: one line saying the first folder holds
    derived objects and that check takes INPUT then OUTPUT, exit 1; the right order still passes."""
    files = write_phantom_series(tmp_path / "in", slices=8, size=32, step_mm=3.0)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out),
                        "--engine", "cubic", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    swapped = subprocess.run([sys.executable, "-m", "node.app.cli", "check", str(out), str(files[0].parent),
                              "--no-dciodvfy"], capture_output=True, text=True, timeout=300)
    assert swapped.returncode == 1
    said = swapped.stdout + swapped.stderr
    assert "the first folder holds derived objects only" in said and "check takes INPUT then OUTPUT" in said, said
    assert "in no derived series" not in said
    right = subprocess.run([sys.executable, "-m", "node.app.cli", "check", str(files[0].parent), str(out),
                            "--no-dciodvfy"], capture_output=True, text=True, timeout=300)
    assert right.returncode == 0, right.stdout + right.stderr
