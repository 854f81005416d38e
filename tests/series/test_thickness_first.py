"""SliceThickness absent (or empty) on the first slice of a series and stated, alike, on the others: taken from the
others. Before, the rules matched on the first instance's header alone (the default "SliceThickness 2 mm or more"
rule: "SliceThickness absent does not match", the series left alone) and, with a rule that matched, the volume took
the first slice's thickness (none): the derived series said nothing of its thickness (SliceThickness empty) and the
engine had no slice profile. Checked through the load, ``srnode process`` and the real node."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config.load import THICK_2MM_OR_MORE
from node.errors import VolumeError
from node.series import load_volumes
from tests.support.nodeproc import ROOT, NodeProc
from tests.support.peers import storescu
from tests.support.series import edited_phantom

THICK_RULE = {"name": "thick", "match": {"Modality": "^(CT|MR)$", "SliceThickness": THICK_2MM_OR_MORE},
              "through_plane_factor": 2, "destinations": ["out"]}


def _without(which: Callable[[int, Dataset], bool], how: str) -> Callable[[int, Dataset], None]:
    def change(k: int, ds: Dataset) -> None:
        if which(k, ds):
            if how == "absent":
                del ds.SliceThickness
            else:
                ds.SliceThickness = None
    return change


@pytest.mark.parametrize("how", ["absent", "empty"])
def test_the_first_slice_without_a_thickness_takes_the_others(tmp_path: Path, how: str) -> None:
    files = edited_phantom(tmp_path, _without(lambda k, ds: k == 0, how), slices=8)
    (vol,) = load_volumes(files)
    assert vol.slice_thickness == 3.0
    assert any("SliceThickness absent on 1 image(s) (CT0001.dcm): 3 mm, as the other 7 state" in n for n in vol.notes)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(files[0].parent), str(out), "--engine",
                        "cubic", "--no-preview", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rule ct-mr-thick" in r.stdout, r.stdout + r.stderr  # the default rules
    derived = sorted(out.rglob("derived/*.dcm"))
    assert len(derived) == 15
    assert {float(pydicom.dcmread(p, stop_before_pixels=True).SliceThickness) for p in derived} == {3.0}


def test_slices_that_disagree_give_no_thickness_to_the_first(tmp_path: Path) -> None:
    def change(k: int, ds: Dataset) -> None:
        if k == 0:
            del ds.SliceThickness

    files = edited_phantom(tmp_path, change, slices=8)
    for f in files[5:]:  # 3 mm on slices 2-5, 2 mm on 6-8: which one slice 1 had cannot be told
        ds = pydicom.dcmread(f)
        ds.SliceThickness = "2"
        ds.save_as(f)
    with pytest.raises(VolumeError, match="different SliceThickness values"):
        load_volumes(files)


def test_the_node_matches_its_rules_with_the_thickness_of_the_other_instances(tmp_path: Path) -> None:
    files = edited_phantom(tmp_path, lambda k, ds: None, slices=8)
    uids = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    first = min(files, key=lambda f: uids[f])  # the index's first instance: received first, lowest UID on a tie
    ds = pydicom.dcmread(first)
    del ds.SliceThickness
    ds.save_as(first)
    with NodeProc.start(tmp_path / "node", {"rules": [THICK_RULE]}) as node:
        r = storescu([first, *[f for f in files if f != first]], node.port)
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 1 and js[0]["state"] in ("delivered", "failed", "ignored"),
                              what="the series' job settled")
    assert jobs[0]["state"] == "delivered", jobs
    derived = sorted((tmp_path / "node" / "out").rglob("*.dcm"))
    assert len(derived) == 15
    assert {float(pydicom.dcmread(p, stop_before_pixels=True).SliceThickness) for p in derived} == {3.0}
