"""The node's stderr log: pynetdicom's ERROR for an expected answer (a peer accepting no presentation context
of a probe) is dropped, its other errors kept (newuser13: two ERROR lines per delivery to a plain storescp)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging
from node.app.logs import setup_logging
setup_logging("INFO")
setup_logging("INFO")  # twice, as a test process may: one filter
acse = logging.getLogger("pynetdicom.acse")
acse.error("No accepted presentation contexts")
acse.error("Association Rejected")
print(len(acse.filters))
"""


def test_an_expected_pynetdicom_error_is_not_logged() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "No accepted presentation contexts" not in r.stderr
    assert "Association Rejected" in r.stderr and r.stdout.strip() == "1"
