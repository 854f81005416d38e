"""The engine's code version on the derived objects and in their UIDs (issue #13, helper engine19).

selfsup's code changed the pixels of gap acquisitions (2026-12-03: every f-th output slice kept as acquired, the
z-pair fallback) while its ``version`` stayed "1" and the version did not enter the derived UIDs: a reprocess after
the upgrade wrote other pixels under the UIDs a PACS already held, and SoftwareVersions said "selfsup 1" on both.
Now the version is "2", it enters the UIDs (``settings_digest``), and a self-check's cubic says which engine
version decided it instead of "cubic 2"."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from models.cubic import CubicEngine
from models.engine import CpuPrecision, EngineOptions
from models.selfsup import SelfSupEngine
from node.app.phantom import write_phantom_series
from node.process.engines import settings_digest
from tests.support.process import engine_config, run_process


def _process(tmp_path: Path, src: Path, tag: str, min_gain: float) -> list[Path]:
    out = tmp_path / f"out-{tag}"
    r = run_process(src, out, engine_config(tmp_path / f"config-{tag}.toml", min_gain_db=min_gain))
    derived = sorted(out.glob("*/derived/*.dcm"))
    assert derived, r.stderr
    return derived


def test_derived_objects_state_the_engine_version_and_it_enters_their_uids(tmp_path: Path) -> None:
    assert SelfSupEngine.version == "2"
    src = tmp_path / "in"
    write_phantom_series(src, slices=9, size=64, step_mm=3.0, fov_mm=96.0)

    d = dcmread(_process(tmp_path, src, "sr", -99.0)[0], stop_before_pixels=True)
    eq = d.ContributingEquipmentSequence[0]
    assert "selfsup 2" in [str(v) for v in eq.SoftwareVersions], eq.SoftwareVersions
    assert "engine selfsup 2" in str(eq.ContributionDescription)
    assert "by engine selfsup 2 (settings and weights " in d.DerivationDescription, d.DerivationDescription
    # the version is part of the digest that enters the UIDs (version "1" keeps the digest it had before)
    opts = EngineOptions(device="cpu", fast=True, tta_passes=2, min_gain_db=-99.0, cpu_precision=CpuPrecision.FLOAT32)
    assert settings_digest(opts, "2") != settings_digest(opts, "1") == settings_digest(opts)
    assert f"(settings and weights {settings_digest(opts, '2')})" in d.DerivationDescription

    # the self-check's cubic: cubic's own version, and which selfsup version chose it
    c = dcmread(_process(tmp_path, src, "fallback", 99.0)[0], stop_before_pixels=True)
    eq = c.ContributingEquipmentSequence[0]
    want = f"cubic {CubicEngine.version} (fallback decided by selfsup 2)"
    assert want in [str(v) for v in eq.SoftwareVersions], eq.SoftwareVersions
    assert f"by engine {want}; fallback: internal gain" in c.DerivationDescription, c.DerivationDescription
    assert c.SeriesInstanceUID != d.SeriesInstanceUID
