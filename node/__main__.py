"""``python -m node``: the ``srnode`` command line."""

import sys

from node.app.cli import main

sys.exit(main())
