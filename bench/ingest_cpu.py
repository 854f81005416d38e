"""The node's CPU per instance (utime+stime of the `srnode serve` process, /proc/PID/stat) over two storescu
workloads: 16 concurrent associations x 100 CT instances of 256x256, then one association of 2000 of 64x64.

usage: python bench/ingest_cpu.py REPO LABEL [MAX_PDU] [spy]
  REPO: the checkout whose node runs (its node.bench.ingest writes the data); MAX_PDU: [node] max_pdu (0: the
  checkout's default); spy: py-spy --gil --threads profiles (raw) of both workloads in the work folder.
Prints one JSON line and appends it to $INGEST_CPU_OUT (default /tmp/ingest-cpu/results.jsonl); the data and
the work folders are under /tmp/ingest-cpu. Figures from a shared machine vary by +-15 %: compare runs made
alternately (A, B, A, B)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

repo = sys.argv[1]
label = sys.argv[2]
maxpdu = int(sys.argv[3]) if len(sys.argv) > 3 else 0
spy = len(sys.argv) > 4 and sys.argv[4] == "spy"
sys.path.insert(0, repo)
from node.bench import ingest as B  # noqa: E402 - from the checkout given

base = Path("/tmp/ingest-cpu")
data = base / "data"
if not data.exists():
    [B.write_series(data / f"s{i:02d}", i, 100, 256) for i in range(16)]
    B.write_series(data / "small", 0, 2000, 64, tag="small-")
conc = [sorted((data / f"s{i:02d}").glob("*.dcm")) for i in range(16)]
small = [sorted((data / "small").glob("*.dcm"))]
work = base / f"w-{label}"
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
port = B.free_port()
txt = B.node_config(work, port)
if os.environ.get("RECEIVE_PATH"):  # [node] receive_path: lean or pynetdicom (default: the checkout's)
    txt = txt.replace("max_associations = 32", f'max_associations = 32\nreceive_path = "{os.environ["RECEIVE_PATH"]}"')
if maxpdu:
    txt = txt.replace("max_associations = 32", f"max_associations = 32\nmax_pdu = {maxpdu}")
(work / "config.toml").write_text(txt)
cmd = [sys.executable, "-m", "node.app.cli", "serve", "--config", str(work / "config.toml")]
p = subprocess.Popen(cmd, cwd=repo, stdout=open(work / "log", "wb"), stderr=subprocess.STDOUT)


def cpu():
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / os.sysconf("SC_CLK_TCK"), int(f[12]) / os.sysconf("SC_CLK_TCK")


B.wait_echo(port, "SRNODE")
out = {"label": label, "max_pdu": maxpdu, "receive_path": os.environ.get("RECEIVE_PATH", "default"),
       "load_before": os.getloadavg()}
spyp = None
for name, batches in (("concurrent", conc), ("one_association", small)):
    if spy:
        spyp = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),  # py-spy installed beside this interpreter
                "record",
                "-r",
                "250",
                "--gil",
                "--threads",
                "-f",
                "raw",
                "-p",
                str(p.pid),
                "-o",
                str(work / f"prof-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
    c0 = cpu()
    r = B.send_concurrently(port, batches, "SRNODE")
    c1 = cpu()
    if spyp:
        spyp.send_signal(signal.SIGINT)
        spyp.wait(60)
        spyp = None
    n = r["instances"]
    out[name] = {
        "inst_s": round(n / r["seconds"], 1),
        "user_s": round(c1[0] - c0[0], 2),
        "sys_s": round(c1[1] - c0[1], 2),
        "cpu_ms_per_inst": round(1000 * (sum(c1) - sum(c0)) / n, 2),
        "failed": r["failed"][:1],
    }
out["rss_mb"] = B.peak_rss_mb(p.pid)
p.send_signal(signal.SIGTERM)
p.wait(60)
out["load_after"] = os.getloadavg()
print(json.dumps(out))
with open(os.environ.get("INGEST_CPU_OUT", str(base / "results.jsonl")), "a") as fh:
    fh.write(json.dumps(out) + "\n")
