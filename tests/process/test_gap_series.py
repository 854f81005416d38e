"""A gap acquisition through `srnode process`: 2 mm slices every 3 mm (SliceThickness under the step of the
positions). The derived series keeps each acquired slice as it is at its own position, states the acquired
thickness, and the engine log names the gap (issue #13, helper engine18; docs/engines.md 2026-12-03)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from node.app.phantom import write_phantom_series
from tests.support.process import engine_config, run_process


def _hu(path: Path) -> np.ndarray:
    ds = dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_a_gap_series_keeps_its_acquired_slices_where_they_were_acquired(tmp_path: Path) -> None:
    """The engine modelled each 2 mm slice as the mean of 1.5 mm output slices around it (a box of 1.33 output
    samples): data consistency then moved the derived slice at each acquired position off the acquired one by up
    to 35 HU, though both are the same 2 mm slice at the same place."""
    src = tmp_path / "in"
    files = write_phantom_series(src, slices=9, size=64, step_mm=3.0, fov_mm=96.0)
    for p in files:
        ds = dcmread(p)
        ds.SliceThickness = 2.0
        ds.save_as(p)
    out = tmp_path / "out"
    r = run_process(src, out, engine_config(tmp_path / "config.toml"))
    assert "(gap 1 mm)" in r.stderr and "of FWHM 1 mm" in r.stderr, r.stderr
    derived = sorted(out.glob("*/derived/*.dcm"))
    assert len(derived) == 17
    d0 = dcmread(derived[0], stop_before_pixels=True)
    assert "selfsup" in d0.DerivationDescription and "fallback" not in d0.DerivationDescription
    assert float(d0.SliceThickness) == 2.0
    worst = max(float(np.abs(_hu(derived[2 * k]) - _hu(p)).max()) for k, p in enumerate(files))
    assert worst <= 1.0, worst  # HU: the stored values' rounding only
