"""The generated phantom (``make demo`` without ../shared/data, many tests): its pixel values agree with its header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from node.app.phantom import SLAB_SUBSAMPLES, phantom_hu, write_phantom_series


def test_each_slice_is_the_mean_of_the_object_over_its_declared_thickness(tmp_path: Path) -> None:
    """The files declare SliceThickness = the slice step; an engine that models the slice profile from it must
    see slabs, not point samples of a sharp skull (point samples made the engine overshoot where slices graze
    the skull, −3.2 dB under cubic; bench/results/phantom14-*)."""
    slices, step, n = 6, 2.5, SLAB_SUBSAMPLES
    slab = phantom_hu(slices, 48, step, 200.0, noise_hu=0.0)
    # the same object point-sampled n times finer (same z extent, so the same ellipsoid), n-slice means
    fine = phantom_hu(slices * n, 48, step / n, 200.0, thickness_mm=0.0, noise_hu=0.0)
    want = fine.reshape(slices, n, 48, 48).mean(axis=1)
    assert np.allclose(slab, want, atol=1e-3)
    mixed = (slab > -999.0) & (slab < 999.0) & ~np.isin(slab, [35.0, 8.0, 70.0, 10.0, 300.0, 60.0])
    assert mixed.any()  # partial volume where a slab holds skull and air or brain (else nothing was averaged)
    files = write_phantom_series(tmp_path / "a", slices, 48, step, 200.0)
    ds = pydicom.dcmread(files[0])
    assert float(ds.SliceThickness) == step
    written = np.stack([pydicom.dcmread(p).pixel_array.astype(np.float64) - 1024.0 for p in files])
    noisy = phantom_hu(slices, 48, step, 200.0)
    assert np.array_equal(written, np.clip(np.rint(noisy + 1024.0), 0, 4095) - 1024.0)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_phantom_series(tmp_path / "a", 4, 32, 2.5, 200.0, seed=3)
    b = write_phantom_series(tmp_path / "b", 4, 32, 2.5, 200.0, seed=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
