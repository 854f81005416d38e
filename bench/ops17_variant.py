"""``srnode eval`` with selfsup's module switches set from the command line (helper engine17's operator study).

``python bench/ops17_variant.py PROFILE_FROM=data DC_WEIGHT=0 -- EVAL ARGS...``: sets ``models.selfsup.NAME``
to each value (numbers parsed as float), then runs ``srnode eval EVAL ARGS...`` in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import models.selfsup as selfsup  # noqa: E402
from node.app.cli import main  # noqa: E402


def run(argv: list[str]) -> int:
    cut = argv.index("--")
    for item in argv[:cut]:
        name, _, value = item.partition("=")
        if not hasattr(selfsup, name):
            raise SystemExit(f"models.selfsup has no switch {name}")
        old = getattr(selfsup, name)
        setattr(selfsup, name, type(old)(value) if not isinstance(old, bool) else value in ("1", "true", "True"))
        print(f"models.selfsup.{name} = {getattr(selfsup, name)!r}", file=sys.stderr)
    return main(["eval", *argv[cut + 1 :]])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
