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


@contextmanager
def _loopback_node_address(address: str):
    """Joining a cluster whose head is on loopback (`loopback_cluster`): this driver's node address is
    127.0.0.1 too, so it finds the local raylet and listens on loopback only."""
    import ray._private.ray_constants as ray_constants
    if address.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
        yield {}
        return
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False           # read when ray.init picks the node address
    try:
        yield {"_node_ip_address": "127.0.0.1"}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def _join(address: str, init_kwargs: dict) -> None:
    import ray
    from ray.exceptions import AuthenticationError
    try:
        with _loopback_node_address(address) as local:
            ray.init(address=address, log_to_driver=False, **local, **init_kwargs)
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


# --------------------------------------------------------------------------------------------
#       A multi-node cluster on one machine (rehearsals and tests of declared resources)
# --------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def loopback_cluster(nodes: list[dict], temp_dir: str | None = None, timeout: float = 120):
    """A Ray cluster of `len(nodes)` nodes on this machine, each a `ray start --block` on 127.0.0.1:
    the first is the head; each dict gives the node's `num_cpus` and custom `resources` (e.g.
    {"latent_encoder": 1}). Token auth is on (a fresh token, exported to this process for the block).
    Yields the GCS address ("127.0.0.1:<port>"). Every listener gets its own free port, so several such
    clusters (and other Rays) coexist; at exit exactly the processes started here are stopped (SIGTERM
    to each `ray start`, whose node then stops its own processes), never a global `ray stop`."""
    import json
    import subprocess
    import sys
    import time
    tmp = temp_dir or tempfile.mkdtemp(prefix="mbrc-", dir="/tmp")   # short: socket paths have a length limit
    os.makedirs(tmp, exist_ok=True)
    token = secrets.token_hex(32)
    # `ray start` keeping 127.0.0.1 as the node address of every listener (Ray swaps a loopback
    # --node-ip-address for the machine's outward address: see loopback_token_auth)
    ray_bin = [sys.executable, "-c", "import sys, ray._private.services as s; s.resolve_ip_for_localhost = str; "
               "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": tmp}
    gcs_port = _free_port()
    procs = []
    try:
        for i, node in enumerate(nodes):
            args = [*ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
                    f"--num-cpus={int(node.get('num_cpus', 1))}", f"--num-gpus={int(node.get('num_gpus', 0))}",
                    f"--resources={json.dumps(node.get('resources', {}))}",
                    f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                    f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                    "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
            if i == 0:
                args += ["--head", f"--port={gcs_port}", "--include-dashboard=false", f"--dashboard-port={_free_port()}",
                         f"--ray-client-server-port={_free_port()}"]
            else:
                args += [f"--address=127.0.0.1:{gcs_port}"]
            log = open(os.path.join(tmp, f"node{i}.log"), "wb")
            procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            if i == 0:
                _wait_for_port(gcs_port, procs[0], timeout, os.path.join(tmp, "node0.log"))
        with _environ(RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="token"):
            _wait_for_nodes(f"127.0.0.1:{gcs_port}", token, len(nodes), procs, timeout)
            yield f"127.0.0.1:{gcs_port}"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        _reload_auth_config()
        if temp_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_port(port: int, proc, timeout: float, log: str) -> None:
    import socket
    import time
    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the Ray head on 127.0.0.1:{port} did not start (see {log})")
        time.sleep(0.5)


def _wait_for_nodes(address: str, token: str, n: int, procs, timeout: float) -> None:
    """Until `n` nodes are alive in the GCS (asked with the token, without connecting a driver)."""
    import time

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    deadline = time.time() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch)
        while True:
            try:
                reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(),
                                            metadata=[("authorization", f"Bearer {token}")], timeout=10)
                if sum(1 for x in reply.node_info_list if x.state == 0) >= n:     # 0 = ALIVE
                    return
            except grpc.RpcError:
                pass
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                raise RuntimeError(f"the {n}-node Ray cluster at {address} did not come up")
            time.sleep(0.5)
