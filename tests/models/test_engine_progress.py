"""The engine's progress callback (``models.engine.Progress``): stages named, counts increasing to their totals."""

from __future__ import annotations

from models.engine import EngineOptions, Factors, get_engine, upscale
from tests.models.test_engine_selfsup import _phantom, _thick


def test_selfsup_reports_fine_tuning_and_passes_in_order() -> None:
    calls: list[tuple[str, int, int, float | None]] = []

    def progress(stage: str, done: int, total: int, loss: float | None = None) -> None:
        calls.append((stage, done, total, loss))

    opts = EngineOptions(finetune_steps=6, tta_passes=4, device="cpu", min_gain_db=-1e9)  # type: ignore[arg-type]
    res = upscale(get_engine("selfsup", opts), _thick(_phantom((17, 48, 48))), Factors(2, 2), progress)
    assert res.engine == "selfsup" and not res.fallback
    stages = list(dict.fromkeys(c[0] for c in calls))
    assert stages == ["through fine-tune", "through passes", "in passes"], stages
    for stage in stages:
        done = [c[1] for c in calls if c[0] == stage]
        totals = {c[2] for c in calls if c[0] == stage}
        assert len(totals) == 1 and done == sorted(done) and done[-1] == totals.pop(), (stage, done)
    tune = [c for c in calls if c[0] == "through fine-tune"]
    assert [c[1] for c in tune] == list(range(1, 7)) and all(c[3] is not None and c[3] >= 0 for c in tune)


def test_engines_without_progress_run_as_before() -> None:
    """cubic takes no ``progress``: ``upscale`` calls it without one."""
    seen: list[str] = []
    res = upscale(get_engine("cubic"), _thick(_phantom((9, 32, 32))), Factors(2, 1),
                  lambda stage, done, total, loss=None: seen.append(stage))
    assert res.data.shape == (9, 32, 32) and seen == []
