"""A derived series made from lossy-compressed images says so (PS3.3 C.7.6.1.1.5: LossyImageCompression "01" is
never reset in derived images), whether the input says it in its header, in a lossy-only transfer syntax, or only
in its codestream (JPEG 2000 irreversible wavelet, JPEG-LS NEAR > 0); the uncertainty map and card too (break13f:
the derived series carried no LossyImageCompression and the Parametric Map said "00", not lossy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless

from node.app.check_cmd import check_folders
from node.config import UncertaintyObject, load_config, replace
from node.process import process_series
from tests.support.engines import SIGMA_TEST_ENGINE, sigma_engines
from tests.support.series import edited_phantom


def _series(tmp_path: Path, change: Callable[[int, Dataset], None]) -> list[Path]:
    return edited_phantom(tmp_path, change, enforce_file_format=True)


def _derive(tmp_path: Path, files: list[Path], sigma: bool = False) -> list[Dataset]:
    cfg = load_config(None)
    if not sigma:
        res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
        return [pydicom.dcmread(p) for p in res.derived_files]
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    return [pydicom.dcmread(p) for p in (*res.derived_files, *res.uncertainty_files)]


def _j2k_lossy(k: int, ds: Dataset) -> None:  # irreversible 9-7 wavelet, no header flag (as pydicom writes it)
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])


def _jls_near(k: int, ds: Dataset) -> None:
    if k == 2:  # one slice is enough
        ds.compress(JPEGLSNearLossless, encoding_plugin="pyjpegls", jls_error=3)


def _stated(k: int, ds: Dataset) -> None:  # decompressed since, the header keeps what was done
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "8.5"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


@pytest.mark.parametrize(("change", "ratio", "method"), [
    (_j2k_lossy, None, "ISO_15444_1"),
    (_jls_near, None, "ISO_14495_1"),
    (_stated, "8.5", "ISO_10918_1"),
])
def test_a_lossy_input_makes_every_derived_object_say_lossy(tmp_path: Path, change: Callable[[int, Dataset], None],
                                                            ratio: str | None, method: str) -> None:
    files = _series(tmp_path, change)
    out = _derive(tmp_path, files, sigma=change is _stated)
    assert out and all(str(d.get("LossyImageCompression", "")) == "01" for d in out), \
        [(d.SOPClassUID, d.get("LossyImageCompression")) for d in out]
    d0 = out[0]
    assert str(d0.get("LossyImageCompressionMethod", "")) == method
    assert (str(d0.LossyImageCompressionRatio) if "LossyImageCompressionRatio" in d0 else None) == ratio
    if change is _stated:  # the Parametric Map and the card say it too
        assert {str(d.SOPClassUID) for d in out} >= {"1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.7"}


def _j2k_lossless(k: int, ds: Dataset) -> None:
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")


def _j2k_reversible(k: int, ds: Dataset) -> None:  # the lossy-or-lossless syntax holding a reversible stream
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.file_meta.TransferSyntaxUID = JPEG2000


def _jls_lossless(k: int, ds: Dataset) -> None:
    ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")


@pytest.mark.parametrize("change", [lambda k, ds: None, _j2k_lossless, _j2k_reversible, _jls_lossless])
def test_a_lossless_input_is_not_marked_lossy(tmp_path: Path, change: Callable[[int, Dataset], None]) -> None:
    out = _derive(tmp_path, _series(tmp_path, change), sigma=change is _j2k_lossless)
    assert all(str(d.get("LossyImageCompression", "00")) == "00" for d in out)
    assert not any("LossyImageCompressionMethod" in d for d in out)


def test_srnode_check_wants_the_lossy_marking(tmp_path: Path) -> None:
    """``srnode check``'s own reader: a derived object of a lossy input without LossyImageCompression 01 fails."""
    files = _series(tmp_path, _stated)
    cfg = load_config(None)
    cfg = replace(cfg, derive=dataclasses.replace(cfg.derive, uncertainty=UncertaintyObject.BOTH))
    res = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name=SIGMA_TEST_ENGINE,
                         engines=sigma_engines())
    assert check_folders(tmp_path / "in", tmp_path / "out", run_dciodvfy=False).ok
    pm_path = next(p for p in res.uncertainty_files if p.name.startswith("PM"))
    pm = pydicom.dcmread(pm_path)
    pm.LossyImageCompression = "00"  # what the map said before break13f
    pm.save_as(pm_path, enforce_file_format=True)
    result = check_folders(tmp_path / "in", tmp_path / "out", run_dciodvfy=False)
    assert not result.ok
    assert "6 input image(s) lossy compressed" in result.lines()[0], result.lines()
    assert "without LossyImageCompression 01 (PM00001.dcm" in result.lines()[0], result.lines()
