"""Ray as the project starts it: loopback listeners only, token auth on, and no other way to start it."""
import os
import re
from pathlib import Path

import pytest

from microdit.cli import UserError
from microdit.ray_cluster import ray_session

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners() -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every listening socket of this process and all its children."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil
    me = psutil.Process()
    found = []
    for p in [me] + me.children(recursive=True):
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((p.pid, p.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return found


def _node_info(gcs: str, token: str | None):
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    with grpc.insecure_channel(gcs) as ch:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch)
        md = [("authorization", f"Bearer {token}")] if token else None
        return stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=md, timeout=20)


def test_local_ray_listens_on_loopback_and_refuses_clients_without_the_token():
    import grpc
    import ray
    before = {(pid, port) for pid, _, _, port in _listeners()}
    with ray_session(num_cpus=1):
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42          # tasks run with auth on
        ray_listeners = [x for x in _listeners() if (x[0], x[3]) not in before]
        names = {n for _, n, _, _ in ray_listeners}
        assert "gcs_server" in names and "raylet" in names, ray_listeners
        exposed = [x for x in ray_listeners if x[2] not in LOOPBACK]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"

        gcs = ray._private.worker.global_worker.node.gcs_address
        token = os.environ["RAY_AUTH_TOKEN"]
        for wrong in (None, "not-the-token"):
            with pytest.raises(grpc.RpcError) as e:
                _node_info(gcs, wrong)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert len(_node_info(gcs, token).node_info_list) == 1               # the token is what lets one in
    assert not ray.is_initialized()
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"


def test_joining_a_cluster_without_a_token_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))                  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN"):
        with ray_session(address="127.0.0.1:9"):
            pass


def test_nothing_starts_ray_or_switches_auth_off_elsewhere():
    files = [p for d in ("microdit", "dataprep", "flows", "infra") for p in (ROOT / d).rglob("*") if p.is_file()]
    files += [ROOT / "Makefile", ROOT / "prefect.yaml", ROOT / "tests" / "conftest.py"]
    for p in files:
        if p.suffix not in (".py", ".yaml", ".json", "") and p.name not in ("Dockerfile", "Makefile"):
            continue
        text = p.read_text(errors="ignore")
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", text), f"{p} switches Ray auth off"
        if p.suffix == ".py" and p.name != "ray_cluster.py":
            assert "ray.init(" not in text, f"{p} starts Ray itself: use microdit.ray_cluster.ray_session"
