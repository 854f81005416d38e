"""``node.bench.eclare``'s runner: however a peer's run ends (its exit with 0 or an error code, the time cap, the
no-GPU stop, KeyboardInterrupt), nothing it started in its process group is left running. The stand-in peer
(tests/support/fake_peer.py, ``FAKE_PEER_CHILD``) starts a child that waits forever and says its PID."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from node.bench.eclare import PeerTimeout, _run_capped
from node.errors import EngineError
from tests.support.fixtures import ROOT
from tests.support.peers import wait_until

FAKE = [sys.executable, str(ROOT / "tests" / "support" / "fake_peer.py")]


def _gone(pid: int) -> bool:
    """No process ``pid`` any more, or only its zombie (an orphan is reaped by whoever adopted it, not by us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _interrupt_once(pid_file: Path) -> None:
    """KeyboardInterrupt in the main thread (as Ctrl-C does) once the peer's child is there."""
    wait_until(pid_file.exists, 120, interval=0.05, what="the peer's child")
    _thread.interrupt_main()


# how the run ends -> (FAKE_PEER, FAKE_PEER_EXIT, extra options, cap in s, what _run_capped does)
ENDINGS: dict[str, tuple[str, str, list[str], float, type[BaseException] | int]] = {
    "exit 0": ("", "0", [], 300.0, 0),
    "exit 3": ("", "3", [], 300.0, 3),
    "cap": ("hang", "", [], 10.0, PeerTimeout),  # the stand-in starts its child before anything else
    "no gpu": ("hang", "", ["--gpu-id", "0"], 300.0, EngineError),
    "KeyboardInterrupt": ("hang", "", [], 300.0, KeyboardInterrupt),
}


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("how", list(ENDINGS))
def test_the_peers_whole_process_group_is_killed_however_its_run_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       how: str) -> None:
    mode, code, extra, cap, outcome = ENDINGS[how]
    pid_file = tmp_path / "child.pid"
    for name, value in (("FAKE_PEER_CHILD", str(pid_file)), ("FAKE_PEER", mode), ("FAKE_PEER_EXIT", code)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FAKE_PEER_GPU", raising=False)
    argv = [*FAKE, "--in-fpath", str(tmp_path / "x.nii.gz"), "--out-dir", str(tmp_path / "out"), *extra]
    if outcome is KeyboardInterrupt:
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            pytest.skip("needs the main thread with Python's own SIGINT handler")
        threading.Thread(target=_interrupt_once, args=(pid_file,), daemon=True).start()
    try:
        if isinstance(outcome, int):
            assert _run_capped(argv, tmp_path, tmp_path / "peer.log", cap, need_gpu=False) == outcome
        else:
            with pytest.raises(outcome):
                _run_capped(argv, tmp_path, tmp_path / "peer.log", cap, need_gpu=bool(extra))
        assert pid_file.is_file(), (tmp_path / "peer.log").read_text()
        child = int(pid_file.read_text())
        wait_until(lambda: _gone(child), 30, interval=0.05, what=f"the peer's child {child} gone")
    finally:
        if pid_file.is_file() and not _gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
