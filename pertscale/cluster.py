"""Starting Ray: one place for every job that runs on the cluster (pretraining, GenePert CV)."""

from __future__ import annotations

import logging
import os
from typing import Any

from pertscale.config import env_seconds

log = logging.getLogger(__name__)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

__all__ = ["bind_gloo_to_node_address", "start_ray"]

GLOO_IFNAME = "GLOO_SOCKET_IFNAME"
WORKER_SETUP_HOOK = "pertscale.cluster.bind_gloo_to_node_address"


def start_ray(address: str | None, *, num_cpus: int | None, env_vars: dict[str, str] | None = None,
              log_to_driver: bool = True) -> None:
    """Connect to the running cluster at `address` ("auto", "HOST:6379", "ray://HOST:10001"), or
    start an embedded local cluster with `num_cpus` CPUs. A Ray session already open in this
    process (tests, notebooks, a pipeline's earlier step) is reused as is."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "runtime_env": {
        "env_vars": dict(env_vars or {}), "worker_process_setup_hook": WORKER_SETUP_HOOK}}
    if address:
        _check_reachable(address)
        ray.init(address=address, **kwargs)
    else:
        if "RAY_AUTH_MODE" not in os.environ:
            # NOTE: Ray enables token authentication for a new local cluster and warns about its
            # choice in every command; said once here, at info level, instead
            logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
            log.info("embedded Ray cluster: Ray's default token authentication "
                     "(RAY_AUTH_MODE=disabled opts out)")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def bind_gloo_to_node_address() -> None:
    """Ray worker setup hook: gloo (the CPU collectives) binds the network interface that carries
    this node's Ray address, unless GLOO_SOCKET_IFNAME says otherwise. By default gloo binds the
    address the hostname resolves to; where /etc/hosts maps the hostname to a loopback address
    (a common default), ranks on other nodes connect to 127.0.0.1 and the process group never
    forms ("Gloo connectFullMesh failed ... remote=[127.0.0.1]")."""
    if os.environ.get(GLOO_IFNAME):
        return
    import psutil
    import ray

    ip = ray.util.get_node_ip_address()
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addresses):
            os.environ[GLOO_IFNAME] = name
            log.info("gloo binds %s (%s, this node's Ray address; %s overrides)", name, ip,
                     GLOO_IFNAME)
            return
    log.warning("no network interface carries this node's Ray address %s; gloo binds the "
                "hostname's address (set %s if ranks on other nodes cannot connect)", ip,
                GLOO_IFNAME)


RAY_TIMEOUT_ENV = "PERTSCALE_RAY_TIMEOUT_S"


# NOTE: a Ray head (GCS, or the Ray Client server of a ray:// address) is a gRPC server, so it
# answers HTTP/2's client preface with a SETTINGS frame; anything else on the port (a web server,
# a silent listener) would hold `ray.init` in its reconnect loop for minutes
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def _check_reachable(address: str) -> None:
    """A cluster address that does not answer, or answers but is not a Ray head, is an error
    within PERTSCALE_RAY_TIMEOUT_S (default 30 s): `ray.init` itself waits minutes for it."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host = parsed.hostname
    port = parsed.port or (10001 if address.startswith("ray://") else 6379)  # client / GCS
    limit = env_seconds(RAY_TIMEOUT_ENV, 30.0)
    setting = f"{RAY_TIMEOUT_ENV} sets the limit"
    try:
        with socket.create_connection((host, port), timeout=limit) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS head answers only a TLS handshake
            conn.sendall(HTTP2_PREFACE)
            frame = conn.recv(9)
    except TimeoutError:
        raise ConnectionError(f"Ray cluster at {address} did not answer within {limit:g} s "
                              f"({setting}); is `ray start --head` running there?") from None
    except OSError as e:
        raise ConnectionError(f"Ray cluster at {address} is not reachable within {limit:g} s "
                              f"({e}; {setting}); is `ray start --head` running there?") from None
    if len(frame) < 9 or frame[3] != HTTP2_SETTINGS:
        raise ConnectionError(f"{host}:{port} answers but is not a Ray head (it does not speak "
                              f"gRPC); give the address `ray start --head` printed")
