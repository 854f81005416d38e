"""Who may reach the HTTP API: a node bound beyond loopback serves patient data (``/jobs``, WADO-RS of the spooled
series, STOW-RS in) to the network, so it needs ``[http] token`` unless the operator says otherwise.

:func:`check_exposure` is the one door, called by ``node.app.service`` before the API starts; :func:`is_loopback`
is the test it makes of ``[http] host``. Both stay importable from ``node.app.http``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from node.config import HttpConfig
from node.errors import ConfigError

# the HTTP API's logger: these warnings are about the API and read as they did when this code lived in http.py
log = logging.getLogger("node.app.http")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only: 127.0.0.0/8, ::1, or a name that
    resolves to those alone. "", 0.0.0.0, :: and names that do not resolve count as beyond loopback."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_exposure(cfg: HttpConfig) -> None:
    """Refuse to serve patient data to anyone on the network: an HTTP API bound beyond loopback needs
    ``[http] token`` unless ``[http] allow_anonymous = true`` (then a warning is logged). Raises ConfigError
    (one line, naming the keys)."""
    if cfg.token:
        return
    if not is_loopback(cfg.host):
        if not cfg.allow_anonymous:
            raise ConfigError(
                f"http: [http] host = {cfg.host!r} is reachable beyond loopback and [http] token is empty: anyone "
                "on the network could read /jobs and the spooled series (WADO-RS) and post STOW-RS; set "
                '[http] token (e.g. "env:SRNODE_HTTP_TOKEN"), or bind [http] host to 127.0.0.1, or set '
                "[http] allow_anonymous = true")
        log.warning("HTTP API on %s:%d WITHOUT a token ([http] allow_anonymous = true): anyone who can reach it "
                    "may read /jobs and the spooled series and post STOW-RS", cfg.host, cfg.port)
    elif cfg.allow_anonymous:
        log.warning("HTTP API without a token ([http] allow_anonymous = true): every local user and process "
                    "may read /jobs and the spooled series")
