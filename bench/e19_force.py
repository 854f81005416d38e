"""engine19: `srnode eval` with the engine's self-checks off ([engine] min_gain_db = -99: what the engine would have
given where it falls back to cubic). PYTHONPATH=. python bench/e19_force.py eval SERIES ... --json OUT.json"""
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.getcwd())

import models.selfsup as ss  # noqa: E402
from node.app.cli import main  # noqa: E402

_init = ss.SelfSupEngine.__init__


def init(self, options=None, mem_fraction=0.4):  # type: ignore[no-untyped-def]
    _init(self, options, mem_fraction)
    self.options = replace(self.options, min_gain_db=-99.0)


ss.SelfSupEngine.__init__ = init  # type: ignore[method-assign]
sys.exit(main(sys.argv[1:]))
