"""Start or join Ray the one way this project does: token authentication always on, a local Ray on loopback.

    from microdit.ray_cluster import ray_session

    with ray_session(num_cpus=2):              # a local Ray for this run: 127.0.0.1 only, a fresh token
        ...
    with ray_session(address="auto"):          # a running cluster: its token from RAY_AUTH_TOKEN,
        ...                                    # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token

A Ray that anyone on the network can reach runs anyone's code (its Jobs API and GCS; CVE-2023-48022),
so nothing here ever turns Ray's token authentication off:
- local: every listener (GCS, raylet, object manager, workers, runtime-env agent, autoscaler metrics)
  binds 127.0.0.1, no dashboard, and a token made for this session is required on every connection;
- cluster (`address`): token mode; the cluster must be started with `RAY_AUTH_MODE=token` and this
  process given its token as a secret (docs/security.md says how). A missing or wrong token, or no
  cluster at the address, ends with a `UserError` that says what to set.
Inside a Ray that is already running (a Ray Train worker, a test that started one), the session uses it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager

from .cli import UserError

TOKEN_HELP = ("start the cluster with RAY_AUTH_MODE=token and give this process its token: RAY_AUTH_TOKEN, "
              "or RAY_AUTH_TOKEN_PATH naming a file (`ray get-auth-token` on the head prints it; docs/security.md)")


@contextmanager
def _environ(**values: str):
    """Set environment variables for the block and put the old values back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reload_auth_config() -> None:
    """Make an already-imported Ray see the auth variables just set (it caches its config and token)."""
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def loopback_token_auth():
    """Environment for a Ray started by this process: token mode with a fresh token, node address 127.0.0.1.

    Ray picks a node address reachable from other machines unless its "cluster mode" is off, and binds
    its gRPC servers to every interface unless that address is loopback; turning cluster mode off makes
    the node address (and so every bind) 127.0.0.1. Child processes inherit the variables."""
    import ray._private.ray_constants as ray_constants
    old_cluster = ray_constants.ENABLE_RAY_CLUSTER
    with _environ(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
        ray_constants.ENABLE_RAY_CLUSTER = False       # read when ray.init picks the node address
        _reload_auth_config()
        try:
            yield
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = old_cluster
    _reload_auth_config()


def _start_local(num_cpus: int | None, init_kwargs: dict) -> None:
    import ray
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False, **init_kwargs)
    ip = ray._private.worker.global_worker.node.node_ip_address
    if ip not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise RuntimeError(f"local Ray chose node address {ip}, not loopback: refusing to run it")


def _join(address: str, init_kwargs: dict) -> None:
    import ray
    from ray.exceptions import AuthenticationError
    try:
        ray.init(address=address, log_to_driver=False, **init_kwargs)
    except AuthenticationError as e:
        raise UserError(f"Ray cluster {address}: no valid auth token ({str(e).splitlines()[0]}); "
                        f"{TOKEN_HELP}") from None
    except ConnectionError as e:
        raise UserError(f"Ray cluster {address}: cannot connect ({str(e).splitlines()[0]}); check the address "
                        f"and that the cluster runs, then {TOKEN_HELP}") from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Ray for the block: join `address` (a cluster) or start a local one (stopped after the block).

    Reuses a Ray this process already runs. A local Ray keeps its sessions and sockets in a short
    per-session folder under /tmp (socket paths have a length limit), removed afterwards."""
    import ray
    if ray.is_initialized():
        yield
        return
    if address:
        with _environ(RAY_AUTH_MODE="token"):
            _reload_auth_config()
            _join(address, init_kwargs)
            try:
                yield
            finally:
                ray.shutdown()
        _reload_auth_config()
        return
    tmp = tempfile.mkdtemp(prefix="mbray-", dir="/tmp")
    try:
        with loopback_token_auth(), _environ(RAY_TMPDIR=tmp):
            _start_local(num_cpus, {"_temp_dir": tmp, **init_kwargs})
            try:
                yield
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
