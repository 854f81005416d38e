"""An HTTP API with patient data is never open to the network by accident: the real node refuses to start with
``[http] host`` beyond loopback and no ``[http] token`` (one line naming both keys), unless
``[http] allow_anonymous = true``, and logs a warning whenever anonymous access is allowed. The shipped
deployment configs carry a token from the environment.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from node.app.http import check_exposure, is_loopback
from node.config import HttpConfig, load_config
from node.errors import ConfigError
from tests.support.nodeproc import NodeProc
from tests.support.peers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_node_refuses_to_serve_the_network_without_a_token(tmp_path: Path) -> None:
    # nothing is bound: the refusal comes before the SCP and the HTTP server start
    node = NodeProc.start(tmp_path / "node", {"http": {"host": "0.0.0.0"}}, wait=False)
    assert node.proc is not None
    assert node.proc.wait(timeout=60) == 1
    errors = [ln for ln in node.log().splitlines() if "srnode serve: error:" in ln]
    assert len(errors) == 1, node.log()[-2000:]
    line = errors[0]
    assert "[http] host = '0.0.0.0'" in line and "[http] token is empty" in line
    assert "[http] allow_anonymous = true" in line
    assert "DICOM SCP" not in node.log(), "the SCP started before the refusal"


def test_anonymous_access_is_allowed_only_when_asked_and_then_logged(tmp_path: Path) -> None:
    with NodeProc.start(tmp_path / "node", {"http": {"allow_anonymous": True}}) as node:
        wait_until(lambda: httpx.get(f"{node.http_url}/jobs", timeout=2).status_code == 200, timeout=30,
                   what="GET /jobs answered anonymously")
        assert "HTTP API without a token ([http] allow_anonymous = true)" in node.log()


def test_token_from_the_environment_closes_the_api(tmp_path: Path) -> None:
    env = {"SRNODE_HTTP_TOKEN": "tok-exposure-1"}
    with NodeProc.start(tmp_path / "node", {"http": {"token": "env:SRNODE_HTTP_TOKEN"}}, env=env) as node:
        wait_until(lambda: httpx.get(f"{node.http_url}/healthz", timeout=2).status_code == 200, timeout=30,
                   what="HTTP API up")
        assert httpx.get(f"{node.http_url}/jobs", timeout=5).status_code == 401
        assert httpx.get(f"{node.http_url}/dicom-web/studies/1.2/series/1.3", timeout=5).status_code == 401
        ok = httpx.get(f"{node.http_url}/jobs", headers={"Authorization": "Bearer tok-exposure-1"}, timeout=5)
        assert ok.status_code == 200
        assert "WITHOUT a token" not in node.log() and "HTTP API without a token" not in node.log()


def test_exposure_rules(caplog: pytest.LogCaptureFixture) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1") and is_loopback("localhost")
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "10.0.0.5", "no-such-host.invalid"))
    check_exposure(HttpConfig(host="127.0.0.1"))
    check_exposure(HttpConfig(host="0.0.0.0", token="t"))
    with pytest.raises(ConfigError, match=r"\[http\] host = '10.0.0.5' .* \[http\] token is empty"):
        check_exposure(HttpConfig(host="10.0.0.5"))
    with caplog.at_level(logging.WARNING, logger="node.app.http"):
        check_exposure(HttpConfig(host="0.0.0.0", allow_anonymous=True))
    assert "WITHOUT a token" in caplog.text


def test_shipped_deployment_configs_need_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SRNODE_HTTP_TOKEN", raising=False)
    for name in ("deploy/config.toml", "deploy/config-celery.toml"):
        with pytest.raises(ConfigError, match="environment variable 'SRNODE_HTTP_TOKEN' is not set"):
            load_config(ROOT / name)
    monkeypatch.setenv("SRNODE_HTTP_TOKEN", "tok")
    for name in ("deploy/config.toml", "deploy/config-celery.toml"):
        cfg = load_config(ROOT / name)
        assert cfg.http.host == "0.0.0.0" and cfg.http.token == "tok" and not cfg.http.allow_anonymous
        check_exposure(cfg.http)
