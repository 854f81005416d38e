"""Two patients never stacked into one derived series (issue #16, item 1), against the real node and ``srnode
process``.

Attack: 4 slices of patient A / study A and 3 of patient B / study B share one SeriesInstanceUID (a scanner
that reuses series UIDs, a router that rewrites them). Before: one series, one job, one derived series holding
both patients. Now: a series is keyed by study + series, so these are two series, two jobs, two derived series,
each in its own study with its own patient. And instances of two patients inside one study + series (the UIDs
give nothing away) are refused, the reason naming the attributes that differ, never their values.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

from tests.support.hostile import dump, series
from tests.support.nodeproc import ROOT, NodeProc
from tests.support.peers import storescu

SHARED_SERIES = "1.2.826.0.1.3680043.10.1087.9.16.1"
MIXED_SERIES = "1.2.826.0.1.3680043.10.1087.9.16.2"
STUDY_A, STUDY_B, STUDY_C = (f"1.2.826.0.1.3680043.10.1087.9.16.{k}" for k in (10, 11, 12))
PATIENT_A = {"PatientID": "QZPID-ALPHA-7", "PatientName": "QZALPHA^ANNA", "PatientBirthDate": "19700101"}
PATIENT_B = {"PatientID": "QZPID-BRAVO-9", "PatientName": "QZBRAVO^BERT", "PatientBirthDate": "19800202"}
VALUES = [v for p in (PATIENT_A, PATIENT_B) for v in p.values()] + ["QZALPHA", "QZBRAVO", "1970-01-01"]


def _attack(tmp: Path) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    a = series(tmp / "a", 161, 4, study=STUDY_A, series_uid=SHARED_SERIES, attrs=PATIENT_A)
    b = series(tmp / "b", 162, 3, study=STUDY_B, series_uid=SHARED_SERIES, attrs=PATIENT_B)
    # same study, same series, two patients: nothing in the UIDs tells them apart
    c = series(tmp / "c", 163, 4, study=STUDY_C, series_uid=MIXED_SERIES, attrs=PATIENT_A)
    d = series(tmp / "d", 164, 3, study=STUDY_C, series_uid=MIXED_SERIES, attrs=PATIENT_B)
    return a, b, c, d


def test_two_patients_sharing_a_series_uid_are_never_stacked(tmp_path: Path) -> None:
    a, b, c, d = _attack(tmp_path)
    out = tmp_path / "node" / "out"
    with NodeProc.start(tmp_path / "node") as node:
        r = storescu([*a, *b, *c, *d], node.port)  # one association, all 14 instances
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 3 and all(j["state"] in ("delivered", "failed") for j in js),
                              what="three jobs finished")
        log = node.log()
    by = {(j["study"], j["series"]): j for j in jobs}
    ja, jb, jc = by[(STUDY_A, SHARED_SERIES)], by[(STUDY_B, SHARED_SERIES)], by[(STUDY_C, MIXED_SERIES)]
    assert (ja["state"], ja["instances"]) == ("delivered", 4), dump(jobs)
    assert (jb["state"], jb["instances"]) == ("delivered", 3), dump(jobs)
    # each derived series lies in its own study and carries its own patient only
    for job, study, patient, n_out in ((ja, STUDY_A, PATIENT_A, 7), (jb, STUDY_B, PATIENT_B, 5)):
        files = sorted((out / study / job["derived_series"]).glob("*.dcm"))
        assert len(files) == n_out, (study, files)
        got = {(str(ds.StudyInstanceUID), str(ds.PatientID), str(ds.PatientName))
               for ds in (dcmread(f, stop_before_pixels=True) for f in files)}
        assert got == {(study, patient["PatientID"], patient["PatientName"])}
    assert ja["derived_series"] != jb["derived_series"]
    # two patients in one study + series: refused, the conflict named, no value of either patient
    assert jc["state"] == "failed" and jc["instances"] == 7, dump(jobs)
    for words in ("2 patient(s)", "PatientID", "PatientName", "PatientBirthDate", "never stacked"):
        assert words in jc["reason"], jc["reason"]
    assert not (out / STUDY_C).exists(), "a derived series of the mixed series was delivered"
    leaks = [v for v in VALUES for text in (jc["reason"], log) if v in text]
    assert not leaks, leaks


def test_offline_process_keeps_the_studies_apart_and_refuses_mixed_patients(tmp_path: Path) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    _attack(in_dir)
    r = subprocess.run([sys.executable, "-m", "node.app.cli", "process", str(in_dir), str(out_dir), "--engine",
                        "cubic", "--no-preview"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert r.returncode == 1 and len(lines) == 3, r.stdout + r.stderr  # 1: the mixed series failed
    shared = [ln for ln in lines if SHARED_SERIES in ln]
    assert len(shared) == 2 and all("derived ->" in ln for ln in shared), r.stdout
    for study, patient, n in ((STUDY_A, PATIENT_A, 7), (STUDY_B, PATIENT_B, 5)):
        files = sorted((out_dir / study / SHARED_SERIES / "derived").glob("*.dcm"))
        assert len(files) == n, (study, r.stdout)
        assert {str(dcmread(f, stop_before_pixels=True).PatientID) for f in files} == {patient["PatientID"]}
    (mixed,) = [ln for ln in lines if MIXED_SERIES in ln]
    assert "FAILED" in mixed and "2 patient(s)" in mixed and "PatientID" in mixed, mixed
    assert not [v for v in VALUES if v in r.stdout + r.stderr]
