"""fix13: srnode's own output must be recognised after a de-identifier has been over it. The guard read only
ContributingEquipmentSequence, which de-identifiers beyond the DICOM Basic Profile strip (a whitelist, or Orthanc's
/anonymize told to remove it): the derived series came back and was super-resolved again (11 -> 21 slices), and a
PACS routing it back would loop. The derived series also carries markers the Basic Profile (PS3.15 Table E.1-1)
keeps: srnode's code in DerivationCodeSequence, and SoftwareVersions "srnode <version>" (every srnode version wrote
it). Nothing that merely looks derived counts: another vendor's DERIVED\\SECONDARY MPR with the DICOM code for spatial
resampling is processed when a rule matches."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.app.phantom import write_phantom_series
from node.config import load_config
from node.jobs import match_rule
from tests.support.fixtures import ROOT
from tests.support.peers import Orthanc

CONFIG = '[[rules]]\nname = "everything"\nmatch = {}\nthrough_plane_factor = 2\n'


def srnode(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The derived series srnode makes of a 6-slice phantom (cubic, x2: 11 slices)."""
    work = tmp_path_factory.mktemp("own")
    write_phantom_series(work / "in", slices=6, size=32, step_mm=3.0, seed=7)
    (work / "all.toml").write_text(CONFIG)
    r = srnode("process", work / "in", work / "out", "--engine", "cubic", "--config", work / "all.toml",
               "--no-preview", "--quiet")
    assert r.returncode == 0 and "11 derived" in r.stdout, r.stdout + r.stderr
    return sorted((work / "out").rglob("derived/*.dcm"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_derived_series_without_contributing_equipment_is_still_left_alone(made: list[Path]) -> None:
    cfg = load_config(None)
    ds = pydicom.dcmread(made[0], stop_before_pixels=True)
    rule, why = match_rule(cfg, ds)
    assert rule is None and "derived by srnode already" in why, why
    del ds.ContributingEquipmentSequence
    rule, why = match_rule(cfg, ds)
    assert rule is None and "derived by srnode already" in why and "DerivationCodeSequence" in why, why
    del ds.DerivationCodeSequence  # srnode output written before the code: SoftwareVersions still says srnode
    rule, why = match_rule(cfg, ds)
    assert rule is None and "derived by srnode already" in why and "SoftwareVersions" in why, why


def test_another_vendors_derived_mpr_is_processed(made: list[Path], tmp_path: Path) -> None:
    """A vendor's DERIVED\\SECONDARY MPR: DICOM's spatial resampling code, its own Modifying Equipment, its own
    software version; the default rule matches it (thick CT) and it is not taken for srnode's output."""
    files = write_phantom_series(tmp_path / "mpr", slices=6, size=32, step_mm=3.0, seed=8)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    ds.DerivationCodeSequence = DicomSequence([_code("113085", "DCM", "Spatial resampling")])
    ds.SoftwareVersions = "VendorMPR 4.2"
    vendor = Dataset()
    vendor.Manufacturer = "Vendor"
    vendor.PurposeOfReferenceCodeSequence = DicomSequence([_code("109103", "DCM", "Modifying Equipment")])
    ds.ContributingEquipmentSequence = DicomSequence([vendor])
    rule, why = match_rule(load_config(None), ds)
    assert rule is not None, why


def test_srnode_output_de_identified_by_orthanc_without_contributing_equipment_is_left_alone(
        made: list[Path], orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc's /anonymize (PS3.15 Basic Profile, 2021b) told to remove ContributingEquipmentSequence too; the
    result, given to `srnode process`, was super-resolved again (11 -> 21 slices)."""
    out = tmp_path / "deid"
    out.mkdir()
    with orthanc.client() as c:
        series = {c.post("/instances", content=f.read_bytes()).json()["ParentSeries"] for f in made}
        assert len(series) == 1
        r = c.post(f"/series/{series.pop()}/anonymize", json={"Remove": ["ContributingEquipmentSequence"]})
        assert r.status_code == 200, r.text
        for k, iid in enumerate(c.get(f"/series/{r.json()['ID']}/instances").json()):
            ds = pydicom.dcmread(io.BytesIO(c.get(f"/instances/{iid['ID']}/file").content))
            assert "ContributingEquipmentSequence" not in ds and "PatientIdentityRemoved" in ds
            assert "SeriesDescription" not in ds and "DerivationDescription" not in ds  # Basic Profile: removed
            ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
    assert len(list(out.glob("*.dcm"))) == len(made)
    (tmp_path / "all.toml").write_text(CONFIG)
    r = srnode("process", out, tmp_path / "again", "--engine", "cubic", "--config", tmp_path / "all.toml",
               "--no-preview", "--quiet")
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 1 and "left alone: derived by srnode already" in lines[0], r.stdout + r.stderr
    assert r.returncode == 0 and not list((tmp_path / "again").rglob("*.dcm"))


def test_every_uncertainty_object_carries_a_marker_beyond_contributing_equipment(tmp_path: Path) -> None:
    """The Parametric Map and the card have SoftwareVersions "srnode <version>" (General Equipment) too."""
    from models.engine import Factors
    from node.config import DeriveConfig, UncertaintyObject
    from node.derived import derive_series
    from node.series import load_series
    from tests.support.engines import SigmaCubic

    vol = load_series(write_phantom_series(tmp_path, slices=6, size=32, step_mm=3.0, seed=9))
    factors = Factors(2, 1)
    out = derive_series(vol, SigmaCubic().upscale(vol.to_engine_input(), factors), factors,
                        DeriveConfig(uncertainty=UncertaintyObject.BOTH), "0")
    objects = [out.derived[0], *out.uncertainty]
    assert len(objects) == 3
    cfg = load_config(None)
    for ds in objects:
        del ds.ContributingEquipmentSequence
        rule, why = match_rule(cfg, ds)
        assert rule is None and "derived by srnode already" in why, (ds.SOPClassUID, why)
