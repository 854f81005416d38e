"""``srnode eval`` with module switches of ``models`` set from the command line (helper engine18).

``python bench/variant18.py degrade.GAP_TARGET=per_slice selfsup.Z_MIN_GAIN_DB=-1 -- EVAL ARGS...``: sets
``models.<module>.<NAME>`` to each value (parsed as the current value's type; None-valued switches as float),
then runs ``srnode eval EVAL ARGS...`` in this process.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.app.cli import main  # noqa: E402


def run(argv: list[str]) -> int:
    cut = argv.index("--")
    for item in argv[:cut]:
        name, _, value = item.partition("=")
        mod_name, _, attr = name.rpartition(".")
        mod = importlib.import_module(f"models.{mod_name}")
        if not hasattr(mod, attr):
            raise SystemExit(f"models.{mod_name} has no switch {attr}")
        old = getattr(mod, attr)
        new = (value in ("1", "true", "True") if isinstance(old, bool) else float(value) if old is None
               else type(old)(value))
        setattr(mod, attr, new)
        print(f"models.{mod_name}.{attr} = {new!r}", file=sys.stderr)
    return main(["eval", *argv[cut + 1 :]])


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
