"""Real peers for tests: a real Orthanc (Debian binary) and dcmtk tools, started on free loopback ports.

No mocks: what srnode talks to in tests is what it talks to in a hospital.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom

ORTHANC_BIN = "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
# dcmtk by absolute path: pynetdicom installs console scripts of the same names that shadow dcmtk on PATH
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


_HANDED_OUT: set[int] = set()  # ports free_port gave this test process: never given twice


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now and not given before in this process. The kernel may hand the same free
    port to two binds in a row: a node's DICOM and HTTP ports drawn one after the other once came out equal (a new
    user's make test: "HTTP port ... in use by another program")."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port not handed out before in 100 tries")


def wait_until(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns a truthy value or ``timeout`` passes (then AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling a peer that is still starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class Orthanc:
    """A running Orthanc: REST at ``url``, DICOM at ``aet``@127.0.0.1:``dicom_port``."""

    url: str
    dicom_port: int
    aet: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    username: str = ""
    password: str = ""
    log_path: Path = field(default_factory=Path)

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username else None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30.0)

    def get(self, path: str) -> Any:
        with self.client() as c:
            r = c.get(path)
            r.raise_for_status()
            return r.json()

    def instance_file(self, instance_id: str) -> pydicom.Dataset:
        """The stored instance (Orthanc's id), read back with pydicom."""
        with self.client() as c:
            r = c.get(f"/instances/{instance_id}/file")
            r.raise_for_status()
            return pydicom.dcmread(io.BytesIO(r.content))

    def series_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        with self.client() as c:
            r = c.post("/tools/find", json={"Level": "Series", "Expand": True,
                                            "Query": {"StudyInstanceUID": study_instance_uid}})
            r.raise_for_status()
            return list(r.json())

    def clear(self) -> None:
        """Delete every patient (between tests sharing one session Orthanc)."""
        with self.client() as c:
            for pid in c.get("/patients").json():
                c.delete(f"/patients/{pid}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_orthanc(
    workdir: Path,
    *,
    plugins: Sequence[str | Path] = (),
    modalities: dict[str, list[Any]] | None = None,
    extra: dict[str, Any] | None = None,
    username: str = "",
    password: str = "",
    aet: str = "ORTHANC",
    env: dict[str, str] | None = None,
) -> Orthanc:
    """Start Orthanc from a generated config on free ports and wait until ``/system`` answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "Name": "srnode-test",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "HttpServerEnabled": True,
        "AuthenticationEnabled": bool(username),
        "RegisteredUsers": {username: password} if username else {},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": modalities or {},
        "Plugins": [str(p) for p in plugins],
        "StableAge": 2,
        "ConcurrentJobs": 2,
        "HttpTimeout": 60,
        "SaveJobs": False,
        "DicomScuTimeout": 30,
    }
    if extra:
        cfg.update(extra)
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log_path = workdir / "orthanc.log"
    logf = log_path.open("wb")
    proc = subprocess.Popen([ORTHANC_BIN, str(cfg_path)], stdout=logf, stderr=subprocess.STDOUT,
                            cwd=workdir, env={**os.environ, **(env or {})})
    o = Orthanc(url=f"http://127.0.0.1:{http_port}", dicom_port=dicom_port, aet=aet, workdir=workdir,
                proc=proc, username=username, password=password, log_path=log_path)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {o.log()}")
        r = httpx.get(f"{o.url}/system", auth=o.auth, timeout=2.0)
        return r.status_code == 200

    try:
        wait_until(up, timeout=60, what="Orthanc /system")
    except Exception:
        o.stop()
        raise
    return o


def storescu(files: Sequence[Path | str], port: int, aet: str = "SRNODE", calling: str = "STORESCU",
             extra_args: Sequence[str] = (), timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk storescu (``-xs``: propose the file's own transfer syntax first)."""
    cmd = [STORESCU, "-aec", aet, "-aet", calling, *extra_args, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dciodvfy(path: Path | str) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy; returns (errors, warnings) lines."""
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (out.stdout + out.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def mount_tmpfs(where: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` (e.g. "4m") at ``where`` (made if absent): a small real file system to fill.
    False when this process cannot (not root, no ``mount``); the caller skips with that reason and unmounts
    (``umount -l``) what it mounted."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


class JsonStub:
    """A loopback HTTP server answering every GET with ``answer(path)`` (200, JSON), recording the paths in
    ``gets``: a source that says only what a test needs (a changes feed in odd shapes). ``port``; ``close()``."""

    def __init__(self, answer: Callable[[str], bytes]) -> None:
        import http.server
        import threading

        self.gets: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stub.gets.append(self.path)
                body = answer(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


class FaultyProxy:
    """An HTTP proxy on a free loopback port in front of ``upstream`` (a real Orthanc) that breaks chosen answers:
    ``fault(method, path, n)`` (``n``: how many requests of that path's kind came so far, 1-based; kinds are
    ``file`` for ``/instances/{id}/file`` and ``other``) returns None to forward the answer as it is, ``"500"`` to
    answer 500 instead, ``"cut"`` to send the answer's headers and half its body, then close the connection (a
    source dying mid-transfer), bytes to answer them instead (200, JSON). ``log``: every (method, path) forwarded. A context manager (shuts it down)."""

    def __init__(self, upstream: str, fault: Callable[[str, str, int], str | bytes | None]) -> None:
        import http.server
        import threading

        self.log: list[tuple[str, str]] = []
        counts: dict[str, int] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                kind = "file" if self.path.split("?")[0].endswith("/file") else "other"
                counts[kind] = counts.get(kind, 0) + 1
                proxy.log.append((self.command, self.path))
                what = fault(self.command, self.path, counts[kind])
                if isinstance(what, bytes):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(what)))
                    self.end_headers()
                    self.wfile.write(what)
                    return
                if what == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = httpx.request(self.command, upstream + self.path, content=body or None, headers=headers,
                                  timeout=60)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                if what == "cut":
                    self.wfile.write(r.content[:len(r.content) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(r.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._srv.shutdown()
        self._srv.server_close()
