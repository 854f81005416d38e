"""Long series: deriving does work linear in the slices (issue #15 item 5: 5000 slices took 652 s against 40 s for
1000, because every derived object re-hashed every input UID). Counted, not timed: the per-instance helpers that
deriving calls must scale with the slices, not with their square."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from models.cubic import CubicEngine
from models.engine import Factors
from node.bench.phantom import write_phantom_series
from node.config import DeriveConfig
from node.derived import derive_series, modules
from node.series import load_series, sop_instance_of
from node.series import volume as volume_module


def _calls_to_derive(tmp_path: Path, slices: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """(calls of sop_instance_of while deriving a ``slices``-slice series x2, derived objects made)."""
    vol = load_series(write_phantom_series(tmp_path / f"s{slices}", slices=slices, size=8, step_mm=2.0))
    factors = Factors(2, 1)
    res = CubicEngine().upscale(vol.to_engine_input(), factors)
    calls = [0]

    def counted(ds: object) -> str:
        calls[0] += 1
        return sop_instance_of(ds)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        for mod in (volume_module, modules):
            m.setattr(mod, "sop_instance_of", counted)
        out = derive_series(vol, res, factors, DeriveConfig(), CubicEngine.version)
    return calls[0], len(out.derived) + len(out.uncertainty)


def test_deriving_reads_each_input_uid_a_bounded_number_of_times(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    small, made_small = _calls_to_derive(tmp_path, 20, monkeypatch)
    large, made_large = _calls_to_derive(tmp_path, 80, monkeypatch)
    assert made_large > 3.5 * made_small
    # linear: 4x the slices -> about 4x the calls (quadratic gave ~16x: every object hashed every input UID)
    assert large <= 5 * small, (small, large)
    assert large <= 6 * 80, (small, large)


def test_instances_digest_is_the_uid_set_hash_and_kept(tmp_path: Path) -> None:
    """The digest in the derived UIDs is unchanged (a resend after an upgrade overwrites, never duplicates)."""
    vol = load_series(write_phantom_series(tmp_path / "d", slices=6, size=8, step_mm=2.0))
    want = hashlib.sha256("\n".join(sorted({sop_instance_of(d) for d in vol.datasets})).encode()).hexdigest()[:16]
    assert vol.instances_digest == want
    assert vol.instances_digest is vol.instances_digest  # computed once
