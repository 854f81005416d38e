"""Cardiac phases of a cine stack in one series (fieldmr16): each slice position holds one image per phase, and
TriggerTime, the phase's delay after the R wave, changes from position to position with the heart rate (each
position acquired in its own breath-hold). Before, the split took every distinct TriggerTime for a volume: 4 phases
of 6 positions became 24 volumes of one image each, none super-resolved, each refused on its own line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.errors import VolumeError
from node.series import load_volumes
from tests.support.series import mr_variant, phantom_stack

PHASES = 4


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return phantom_stack(tmp_path_factory.mktemp("phantom"))


def _cine(phantom: list[Path], out: Path, rr_ms: Callable[[int], float]) -> list[Path]:
    """PHASES images per position, phase p at p/PHASES of the position's R-R interval ``rr_ms(k)``; the pixels of
    phase p offset by 100 p (a marker of the phase)."""
    def phase(p: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.TriggerTime = f"{p * rr_ms(k) / PHASES:.2f}"
            ds.AcquisitionNumber = 1
            a = ds.pixel_array
            ds.PixelData = (a.astype(np.int32) + 100 * p).clip(0, 4095).astype(a.dtype).tobytes()
        return change
    return [f for p in range(PHASES) for f in mr_variant(phantom, out, f"ph{p}", phase(p))]


def test_cine_phases_whose_trigger_times_vary_with_the_heart_rate_are_one_volume_each(phantom: list[Path],
                                                                                       tmp_path: Path) -> None:
    files = _cine(phantom, tmp_path, lambda k: 800.0 + 37.0 * k)  # 800 .. 985 ms
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [(f"phase {p + 1}", 6) for p in range(PHASES)]
    for p, v in enumerate(vols):
        assert {v.datasets.record(k).file.name[:3] for k in range(6)} == {f"ph{p}"}  # type: ignore[union-attr]
    assert any("TriggerTime" in n for n in vols[1].notes), vols[1].notes


def test_cine_phases_with_the_same_trigger_times_at_every_position_keep_their_trigger_labels(
        phantom: list[Path], tmp_path: Path) -> None:
    vols = load_volumes(_cine(phantom, tmp_path, lambda k: 800.0))
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("trigger 0 ms", 6), ("trigger 200 ms", 6),
                                                          ("trigger 400 ms", 6), ("trigger 600 ms", 6)]


def test_cine_with_a_phase_missing_at_one_position_is_refused_in_one_line(phantom: list[Path],
                                                                          tmp_path: Path) -> None:
    """Ranked by TriggerTime, the images of a position missing a phase would be given the next phases': refused,
    saying so, instead of 23 volumes of one image."""
    files = _cine(phantom, tmp_path, lambda k: 800.0 + 37.0 * k)
    gone = next(f for f in files if f.name.startswith("ph2-") and f.name.endswith("0003.dcm"))
    with pytest.raises(VolumeError) as e:
        load_volumes([f for f in files if f != gone])
    msg = str(e.value)
    assert "TriggerTime" in msg and "not super-resolved" in msg, msg


def test_two_acquisitions_whose_trigger_times_run_in_opposite_slice_orders_are_split_by_acquisition(
        phantom: list[Path], tmp_path: Path) -> None:
    """break16: two acquisitions of the 6 positions (AcquisitionNumber 1 and 2, the second's pixels + 100),
    TriggerTime each slice's time within its acquisition: ascending in the first, descending in the second. Every
    position holds 2 images of different TriggerTime, so the TriggerTime rank also explains the repeats with 2
    volumes, and it came first: 'phase 1' and 'phase 2' each stacked slices of both acquisitions, alternating
    contrast without a word (the GE 3D T1 cut to 10 slices likewise). A rank is inferred; AcquisitionNumber is
    stated: with as few volumes, the stated attribute now wins (before fieldmr16: 'acquisition 1', 'acquisition 2')."""
    def acquisition(n: int) -> Callable[[pydicom.Dataset, int], None]:
        def change(ds: pydicom.Dataset, k: int) -> None:
            ds.AcquisitionNumber = n
            ds.TriggerTime = f"{100 * (k if n == 1 else 5 - k) + 7}"
            if n == 2:
                a = ds.pixel_array
                ds.PixelData = (a.astype(np.int32) + 100).clip(0, 4095).astype(a.dtype).tobytes()
        return change

    files = mr_variant(phantom, tmp_path, "a1", acquisition(1)) + mr_variant(phantom, tmp_path, "a2", acquisition(2))
    vols = load_volumes(files)
    assert [(v.volume_label, v.shape[0]) for v in vols] == [("acquisition 1", 6), ("acquisition 2", 6)]
    for n, v in enumerate(vols, start=1):
        assert {v.datasets.record(k).file.name[:2] for k in range(6)} == {f"a{n}"}  # type: ignore[union-attr]
