"""Attributes copied from an enhanced (or classic) input into a classic MR/CT object are valid there."""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.derived.classic import classic_ct_values, classic_mr_values


def _mr(**kw: object) -> Dataset:
    ds = Dataset()
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = ["GR"]
    ds.SequenceVariant = ["SP"]
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_enhanced_phase_encoding_column_is_written_col() -> None:
    ds = _mr(InPlanePhaseEncodingDirection="COLUMN")
    assert classic_mr_values(ds) == ["InPlanePhaseEncodingDirection COLUMN written as COL"]
    assert ds.InPlanePhaseEncodingDirection == "COL"
    other = _mr(InPlanePhaseEncodingDirection="OTHER")  # enhanced only; type 3 in the classic MR Image
    classic_mr_values(other)
    assert "InPlanePhaseEncodingDirection" not in other
    row = _mr(InPlanePhaseEncodingDirection="ROW")
    assert classic_mr_values(row) == [] and row.InPlanePhaseEncodingDirection == "ROW"


def test_inversion_time_only_with_ir_in_scanning_sequence() -> None:
    gr = _mr(InversionTime="900")
    assert classic_mr_values(gr) == ["InversionTime dropped: ScanningSequence has no IR"]
    assert "InversionTime" not in gr
    ir = _mr(ScanningSequence=["GR", "IR"], InversionTime="900")
    classic_mr_values(ir)
    assert ir.InversionTime == 900


def test_values_outside_the_classic_sets_are_dropped_or_emptied() -> None:
    ds = _mr(ScanningSequence=["GR", "XX"], SequenceVariant=["SP", "YY"], MRAcquisitionType="4D")
    classic_mr_values(ds)
    assert ds.ScanningSequence == "GR" and ds.SequenceVariant == "SP"  # one value left of each
    assert ds.MRAcquisitionType == ""  # type 2: present, empty
    ct = Dataset()
    ct.RotationDirection = "XX"
    classic_ct_values(ct)
    assert "RotationDirection" not in ct and ct.Laterality == ""  # no body part: Laterality 2C present, empty
