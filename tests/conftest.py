"""Test environment: offline, CPU, bounded threads, per-run temporary folders."""
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# A real S3 endpoint on loopback: moto's server (speaks the S3 protocol over HTTP), one per session
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """http://127.0.0.1:<port> of a moto_server subprocess (stopped by its PID at the end). For the
    session, the standard variables point every S3 client at it (background download threads of a
    streaming loader may outlive a test)."""
    import subprocess
    import sys
    from flows.rehearsal import start_s3_server
    if not (Path(sys.executable).with_name("moto_server")).exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    proc, url = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    env = {"S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "loopback-secret-never-logged", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the loopback S3 server: s3://<bucket> (subprocesses inherit the environment)."""
    import re

    import boto3
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 10000}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def s3_keys(bucket_url: str, prefix: str = "") -> list[str]:
    """Every object key under the bucket (and prefix), from the server itself."""
    import boto3
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket_url[5:].split("/")[0], Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))
