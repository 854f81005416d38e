"""Held-out pairs whose thick inputs are made through a slice profile over the source images
(``degrade.make_pairs(lr_profile=...)``, ``selfsup.VAL_PAIRS_LR``; issue #13 item 3, helper engine19): with the
engine's own kind (box) they equal its discrete operator D on contiguous slabs; with the other kind of the same FWHM
(gaussian) they differ where the object has detail finer than the slab (the engine's error under a profile it does
not assume)."""

from __future__ import annotations

import numpy as np

from models.degrade import DegradationModel, make_pairs


def _models() -> list[DegradationModel]:
    return [DegradationModel(2, 1, 2.0, 2.0, 0.5), DegradationModel(2, 1, 2.0, 3.0, 0.5),
            DegradationModel(5, 1, 5.0, 5.0, 0.5), DegradationModel(2, 1, 2.0, 1.0, 0.5)]


def test_box_inputs_equal_the_operators_on_smooth_content_with_the_same_shapes() -> None:
    y = np.arange(200, dtype=np.float32)[None, :, None] / 200 * np.ones((2, 1, 8), np.float32)
    img = np.sin(6 * y).astype(np.float32)
    for m in _models():
        lr, hr = make_pairs(img, m, 0.5)
        lr_s, hr_s = make_pairs(img, m, 0.5, lr_profile="box")
        assert lr_s.shape == lr.shape and lr_s.dtype == np.float32
        np.testing.assert_array_equal(hr_s, hr)  # the targets do not change
        assert float(np.abs(lr_s - lr).max()) < 1e-3, m


def test_other_shape_inputs_differ_from_the_operator_at_detail_finer_than_the_slab() -> None:
    img = np.zeros((1, 200, 4), np.float32)
    img[:, 101:104] = 1.0  # a 1.5 mm layer on a 0.5 mm grid: finer than the 1 mm output grid of a 2 mm step x2
    m = DegradationModel(2, 1, 2.0, 2.0, 0.5)
    lr, _ = make_pairs(img, m, 0.5)
    np.testing.assert_allclose(make_pairs(img, m, 0.5, lr_profile="box")[0], lr, atol=1e-5)  # box slabs: D exact
    lr_s, _ = make_pairs(img, m, 0.5, lr_profile="gaussian")
    assert float(np.abs(lr_s - lr).max()) > 0.005  # 0.010 of the layer's 1.0
    assert abs(float(lr_s.sum()) - float(lr.sum())) < 0.05 * float(lr.sum())  # about the same signal, placed otherwise
