"""Progress bars of ``srnode eval`` and ``srnode train`` as a user sees them: on a terminal a bar names the stage
and one under it counts the engine's steps with ETA; piped or with --quiet, nothing on stderr but the logs."""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from tests.app.test_cli import _env
from tests.support.fixtures import ROOT


def _on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run ``srnode ARGS`` with stderr on a pseudo-terminal (100 x 24): (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", *args], cwd=ROOT,
                         env=_env(), stdout=subprocess.PIPE, stderr=slave)
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


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CT-like volume as an ``srnode eval`` .npz export (17 x 48 x 48, 1 mm slices)."""
    from tests.models.test_engine_selfsup import _phantom

    path = tmp_path_factory.mktemp("vol") / "phantom.npz"
    z = 17
    np.savez(path, data=_phantom((z, 64, 64)).astype(np.int16), spacing=np.array([1.0, 0.8, 0.8]),
             thickness=1.0, modality="CT", value_range=np.array([-1024.0, 3071.0]),
             positions=np.stack([np.zeros(z), np.zeros(z), np.arange(z, dtype=float)], axis=1),
             normal=np.array([0.0, 0.0, 1.0]))
    return path


def test_eval_bar_names_stages_and_counts_engine_steps(npz: Path, tmp_path: Path) -> None:
    args = ["eval", str(npz), "--device", "cpu", "--finetune-steps", "6", "--tta-passes", "2",
            "--json", str(tmp_path / "e.json")]
    rc, out, tty = _on_a_terminal(args)
    assert rc == 0 and "PSNR" in out, out + tty
    for words in ("eval phantom through x2", "engine selfsup", "through fine-tune", "through passes", "loss",
                  "baselines", "metrics", "<"):  # "<": tqdm's elapsed<remaining, the ETA
        assert words in tty, (words, tty[-3000:])
    cheap = ["eval", str(npz), "--engine", "cubic", "--json", str(tmp_path / "c.json")]
    rc, out, tty = _on_a_terminal([*cheap, "--quiet"])
    assert rc == 0 and "PSNR" in out and "baselines" not in tty and "stage" not in tty, tty
    piped = subprocess.run([sys.executable, "-m", "node.app.cli", "--log-level", "WARNING", *cheap], cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "baselines" not in piped.stderr and "stage" not in piped.stderr, piped.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_train_bar_counts_steps_with_loss(npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (training is the slow part): on a terminal, the steps of each net with their loss (nothing
    when piped: the same bars as eval's, tested there)."""
    import torch

    from models import prior
    from models.nets import SRNetConfig
    from models.prior import train_prior
    from node.app import train_cmd

    # --only through keeps the in-plane nets of an existing checkpoint: a tiny one, no steps
    torch.save(train_prior([], 0, torch.device("cpu"), SRNetConfig(width=8, depth=2))[0], tmp_path / "p.pt")
    parser = argparse.ArgumentParser()
    train_cmd.configure(parser)
    args = parser.parse_args([str(npz), "--out", str(tmp_path / "p.pt"), "--steps", "2", "--device", "cpu",
                              "--width", "8", "--depth", "2", "--only", "through"])
    stream = _Terminal()
    monkeypatch.setattr(prior, "THROUGH_FACTORS", (2,))  # one net is enough to see its steps
    monkeypatch.setattr(sys, "stderr", stream)
    assert train_cmd.run(args) == 0
    text = stream.getvalue()
    assert "training on 1 series" in text and "through x2 (1/1)" in text and "loss" in text, text
