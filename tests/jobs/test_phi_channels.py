"""Patient data never reaches an output channel, and a malformed value the pipeline merely copies never fails a
job (issue #16, item 3), against the real node.

Attack: fake patient data in every copied patient/study attribute, well-formed and malformed (a birth date
written ``1901-02-03``, an accession number longer than SH allows, a study time of 25:61, a weight that is no
number...). Before: the job failed with "Unable to convert '1901-02-03' to 'DA'", and the value was in node.log
(pydicom's warnings), the audit log, ``srnode status --json`` and GET /jobs. Now: the job is delivered, the
malformed values are not copied (their attribute names, never their values, are in the job's report), the
well-formed ones are; and a job whose failure's exception text quotes a patient value has it replaced by ``***``.
Every channel is searched for every value: node log (at DEBUG), audit log, ``srnode status`` (text and --json),
GET /jobs and /metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydicom import dcmread

from tests.support.hostile import channels, dump, series
from tests.support.nodeproc import NodeProc
from tests.support.peers import storescu

HOSTILE = {  # keyword -> fake patient/study value
    "PatientName": "QZPHI^ZELDA",
    "PatientID": "QZPID-4417",
    "IssuerOfPatientID": "QZISSUER-X",
    "OtherPatientIDs": "QZOTHER-1\\QZOTHER-2",
    "PatientBirthDate": "1901-02-03",  # DA with dashes: not conformant
    "PatientAge": "45 QZYEARS",  # AS: not conformant
    "PatientWeight": "QZHEAVY",  # DS: not a number
    "PatientAddress": "QZ 12 ELM STREET",
    "AccessionNumber": "QZACC-20240917-00042",  # SH: longer than 16
    "StudyDate": "2024/09/17",  # DA with slashes
    "StudyTime": "25:61:99",  # TM: no such time
    "ReferringPhysicianName": "QZREF^HOUSE",
    "StudyID": "QZSTUDY-TOO-LONG-ID",  # SH: longer than 16
    "StudyDescription": "QZ HEAD OF ZELDA",
    "InstitutionName": "QZ GENERAL HOSPITAL",
    "InstitutionAddress": "QZ 1 HOSPITAL ROAD",
    "StationName": "QZSTATION7",
    "PerformingPhysicianName": "QZPERF^DOC",
    "OperatorsName": "QZOPER^ATOR",
    "AcquisitionDate": "1999-12-31",  # DA with dashes
}
MALFORMED = ("PatientBirthDate", "PatientAge", "PatientWeight", "AccessionNumber", "StudyDate", "StudyTime",
             "StudyID", "AcquisitionDate")
COPIED_AS_SENT = ("PatientName", "PatientID", "IssuerOfPatientID", "ReferringPhysicianName", "InstitutionName",
                  "StationName", "StudyDescription")


def _needles() -> dict[str, str]:
    """Each value, each of its values and name components, as searched for (keyword -> text)."""
    out: dict[str, str] = {}
    for kw, value in HOSTILE.items():
        for v in {value, *value.split("\\")}:
            for part in {v, *v.split("^")}:
                if len(part) >= 4:
                    out[part] = kw
    return out


def test_patient_values_reach_no_output_channel_and_malformed_copies_do_not_fail_jobs(tmp_path: Path) -> None:
    # AcquisitionNumber (IS) holding the patient's ID: the rule below reads it, pydicom warns quoting it
    good = series(tmp_path / "good", 31, 4, attrs={**HOSTILE, "AcquisitionNumber": "QZPID-4417"})
    # a second series of the same patient whose geometry is garbage that quotes the patient's ID: its job fails,
    # and the failure's text (pydicom's "could not convert ... 'QZPID-4417'") is where a value would leak
    bad = series(tmp_path / "bad", 32, 4, attrs={**HOSTILE, "ImagePositionPatient": "QZPID-4417\\0\\0"})
    sections = {"node": {"log_level": "DEBUG"},
                "rules": [{"name": "ct", "match": {"Modality": "^CT$", "AcquisitionNumber": ".*"},
                           "destinations": ["out"]}]}
    with NodeProc.start(tmp_path / "node", sections) as node:
        r = storescu([*good, *bad], node.port, calling="QZSCANNER")
        assert r.returncode == 0, r.stdout + r.stderr
        jobs = node.wait_jobs(lambda js: len(js) == 2 and all(j["state"] in ("delivered", "failed") for j in js),
                              what="both jobs finished")
        texts = channels(node)
    by = {j["series"]: j for j in jobs}
    ok, failed = by[str(dcmread(good[0]).SeriesInstanceUID)], by[str(dcmread(bad[0]).SeriesInstanceUID)]
    # malformed copied values do not fail the job: dropped, their names (only) recorded in the report
    assert ok["state"] == "delivered", dump(jobs)
    notes = " ".join(ok["report"]["notes"])
    assert all(kw in notes for kw in (*MALFORMED, "AcquisitionNumber")), notes
    derived = sorted((tmp_path / "node" / "out" / str(dcmread(good[0]).StudyInstanceUID)
                      / ok["derived_series"]).glob("*.dcm"))
    assert len(derived) == 7
    ds = dcmread(derived[0], stop_before_pixels=True)
    for kw in COPIED_AS_SENT:
        assert str(ds.get(kw, "")) == HOSTILE[kw], kw
    assert str(ds.get("PatientBirthDate", "")) == "" and "PatientAge" not in ds and str(ds.StudyDate) == ""
    # the failure names what happened; the quoted value is masked
    assert failed["state"] == "failed" and "ImagePositionPatient" in failed["reason"] and "***" in failed["reason"], \
        dump(jobs)
    # no value in any channel (a value counts where it stands alone, not inside a UID)
    leaks = [f"{kw} value {needle!r} in the {where}" for needle, kw in _needles().items()
             for where, text in texts.items()
             if re.search(rf"(?<![\w.]){re.escape(needle)}(?![\w.])", text, re.IGNORECASE)]
    assert not leaks, leaks
    # and the channels are not empty: the search looked at real output
    assert "job 1" in texts["node log"] and "job-processed" in texts["audit log"]
    assert "srnode_instances_received_total" in texts["GET /metrics"] and ok["derived_series"] in texts["GET /jobs"]
    assert "Invalid value for VR IS: '***'" in texts["node log"], "pydicom's warning did not reach the log?"
