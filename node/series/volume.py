"""``SeriesVolume``: one series as a stack of placed slices in modality units, with its measured geometry.

Built by ``node.series.load.load_series``; cut into regular runs by ``node.series.runs``. Nothing here reads files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from pydicom.dataset import Dataset

from models.engine import VolumeInput
from node.series.headers import InputHeaders
from node.series.realworld import RealWorld

# the largest magnitude of a modality value (HU, MR signal, ...) the node derives from: DS values derived from it
# (WindowCenter / WindowWidth, RescaleSlope, the Parametric Map's window) are read by validators as signed 64-bit
# integers (dciodvfy 3.x: a WindowWidth of 9.2e18 passes, 9.3e18 is "negative"), the engines work in float32
# (6-7 significant digits, overflow at 3.4e38). Real images stay far below (CT -1024..~30,000 HU, PET Bq/ml
# ~1e7); a rescale beyond it (a RescaleSlope of 1e30) is a broken header, refused by name rather than written.
MAX_MODALITY_ABS = 1e15


@dataclass(frozen=True)
class StoredFormat:
    """How one slice's stored integers map to modality units: value = stored * slope + intercept.

    ``bits_stored`` (BitsStored, 1..16 here) and ``signed`` (PixelRepresentation 1) give the stored range.
    """

    slope: float = 1.0
    intercept: float = 0.0
    bits_stored: int = 16
    signed: bool = False

    @property
    def stored_range(self) -> tuple[int, int]:
        """Lowest and highest stored integer (e.g. (0, 4095) for 12 unsigned bits)."""
        b = self.bits_stored
        return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if self.signed else (0, 2**b - 1)

    @property
    def value_range(self) -> tuple[float, float]:
        """Lowest and highest modality value this format can hold."""
        lo, hi = self.stored_range
        a, b = lo * self.slope + self.intercept, hi * self.slope + self.intercept
        return (float(min(a, b)), float(max(a, b)))


def in_hounsfield_units(modality: str, rescale_type: str) -> bool:
    """Whether values of ``modality`` stating ``rescale_type`` (RescaleType, "" when absent) are Hounsfield units:
    a CT stating no other unit (PS3.3 C.8.2.1.1.11)."""
    return modality == "CT" and rescale_type in ("", "HU")


@dataclass
class SeriesVolume:
    """One series as a regular (or measured-irregular) stack of slices, in modality units."""

    data: np.ndarray  # (Z, Y, X) float32, modality units (HU for CT)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm; dz = median step between slice centres
    slice_thickness: float  # mm (SliceThickness; 0 when absent)
    modality: str
    positions: np.ndarray  # (Z, 3) ImagePositionPatient of each slice, slice order
    row_cosine: np.ndarray  # (3,) direction of increasing column index
    col_cosine: np.ndarray  # (3,) direction of increasing row index
    normal: np.ndarray  # (3,) row x col; slices are sorted by increasing IPP . normal
    # headers in slice order (multi-frame: the same dataset once per frame): held, or read again from their files
    # once released (``node.series.headers``); ``datasets.record(k)`` is what is read of slice k after loading.
    # A plain sequence of Datasets given here is held as it is.
    datasets: InputHeaders
    series_uid: str
    sop_class_uid: str
    frame_numbers: list[int] = field(default_factory=list)  # 1-based frame per slice (multi-frame), else []
    rescale_slope: float = 1.0  # the first slice's (``formats`` holds every slice's own)
    rescale_intercept: float = 0.0
    value_range: tuple[float, float] = (-32768.0, 32767.0)  # representable range in modality units, all slices
    rescale_type: str = ""  # the unit its slices state (RescaleType: "HU", "MGML", "Z_EFF", "US", ...); "" none
    formats: list[StoredFormat] = field(default_factory=list)  # per slice: its own rescale and stored bits
    names: list[str] = field(default_factory=list)  # per slice: file name (", frame N" for multi-frame)
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (Z-1,) measured steps, mm
    irregular: bool = False
    tilt_deg: float = 0.0  # angle between the slice normal and the line through the slice positions
    notes: list[str] = field(default_factory=list)  # geometry remarks for the job record
    run: tuple[int, int] | None = None  # (index, count) when this volume is one regular run of a series
    run_slices: tuple[int, int, int] | None = None  # (first, last, of): 1-based input slices of this run
    volume: tuple[int, int] | None = None  # (index, count) when the series holds several volumes
    volume_label: str = ""  # how a reader tells this volume from its siblings: "echo 2", "time 3", "type P"
    part: int = 0  # 0-based index among the derived series made from one input series (series numbers)
    # r when every ImagePositionPatient component is written as a multiple of r mm (0.1 or 0.01: few decimals),
    # else 0; a regular stack's ``positions`` are then fitted (``node.series.steps``: rounded positions)
    position_rounding: float = 0.0
    # the real-world value mappings every slice states alike, as lines of modality values (node.series.realworld:
    # a RealWorldValueMappingSequence, or Philips' ScaleSlope); restated on the derived series in its stored units
    real_world: tuple[RealWorld, ...] = ()
    # images of the series in none of its volumes (a localizer filed in it, a single stray plane): (file, and frame
    # of a multi-frame object; SOPInstanceUID; why), the same on every volume of the series (node.series.load)
    set_aside: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.datasets, InputHeaders):
            given: Sequence[Dataset] = self.datasets
            frames = [n - 1 for n in self.frame_numbers] if self.frame_numbers else None
            self.datasets = InputHeaders(list(given), frames)

    @cached_property
    def instances_digest(self) -> str:
        """16 hex digits of SHA-256 over the sorted SOPInstanceUIDs of ``datasets`` (each once): the exact set of
        input instances, for the derived UIDs (``node.derived.modules.derived_uid``). Computed once per volume:
        every derived object asks for it, and recomputing it per object made deriving O(slices²) (issue #15
        item 5). ``datasets`` is not changed after construction (runs and volumes are new objects)."""
        uids = sorted({rec.sop_instance_uid for rec in self.datasets.records})
        return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X): slices, rows, columns."""
        z, y, x = self.data.shape
        return int(z), int(y), int(x)

    @property
    def hounsfield(self) -> bool:
        """Whether the values are Hounsfield units: a CT whose slices state no other RescaleType (PS3.3
        C.8.2.1.1.11: a CT image's values are HU unless its RescaleType says otherwise)."""
        return in_hounsfield_units(self.modality, self.rescale_type)

    @property
    def multiframe(self) -> bool:
        """Whether the slices are frames of multi-frame object(s) (``frame_numbers`` set)."""
        return bool(self.frame_numbers)

    @property
    def name(self) -> str:
        """How messages name this volume: 'series UID', or 'series UID volume 2/3 (time 2)'."""
        vol = f" volume {self.volume[0]}/{self.volume[1]} ({self.volume_label})" if self.volume else ""
        return f"series {self.series_uid}{vol}"

    def describe(self) -> str:
        """One line for logs and the job report: series UID, modality, Z x Y x X, spacing dz/dy/dx mm."""
        z, y, x = self.shape
        return (f"{self.name}: {self.modality} {z}x{y}x{x}, spacing "
                f"{self.spacing[0]:.3g}/{self.spacing[1]:.4g}/{self.spacing[2]:.4g} mm")

    def to_engine_input(self) -> VolumeInput:
        """The engine's view of this volume (``models.engine.VolumeInput``): ``data`` shared, not copied."""
        return VolumeInput(
            data=self.data,
            spacing=self.spacing,
            slice_thickness=self.slice_thickness,
            modality=self.modality,
            value_range=self.value_range,
        )
