"""The ``srnode`` command line as a user meets it: real subprocess runs of the CLI, exit codes and stderr."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import __version__
from node.app.phantom import write_phantom_series
from node.config import load_config
from node.store import Index, Spool
from tests.support.fixtures import ROOT
from tests.support.peers import free_port


def srnode(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.app.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # the checkout's code, from any cwd
    return env


def one_error_line(r: subprocess.CompletedProcess[str], command: str) -> str:
    """The run failed with exit 1 and said why in exactly one stderr line ``srnode COMMAND: error: ...``."""
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"srnode {command}: error: "), r.stderr
    return lines[0]


def test_version_and_help_exit_0() -> None:
    r = srnode("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"srnode {__version__}")
    r = srnode("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert all(c in r.stdout for c in ("serve", "process", "status", "retry", "fetch")), r.stdout
    r = srnode("process", "--help")
    assert r.returncode == 0 and "IN_DIR" in r.stdout and "--quiet" in r.stdout


def test_mistyped_or_missing_command_is_a_usage_error() -> None:
    r = srnode("stauts")
    assert r.returncode == 2 and "invalid choice: 'stauts'" in r.stderr and "Traceback" not in r.stderr
    r = srnode()
    assert r.returncode == 2 and "a COMMAND is required" in r.stderr


def test_process_path_errors_are_one_line(tmp_path: Path) -> None:
    line = one_error_line(srnode("process", tmp_path / "nowhere", tmp_path / "out"), "process")
    assert line.endswith("nowhere: does not exist"), line
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM")
    line = one_error_line(srnode("process", notes, tmp_path / "out"), "process")
    assert "notes.txt: not a readable DICOM file" in line and "DICM" in line, line
    assert "force" not in line  # pydicom's advice to force-read is for programmers, not users
    (tmp_path / "empty").mkdir()
    line = one_error_line(srnode("process", tmp_path / "empty", tmp_path / "out"), "process")
    assert "empty: no files in this folder" in line


def test_a_folder_with_a_non_dicom_file_names_it_without_pydicom_advice(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("hello")  # recognisably text: skipped, named (fix13)
    (tmp_path / "in" / "IM0001").write_bytes(b"\x08\x00\x05\x00" + bytes(300))  # no 'DICM': maybe a cut DICOM
    r = srnode("process", tmp_path / "in", tmp_path / "out", "--no-preview")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "IM0001: not a readable DICOM file (no DICOM header" in r.stdout, r.stdout
    assert "skipped readme.txt: text, not DICOM" in r.stdout, r.stdout
    assert "force=True" not in r.stdout + r.stderr


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nport = "eleven"\n')
    line = one_error_line(srnode("status", "--config", bad), "status")
    assert line.endswith("bad.toml: node.port: expected int, got str 'eleven'"), line
    line = one_error_line(srnode("process", tmp_path, tmp_path / "o", "--config", tmp_path / "nope.toml"), "process")
    assert line.endswith("nope.toml: config file not found"), line
    bad.write_text("[node\n")
    assert "not valid TOML" in one_error_line(srnode("serve", "--config", bad), "serve")


def test_status_without_a_spool_says_so_and_creates_nothing(tmp_path: Path) -> None:
    line = one_error_line(srnode("status", cwd=tmp_path), "status")
    assert f"no spool at {tmp_path.resolve() / 'spool'}" in line and "--config" in line, line
    assert list(tmp_path.iterdir()) == []  # no empty ./spool left behind
    assert "no spool at" in one_error_line(srnode("retry", cwd=tmp_path), "retry")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _serve_config(tmp_path: Path, dicom_port: int, http_port: int) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(f'[node]\nport = {dicom_port}\nspool_dir = "{tmp_path / "spool"}"\n[http]\nport = {http_port}\n')
    return p


def test_serve_with_the_dicom_port_in_use(tmp_path: Path, busy_port: int) -> None:
    cfg = _serve_config(tmp_path, busy_port, 0)
    line = one_error_line(srnode("--log-level", "WARNING", "serve", "--config", cfg), "serve")
    assert f"DICOM port 127.0.0.1:{busy_port} ([node] host, port): in use by another program" in line, line
    # at the default log level the same single error line follows the start-up log, once
    r = srnode("serve", "--config", cfg)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error" in ln.lower()] == [line], r.stderr
    # refused before the spool is opened (no new, empty spool_dir) and without "stopping... / stopped" (user18)
    assert not (tmp_path / "spool").exists() and "stopping" not in r.stderr and "stopped" not in r.stderr, r.stderr


def test_serve_with_the_http_port_in_use(tmp_path: Path, busy_port: int) -> None:
    cfg = _serve_config(tmp_path, free_port(), busy_port)
    line = one_error_line(srnode("--log-level", "WARNING", "serve", "--config", cfg), "serve")
    assert f"HTTP port 127.0.0.1:{busy_port} ([http] host, port): in use by another program" in line, line


@pytest.mark.parametrize("case", ["cert-missing", "key-of-another-cert", "ca-not-a-bundle"])
def test_serve_with_tls_files_it_cannot_use_names_the_key_and_file(tmp_path: Path, case: str) -> None:
    """break18: `[node.tls] cert` naming a file that does not exist: "srnode serve: error: DICOM port
    127.0.0.1:P ([node] host, port): cannot listen: No such file or directory", after the executor, the watcher
    and the outbox had started; a key of another certificate: "cannot listen: [X509: KEY_VALUES_MISMATCH] key
    values mismatch"; a CA that is a key: "cannot listen: [X509: NO_CERTIFICATE_OR_CRL_FOUND] ...".
    Now one line naming the key and the file, before anything starts (no spool lock, no index)."""
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"cert-missing": (tmp_path / "nonexistent.pem", pki.server_key, ""),
           "key-of-another-cert": (pki.server_cert, pki.rogue_key, ""),
           "ca-not-a-bundle": (pki.server_cert, pki.server_key, pki.server_key)}[case]
    cfg = _serve_config(tmp_path, free_port(), free_port())
    cfg.write_text(cfg.read_text() + f'[node.tls]\nenabled = true\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n'
                   f'ca = "{tls[2]}"\n')
    line = one_error_line(srnode("--log-level", "WARNING", "serve", "--config", cfg), "serve")
    assert "DICOM port" not in line and "cannot listen" not in line, line
    expect = {"cert-missing": f"node.tls.cert: {tls[0]}: No such file or directory",
              "key-of-another-cert": f"node.tls.cert / node.tls.key: {tls[0]} and {tls[1]} are not a certificate",
              "ca-not-a-bundle": f"node.tls.ca: {tls[2]} is no CA bundle"}[case]
    assert expect in line, line
    assert not (tmp_path / "spool" / "index.sqlite").exists()  # refused before the spool was touched


def _spool_with_an_index(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\nspool_dir = "{tmp_path / "spool"}"\n')
    Index(Spool(load_config(cfg).spool_path).index_path)  # what a node leaves: the spool and its index
    return cfg


def test_status_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    cfg = _spool_with_an_index(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "node.app.cli", "status", "--json", "--config", str(cfg)],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before srnode writes (as `| head -1` after its line)
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0, err
    assert err == ""
    # and the shell's own pipe
    r = subprocess.run(f"{sys.executable} -m node.app.cli status --json --config {cfg} | head -1", shell=True,
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout == "{\n" and r.stderr == ""


def test_demo_leaves_a_config_for_status(tmp_path: Path) -> None:
    """`make demo` (here with the cubic engine): the printed `srnode status --config ...` finds the demo's job."""
    r = subprocess.run([sys.executable, "-m", "node.app.demo", "--engine", "cubic", "--workdir", str(tmp_path / "run"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"status --config (\S+)", r.stdout)
    assert m, r.stdout
    config = Path(m.group(1)) if Path(m.group(1)).is_absolute() else ROOT / m.group(1)
    assert config == tmp_path / "run" / "config.toml"
    assert f"preview (original / derived, 3 planes): {tmp_path / 'out' / 'preview-job1.png'}" \
        in r.stdout and (tmp_path / "out" / "preview-job1.png").is_file()  # one preview per job
    assert "no uncertainty series (engine cubic has no sigma" in r.stdout, r.stdout
    status = srnode("status", "--config", config, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = [ln for ln in status.stdout.splitlines()[1:] if ln.strip()]
    assert len(rows) == 1 and " delivered " in rows[0] and "local:delivered" in rows[0], status.stdout


def test_process_progress_bar_only_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal each series gets a bar naming its stages; piped or with --quiet, only the result lines."""
    src = tmp_path / "in"
    write_phantom_series(src, slices=5, size=32, step_mm=3.0)

    def run(*extra: str) -> tuple[int, str, str]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        p = subprocess.Popen([sys.executable, "-m", "node.app.cli", "process", str(src), str(tmp_path / "out"),
                              "--engine", "cubic", "--no-preview", *extra], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        out = p.communicate(timeout=300)[0].decode()
        os.close(master)
        return p.returncode, out, b"".join(chunks).decode(errors="replace")

    rc, out, tty = run()
    assert rc == 0 and out.count("rule ct-mr-thick:") == 1, out + tty
    assert "[1/1] CT 5 file(s)" in tty and "stages" in tty and "engine cubic" in tty and "deriving" in tty, tty
    rc, out, tty = run("--quiet")
    assert rc == 0 and "stages" not in tty and "rule ct-mr-thick:" in out, tty
    r = srnode("process", src, tmp_path / "out2", "--engine", "cubic", "--no-preview")
    assert r.returncode == 0 and "stages" not in r.stderr and "rule ct-mr-thick:" in r.stdout


@pytest.mark.parametrize("option", [("--in-slices", "0"), ("--in-slices", "-3"), ("--steps", "0"), ("--steps", "-5"),
                                    ("--width", "0"), ("--depth", "0"), ("--depth", "-1")])
def test_train_refuses_non_positive_counts_before_writing_anything(tmp_path: Path, option: tuple[str, str]) -> None:
    """break12: --in-slices 0 / -3 and --width 0 died in a traceback; --steps 0 / -5 wrote an untrained prior (loss
    nan) to --out with exit 0 (by default over the shipped models/weights/prior.pt). rev12: --depth 0 / -1 wrote a
    prior with exit 0 whose config states that depth (the net built as depth 1)."""
    from node.app.phantom import write_phantom_series
    data = tmp_path / "series"
    write_phantom_series(data, slices=6, size=64, step_mm=3.0, fov_mm=96.0)
    out = tmp_path / "prior.pt"
    r = srnode("train", str(data), "--out", str(out), "--steps", "2", f"{option[0]}={option[1]}", timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and option[0] in r.stderr, r.stderr
    assert not out.exists()
