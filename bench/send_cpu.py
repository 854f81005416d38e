"""The C-STORE sender's CPU per instance: the node's ``DimseSender`` sends a series to dcmtk ``storescp --fork
--ignore`` (a peer that costs nothing), several times; prints and writes (``--json``) instances/s and the sending
process's CPU milliseconds per instance, with which code (``--code DIR``: another checkout's ``node``, e.g.
``git archive <commit> node models | tar -x -C DIR``), so two versions can be run in turn on a shared machine.

    python bench/send_cpu.py SERIES_DIR [--associations 4] [--repeat 4] [--code DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", type=Path, help="a folder of DICOM files (every *.dcm in it is sent)")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose node/ is measured")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    sys.path.insert(1, str(ROOT))
    from node.config import DicomDestination
    from node.send.dimse import DimseSender
    from tests.support.peers import free_port, wait_until

    files = sorted(args.series.glob("*.dcm"))
    if not files:
        parser.error(f"{args.series}: no *.dcm file")
    port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    scp = subprocess.Popen(["storescp", "--fork", "--ignore", "-aet", "SCP", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    runs = []
    try:
        wait_until(up, 30, what="storescp")
        sender = DimseSender(DicomDestination(name="scp", ae_title="SCP", host="127.0.0.1", port=port,
                                              associations=args.associations))
        for _ in range(args.repeat):
            t, c = time.monotonic(), time.process_time()
            sender.send(files)
            wall, cpu = time.monotonic() - t, time.process_time() - c
            runs.append({"inst_per_s": round(len(files) / wall, 1), "cpu_ms_per_inst": round(cpu * 1000 / len(files), 3)})
            print(f"{len(files)} files, {args.associations} associations: {runs[-1]['inst_per_s']} inst/s, "
                  f"{runs[-1]['cpu_ms_per_inst']} ms CPU per instance (load {os.getloadavg()[0]:.1f})")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python bench/send_cpu.py " + " ".join(sys.argv[1:]), "code": str(args.code),
            "files": len(files), "associations": args.associations, "runs": runs,
            "load_average": os.getloadavg(), "cpu_count": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
