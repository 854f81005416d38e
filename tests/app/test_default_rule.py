"""The default rule (embedded defaults = config.toml): thick CT/MR only; thin series are left alone, with the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import load_config
from node.jobs import match_rule
from node.series import read_header
from tests.support.fixtures import ROOT, shared_series


def test_the_embedded_rule_is_config_tomls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SRNODE_HTTP_TOKEN", "test-token")  # the deploy configs read their token from it
    embedded, shipped = load_config(None), load_config(ROOT / "config.toml")
    assert embedded.rules == shipped.rules
    assert embedded.rules[0].match["SliceThickness"]
    for deploy in ("deploy/config.toml", "deploy/config-celery.toml"):
        assert load_config(ROOT / deploy).rules[0].match == shipped.rules[0].match


@pytest.mark.parametrize(("series", "taken"), [
    ("ct_head_phantom_philips_5mm", True),  # the demo's series, 5 mm
    ("ct_body_j2k_siemens_petct", True),  # "3"
    ("ct_head_ge_tilted_irregular", True),  # "4.0"
    ("mr_epi_mosaic_siemens_single", True),  # "2.4000000953674"
    ("mr_t1_enhanced_multiframe_siemens_xa30", True),  # 2 mm, only in the functional groups
    ("ct_head_phantom_philips_1mm", False),  # "1"
    ("mr_t1_mprage_sag_siemens", False),  # "0.90000003576279"
    ("mr_t1_3d_axial_ge", False),  # "1.2"
])
def test_default_rule_on_real_series(series: str, taken: bool) -> None:
    header = read_header(sorted(shared_series(series).glob("*.dcm"))[0])
    rule, why = match_rule(load_config(None), header)
    assert (rule is not None) == taken, why
    if not taken:
        assert "thick CT/MR only: SliceThickness 2 mm or more" in why and "SliceThickness '" in why, why


def test_process_leaves_a_thin_mprage_alone_by_default(tmp_path: Path) -> None:
    src = shared_series("mr_t1_mprage_sag_siemens")
    for p in sorted(src.glob("*.dcm"))[90:93]:
        shutil.copy(p, tmp_path / p.name)
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(tmp_path), str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # the failing key first, the series' Modality last as context (it read as the failing key first; user19)
    assert "left alone: no rule matched: ct-mr-thick (thick CT/MR only: SliceThickness 2 mm or more): " \
           "SliceThickness '0.90000003576279' does not match" in r.stdout, r.stdout
    assert "(the series: Modality 'MR')" in r.stdout, r.stdout
    assert not list((tmp_path / "out").rglob("*.dcm")), "a thin series left alone must produce no derived object"


def test_a_rule_reason_shows_the_pattern_and_values_as_written(tmp_path: Path) -> None:
    """open16: the reason of a series left alone showed the rule's regular expression as a Python repr, every
    backslash doubled ('^([2-9]|[1-9][0-9]+)(\\\\.[0-9]*)?$' for the default rule's (\\.[0-9]*)), and a multi-valued
    attribute's values joined by two backslashes: not what config.toml says nor what the header holds. Now both
    are shown as they are (a control character in a value still escaped: one line in the log)."""
    from pydicom.dataset import Dataset

    from node.config import config_from_dict

    header = read_header(sorted(shared_series("mr_t1_mprage_sag_siemens").glob("*.dcm"))[0])
    cfg = load_config(None)
    pattern = cfg.rules[0].match["SliceThickness"]
    assert "\\." in pattern and "\\\\" not in pattern
    _, why = match_rule(cfg, header)
    assert f"does not match '{pattern}'" in why and "\\\\" not in why, why
    ds = Dataset()
    ds.Modality, ds.ImageType, ds.SeriesDescription = "CT", ["DERIVED", "SECONDARY"], "a\nb"
    cfg = config_from_dict({"rules": [{"name": "r", "match": {"ImageType": r"^ORIGINAL\\PRIMARY", "Modality": "CT"}},
                                      {"name": "s", "match": {"SeriesDescription": r"^\d+$"}}]})
    _, why = match_rule(cfg, ds)
    assert "ImageType 'DERIVED\\SECONDARY' does not match '^ORIGINAL\\\\PRIMARY'" in why, why
    assert "SeriesDescription 'a\\nb' does not match '^\\d+$'" in why and "\n" not in why, why
