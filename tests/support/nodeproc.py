"""The real node as a subprocess for tests: ``python -m node.app.cli serve --config`` on free ports.

    node = NodeProc.start(tmp_path, {"destinations": [...], "rules": [...]})
    storescu(files, node.port)
    node.wait_jobs(lambda jobs: ..., what="...")
    node.stop()            # SIGTERM, graceful; .kill9() and .restart() for fault tests

Extra config sections are merged over a fast test base (cubic engine on CPU, stable_age_s 1, quick outbox
backoff): a table is updated key by key, an array of tables ([[destinations]], [[rules]]) is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config.dump import dump_toml
from tests.support.peers import ECHOSCU, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def base_config(workdir: Path) -> dict[str, Any]:
    return {
        "node": {"ae_title": "SRNODE", "host": "127.0.0.1", "port": free_port(), "spool_dir": str(workdir / "spool"),
                 "stable_age_s": 1.0, "min_free_mb": 1, "log_level": "INFO"},
        "engine": {"name": "cubic", "device": "cpu"},
        "http": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "outbox": {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        "destinations": [{"name": "out", "kind": "folder", "path": str(workdir / "out")}],
        "rules": [{"name": "all-ct-mr", "match": {"Modality": "^(CT|MR)$"}, "through_plane_factor": 2,
                   "destinations": ["out"]}],
    }


def merge(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for k, v in (extra or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "match":
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def dcm_files(folder: Path) -> list[Path]:
    """The ``*.dcm`` files anywhere under ``folder`` (a spool's ``instances/``, a job's outbox folder, a folder
    destination), sorted by path; [] when ``folder`` does not exist."""
    return sorted(folder.glob("**/*.dcm"))


def delivered(n: int = 1) -> Callable[[list[dict[str, Any]]], bool]:
    """A :meth:`NodeProc.wait_jobs` condition: at least ``n`` of the jobs are in state ``delivered``."""
    return lambda jobs: len([j for j in jobs if j["state"] == "delivered"]) >= n


@dataclass
class NodeProc:
    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    module: str = "node.app.cli"  # what runs `serve` (tests.support.gated: the node with a test engine added)
    _index: Any = None

    @classmethod
    def start(cls, workdir: Path, sections: Mapping[str, Any] | None = None, *, env: dict[str, str] | None = None,
              wait: bool = True, module: str = "node.app.cli") -> NodeProc:
        workdir.mkdir(parents=True, exist_ok=True)
        node = cls(workdir=workdir, config=merge(base_config(workdir), sections), env=dict(env or {}), module=module)
        node.config_path.write_text(dump_toml(node.config))
        node.launch(wait=wait)
        return node

    # ------------------------------------------------------------------------------------ properties

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.config["node"]["ae_title"])

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http']['port']}"

    @property
    def spool(self) -> Path:
        return Path(self.config["node"]["spool_dir"])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------------------------ life cycle

    def launch(self, wait: bool = True) -> None:
        self.starts += 1
        logf = self.log_path.open("ab")
        logf.write(f"\n===== start {self.starts} =====\n".encode())
        logf.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "serve", "--config", str(self.config_path)],
                                     cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        logf.close()
        if wait:
            self.wait_ready()

    def echo(self) -> bool:
        r = subprocess.run([ECHOSCU, "-aec", self.ae_title, "-to", "2", "127.0.0.1", str(self.port)],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            return self.echo()

        wait_until(up, timeout=timeout, interval=0.2, what=f"srnode C-ECHO on port {self.port}")

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"node did not stop within {timeout:.0f} s after SIGTERM:\n{self.log()[-3000:]}") from None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self, sections: Mapping[str, Any] | None = None, wait: bool = True) -> None:
        """Stop (SIGTERM if running), optionally change the config, start again on the same ports and spool."""
        self.stop()
        if sections:
            self.config = merge(self.config, sections)
            self.config_path.write_text(dump_toml(self.config))
        self.launch(wait=wait)

    # ------------------------------------------------------------------------------------ the CLI

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.app.cli", *args, "--config", str(self.config_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def jobs(self) -> list[dict[str, Any]]:
        """What ``srnode status --json`` lists (same code, read in-process: polling stays cheap)."""
        from node.app.status_cmd import job_dict
        from node.store import Index

        if self._index is None:
            self._index = Index(self.spool / "index.sqlite")
        return [job_dict(self._index, j) for j in self._index.jobs()]

    def status_cli(self) -> list[dict[str, Any]]:
        """The jobs as the real ``srnode status --json`` prints them."""
        r = self.cli("status", "--json", "--limit", "0")
        if r.returncode != 0:
            raise AssertionError(f"srnode status failed: {r.stderr}")
        return list(json.loads(r.stdout)["jobs"])

    def wait_jobs(self, cond: Callable[[list[dict[str, Any]]], Any], timeout: float = 120.0,
                  what: str = "jobs") -> list[dict[str, Any]]:
        def check() -> Any:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            jobs = self.jobs()
            return jobs if cond(jobs) else None

        try:
            return list(wait_until(check, timeout=timeout, interval=0.3, what=what))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\njobs: {json.dumps(self.jobs(), indent=1)[-3000:]}\n"
                                 f"log:\n{self.log()[-3000:]}") from None

    def __enter__(self) -> NodeProc:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        except AssertionError:
            pass
