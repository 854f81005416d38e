"""atheris harness over the parse-and-assemble path: what the node does with bytes a peer sent it.

    python -m tests.ingest.fuzz_ingest [libFuzzer options] [CORPUS_DIR ...]     (``make fuzz``)

One input = one Part 10 file as a peer could send it. The harness runs, in order, what the node runs:
1. the SCP's header check, ``node.ingest.read_header`` (UIDs, completeness of the pixel data element,
   no decoding), with the SOP class the C-STORE request would carry (the file meta's);
2. ``node.series.volume.load_series`` on the file alone and on the file beside two clean slices of its series.
A ``NodeError`` (IngestError, VolumeError, ...) is a refusal with a reason: fine. Any other exception escaping
is a crash the node would have suffered, and libFuzzer stops with the input saved as ``crash-*``.

With no CORPUS_DIR the seeds are generated from tests/ingest/make_corpus.py into a temp dir.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["node"]):
    from node.errors import NodeError
    from node.ingest import read_header
    from node.series import load_series

from tests.ingest import make_corpus  # noqa: E402

warnings.simplefilter("ignore")  # pydicom warns on every odd value; the harness wants exceptions only
WORK = Path(tempfile.mkdtemp(prefix="srnode-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
NEIGHBOURS: list[Path] = []


def _neighbours() -> list[Path]:
    """Two clean slices (same series as the seeds' ``good_series``) to assemble the fuzzed file with."""
    if not NEIGHBOURS:
        case = make_corpus.good_series(WORK / "neighbours", slices=3)
        NEIGHBOURS.extend(WORK / "neighbours" / f for f in case.files[1:])
    return NEIGHBOURS


def one_input(data: bytes) -> None:
    path = WORK / "fuzzed.dcm"
    path.write_bytes(data)
    try:
        read_header(path)  # IngestError: refused with a status, as admission does
    except NodeError:
        return
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
