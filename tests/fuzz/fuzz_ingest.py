"""atheris harness over the parse-and-assemble path: what the node does with bytes a peer sent it.

    python tests/fuzz/fuzz_ingest.py [libFuzzer options] [CORPUS_DIR ...]     (``make fuzz``)

One input = one Part 10 file as a peer could send it. The harness runs, in order, what the node runs:
1. the SCP's header check (``node.ingest.scp.check_header`` when the spine provides it; otherwise the same
   minimal check inline: a readable dataset with SOP Class/Instance, Study and Series UIDs);
2. ``node.volume.load_series`` on the file alone and on the file beside two clean slices of its series.
A ``NodeError`` (IngestError, VolumeError, ...) is a refusal with a reason: fine. Any other exception escaping
is a crash the node would have suffered, and libFuzzer stops with the input saved as ``crash-*``.

With no CORPUS_DIR the seeds are generated from tests/badinput/make_corpus.py into a temp dir.
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "badinput"))

with atheris.instrument_imports(include=["node"]):
    import pydicom
    from pydicom.dataset import Dataset

    from node.errors import NodeError
    from node.volume import load_series

    try:  # the SCP's own header check, when the spine exposes one
        from node.ingest.scp import check_header as _scp_check_header  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - depends on the spine
        _scp_check_header = None

import make_corpus  # noqa: E402

warnings.simplefilter("ignore")  # pydicom warns on every odd value; the harness wants exceptions only
WORK = Path(tempfile.mkdtemp(prefix="srnode-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
NEIGHBOURS: list[Path] = []


def _neighbours() -> list[Path]:
    """Two clean slices (same series as the seeds' ``good_series``) to assemble the fuzzed file with."""
    if not NEIGHBOURS:
        case = make_corpus.good_series(WORK / "neighbours", slices=3)
        NEIGHBOURS.extend(WORK / "neighbours" / f for f in case.files[1:])
    return NEIGHBOURS


def header_check(ds: Dataset) -> None:
    """The inline stand-in for the SCP's header check (used only when node.ingest.scp has none)."""
    from node.errors import IngestError

    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = str(ds.get(kw, "") or "")
        except Exception as exc:  # noqa: BLE001 - pydicom converts lazily; any failure is a refusal
            raise IngestError(f"{kw} cannot be read ({exc})") from exc
        if not value:
            raise IngestError(f"{kw} is missing or empty")


def parse(data: bytes) -> Dataset | None:
    """What the SCP receives: the dataset decoded from the bytes (a file a peer streamed to us)."""
    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:  # noqa: BLE001 - pynetdicom answers 0xC210 for a dataset it cannot decode
        return None


def one_input(data: bytes) -> None:
    ds = parse(data)
    if ds is None:
        return
    try:
        (_scp_check_header or header_check)(ds)
    except NodeError:
        return
    path = WORK / "fuzzed.dcm"
    path.write_bytes(data)
    for paths in ([path], [path, *_neighbours()]):
        try:
            vol: Any = load_series(paths)
            vol.describe()
        except NodeError:
            pass


def main() -> None:
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        seeds = WORK / "seeds"
        make_corpus.make_corpus(seeds)
        make_corpus.good_series(seeds)
        (seeds / "manifest.json").unlink()
        argv.append(str(seeds))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
