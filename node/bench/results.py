"""Where benchmark figures go: ``bench/results/<name>-<UTC time>.json``, with the command and machine."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from node import __version__

RESULTS = Path("bench/results")  # relative to the current directory


def write_result(name: str, figures: dict[str, Any], command: str | None = None) -> Path:
    """Write ``figures`` to bench/results/<name>-<UTC time>.json with the command and machine that made them.

    Returns the path; values that are not JSON are written with ``str``. Raises OSError.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"{name}-{stamp}.json"
    doc = {
        "benchmark": name,
        "command": command or " ".join(["srnode", *sys.argv[1:]]),
        "srnode_version": __version__,
        "machine": {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version()},
        "utc": stamp,
        "figures": figures,
    }
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out
