"""Input headers read again (issue #15 item 5): once the volumes are built a job keeps a small record per input
slice (``node.series.SliceHeader``) and reads a slice's full header again from its file when a derived slice copies
from it. A file removed or replaced during the job must fail it with one line naming the file, never write a
derived slice without its copied attributes."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.app.phantom import write_phantom_series
from node.bench.ingest import write_series
from node.config import config_from_dict, load_config
from node.errors import DeriveError
from node.ingest import Admission
from node.ingest.admit import Caller
from node.jobs import run_job
from node.jobs.context import JobContext
from node.metrics import Metrics
from node.process import pipeline, process_series
from node.series import load_series
from node.store import JobState


def _during_engine(monkeypatch: pytest.MonkeyPatch, act: Any) -> None:
    """Call ``act()`` when the engine runs: after the volumes are built and the headers released, before any
    derived slice is made."""
    real = pipeline.run_engine

    def engine(*args: Any, **kwargs: Any) -> Any:
        act()
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_engine", engine)


def test_a_job_holds_records_and_reads_each_header_again_with_the_same_values(tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "p", slices=4, size=8, step_mm=3.0)
    vols = pipeline.load_volumes(files)
    pipeline._release_input_headers(vols)
    heads = vols[0].datasets
    assert heads.held == 0
    rec = heads.record(2)
    assert rec.file == files[2] and rec.sop_instance_uid == str(pydicom.dcmread(files[2]).SOPInstanceUID)
    again = heads[2]
    assert "PixelData" not in again and again.SOPInstanceUID == rec.sop_instance_uid
    assert heads[2] is again  # the last one read is kept for the next derived slice
    assert load_series(files).datasets.held == 0  # the load holds no single-frame header (read again when asked)


def test_an_input_removed_during_the_job_fails_it_naming_the_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_phantom_series(tmp_path / "p", slices=6, size=8, step_mm=3.0)
    cfg = load_config(None)
    _during_engine(monkeypatch, lambda: files[3].unlink())
    with pytest.raises(DeriveError) as err:
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    msg = str(err.value)
    assert f"input {files[3].name} is gone" in msg and "\n" not in msg, msg
    assert not list((tmp_path / "out").rglob("*.dcm")), "a derived slice was written without its input header"


def test_an_input_rewritten_in_place_with_its_mtime_put_back_fails_the_job(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Another patient's values written into the same file (same inode and size, its modification time set back, as
    ``cp -p`` / ``rsync --inplace -t`` can leave it): no derived series may mix the two patients."""
    files = write_phantom_series(tmp_path / "p", slices=6, size=8, step_mm=3.0)
    cfg = load_config(None)

    def rewrite() -> None:
        st = files[2].stat()
        ds = pydicom.dcmread(files[2])
        ds.PatientID = "X" * len(str(ds.PatientID))
        raw = io.BytesIO()
        ds.save_as(raw)
        assert len(raw.getvalue()) == st.st_size
        with open(files[2], "r+b") as fh:
            fh.write(raw.getvalue())
        os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))

    _during_engine(monkeypatch, rewrite)
    with pytest.raises(DeriveError, match=f"input {files[2].name} was changed since the series was loaded"):
        process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_an_input_replaced_by_the_same_bytes_or_touched_is_no_change(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_phantom_series(tmp_path / "p", slices=6, size=8, step_mm=3.0)
    cfg = load_config(None)

    def replace_and_touch() -> None:  # the same bytes under a new inode, as a resend written by rename would be
        tmp = files[1].with_suffix(".new")
        shutil.copyfile(files[1], tmp)
        os.replace(tmp, files[1])
        os.utime(files[3])

    _during_engine(monkeypatch, replace_and_touch)
    result = process_series(files, cfg.rules[0], cfg, tmp_path / "out", engine_name="cubic")
    assert len(result.derived_files) == 11


def test_a_spool_file_gone_during_a_job_fails_the_job_with_one_line(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({
        "node": {"spool_dir": str(tmp_path / "spool")},
        "engine": {"name": "cubic", "device": "cpu"},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "through_plane_factor": 2, "destinations": []}],
    })
    ctx = JobContext.open(cfg)
    files = write_series(tmp_path / "ct", 31, 6, 16, tag="rr-")
    adm = Admission(ctx.cfg, ctx.store.spool, ctx.store.index, Metrics.create())
    for f in files:
        adm.admit_file(f, Caller("CT01"))
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    spooled = sorted(Path(i.path) for i in ctx.store.index.instances_of(series))
    assert len(spooled) == 6
    _during_engine(monkeypatch, lambda: spooled[2].unlink())
    job_id = ctx.store.index.create_job(series, "ct")
    run_job(ctx, job_id)
    job = ctx.store.index.job(job_id)
    assert job.state == JobState.FAILED, (job.state, job.reason)
    assert f"input {spooled[2].name} is gone" in job.reason and "\n" not in job.reason, job.reason
    assert ctx.store.index.deliveries(job_id) == []
    assert not (ctx.store.spool.outbox / f"job-{job_id}").exists()  # nothing of the failed build left behind


def test_srnode_process_leaves_no_partial_series_when_an_input_changes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``srnode process``: a series whose build fails part-way has its report saying so and no derived or
    uncertainty file beside it (the build is written aside and moved in only when whole)."""
    from node.app.cli import main

    files = write_phantom_series(tmp_path / "in", slices=6, size=8, step_mm=3.0)
    _during_engine(monkeypatch, lambda: files[4].write_bytes(files[4].read_bytes() + b"\0\0"))
    out = tmp_path / "out"
    assert main(["process", str(tmp_path / "in"), str(out), "--engine", "cubic", "--no-preview"]) == 1
    assert not [p for p in out.rglob("*.dcm")], sorted(out.rglob("*"))
    assert not [p for p in out.rglob(".*partial*")]
    reports = list(out.rglob("report.json"))
    assert len(reports) == 1 and "failed" in reports[0].read_text()
