"""Small generated series for the series / derived tests: the phantom of ``node.app.phantom`` with a change made
to each slice's header or pixels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.app.phantom import write_phantom_series


def edited_phantom(tmp_path: Path, change: Callable[[int, Dataset], None], slices: int = 6,
                   enforce_file_format: bool = False) -> list[Path]:
    """A phantom CT of ``slices`` 32² slices 3 mm apart in ``tmp_path / "in"``, ``change(k, ds)`` applied to
    slice k's data set before it is saved back; the files, in slice order."""
    files = write_phantom_series(tmp_path / "in", slices=slices, size=32, step_mm=3.0)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        change(k, ds)
        ds.save_as(f, enforce_file_format=enforce_file_format)
    return files
