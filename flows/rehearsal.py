"""The rehearsal: the paper profile's code path, at toy size, end to end on one CPU machine.

    make rehearsal                                   # = python -m flows.rehearsal
    python -m flows.rehearsal --root runs            # outputs in runs/rehearsal, ledger in runs/ledger.duckdb
    prefect deployment run micro-budget/rehearsal    # the same flow through a work pool (prefect.yaml)

What it starts, all on 127.0.0.1 and stopped by PID at the end: an S3 server (moto, unless
S3_ENDPOINT_URL already names one) with a bucket for the latents, and a 2-node Ray cluster (token auth
on): a head with one CPU and no encoder resource, and a node declaring `latent_encoder: 2`. Then, as the
`paper` profile would on a cluster: download (shapes through img2dataset on loopback) -> precompute with
declared resources (actors only on the encoder node) into `s3://micro-budget-rehearsal/latents/...` ->
training through `infra/torchrun.sh` with 2 processes (FSDP2 over gloo, sharded checkpoints) reading
the latents from S3 through a cache smaller than the set, killed with SIGKILL after its first checkpoint
and rerun (it resumes) -> the second stage at the next resolution -> evaluation -> the cost ledger. At
the end it prints what ran where (`where.json` in the run folder). Measured here: 519 s.

What it proves, and what only a real cluster can: docs/orchestration.md, "The rehearsal".
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import flow

from . import ledger, steps
from .prefect_flows import _db, _setup, data_flow, evaluate_flow, precompute_flow, train_flow

PROFILE = "rehearsal"
NODES = [{"num_cpus": 1}, {"num_cpus": 2, "resources": {"latent_encoder": 2}}]   # head, encoder node


@contextmanager
def loopback_s3(bucket: str, log_dir: Path):
    """An S3 endpoint for the block: the one S3_ENDPOINT_URL names, else a moto server on a free
    loopback port with throw-away credentials (stopped by PID after the block). Creates `bucket`."""
    import boto3
    started, saved = None, {}
    if not os.environ.get("S3_ENDPOINT_URL"):
        started, url = start_s3_server(log_dir / "s3-server.log")
        env = {"S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "rehearsal",
               "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
    try:
        s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=bucket)
        yield os.environ["S3_ENDPOINT_URL"]
    finally:
        if started is not None:
            started.terminate()
            started.wait(10)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def start_s3_server(log_path: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """A moto S3 server (this environment's `moto_server`) on a free 127.0.0.1 port, logging to `log_path`;
    returns (process, endpoint URL) once it answers. The caller stops it by its PID."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)    # noqa: S310 (loopback)
            return proc, url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the S3 server on {url} did not start (log {log_path})")
            time.sleep(0.3)


def train_until_first_checkpoint_then_kill(cfg, nproc: int) -> dict:
    """Start the stage under torchrun and SIGKILL the whole process group once a resumable checkpoint
    exists (the crash the rerun must survive)."""
    from microdit.manifest import write_json_atomic
    from microdit.training.state import latest_checkpoint
    out = Path(cfg.out_dir)
    if steps.stage_complete(cfg) or latest_checkpoint(out) is not None:
        return {"killed": False, "why": "a checkpoint or the final model exists already"}
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = write_json_atomic(out.parent / f"{out.name}.json", cfg.to_dict())
    script = Path(__file__).resolve().parent.parent / "infra" / "torchrun.sh"
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PY": sys.executable}
    log = out.parent / f"{out.name}-killed.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["bash", str(script), "--config", str(cfg_file)], env=env, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            while latest_checkpoint(out) is None and proc.poll() is None:
                time.sleep(0.2)
        finally:
            if proc.poll() is None:                          # torchrun and both ranks (torchrun starts each rank
                for pid in [proc.pid, *_descendants(proc.pid)]:  # in a session of its own): no clean-up at all
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.wait()
    last = latest_checkpoint(out)
    if last is None:
        raise RuntimeError(f"{cfg.name} exited (code {proc.returncode}) before its first checkpoint: see {log}")
    return {"killed": True, "checkpoint_at_kill": str(last)}


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def what_ran_where(run: Path, latents: list[str], node_roles: dict, trained: dict, killed: dict) -> dict:
    """Which node ran which encoder actor, where the shards live, which ranks trained and from where."""
    from dataprep.units import finished_units
    from microdit.manifest import Manifest
    from microdit.storage import list_files
    sets = []
    for url in latents:
        units = finished_units(url)
        actors = {}
        for u in units.values():
            key = (node_roles.get(u["node"], u["node"][:8]), u["pid"])
            actors[key] = actors.get(key, 0) + u["samples"]
        objects = list_files(url)
        sets.append({"latents": url, "shards_in_bucket": sum(n.endswith(".mds") for n in objects),
                     "objects": len(objects), "samples": Manifest.read(url).samples,
                     "actors": [{"node": n, "pid": pid, "samples": k} for (n, pid), k in sorted(actors.items())]})
    stages = []
    for ckpt in trained["checkpoints"]:
        m = Manifest.read(ckpt)
        stages.append({"stage": m.name, "checkpoint": ckpt, "ranks": m.config.get("world_size"),
                       "strategy": m.config.get("strategy"), "steps": m.metrics.get("steps"),
                       "reads": m.parents[:1], "cache_limit": m.config.get("cache_limit")})
    return {"sets": sets, "training": stages, "killed": killed}


def print_where(where: dict, evaluation: dict | None, cost_table: str) -> None:
    print("\nwhat ran where")
    for s in where["sets"]:
        print(f"  latents {s['latents']}: {s['samples']} samples in {s['shards_in_bucket']} shard objects")
        for a in s["actors"]:
            print(f"    encoder actor pid {a['pid']} on the {a['node']}: {a['samples']} samples")
    k = where["killed"]
    if k.get("killed"):
        print(f"  training killed (SIGKILL) after {k['checkpoint_at_kill']}; the rerun resumed from it")
    for t in where["training"]:
        print(f"  {t['stage']}: {t['ranks']} ranks ({t['strategy']} over gloo, torchrun), {t['steps']} steps, "
              f"reading {t['reads'][0]} through a {t['cache_limit'] or 'unbounded'} cache -> {t['checkpoint']}")
    if evaluation:
        print(f"  evaluation: {evaluation['folder']}")
    print(cost_table)


@flow(name="micro-budget", log_prints=True)          # deployment micro-budget/rehearsal
def rehearsal_flow(root: str = "runs", run_name: str = "rehearsal", ledger_db: str | None = None) -> dict:
    """The paper code path at toy size: S3 + 2-node Ray + torchrun x2 with a kill and resume + eval + ledger."""
    import ray

    from microdit.ray_cluster import loopback_cluster, ray_session
    p, run, run_id = _setup(PROFILE, None, run_name, root)
    bucket = p.latents_url[len("s3://"):].split("/")[0]
    with loopback_s3(bucket, run / "logs"), loopback_cluster(NODES) as address:
        with ray_session(address):
            roles = {n["NodeID"]: ("encoder node" if n["Resources"].get("latent_encoder") else "head node")
                     for n in ray.nodes() if n["Alive"]}
        overrides = {"ray_address": address}
        raw = data_flow(PROFILE, overrides, run_name, root, ledger_db)
        latents = precompute_flow(PROFILE, raw, overrides, run_name, root, ledger_db)
        p = p.replace(**overrides)
        first = steps.stage_configs(p, latents, run)[0]
        killed = train_until_first_checkpoint_then_kill(first, p.train_processes)
        trained = train_flow(PROFILE, latents, overrides, run_name, root, ledger_db)
        evaluation = None
        if trained["status"] == "complete":
            evaluation = evaluate_flow(trained["checkpoints"][-1], PROFILE, overrides, run_name, root, ledger_db)
        where = what_ran_where(run, latents, roles, trained, killed)
    db = _db(root, ledger_db)
    rep = ledger.report(run_id=run_id, profile=PROFILE, db=db)
    summary = {"run": run_id, "latents": latents, "where": where, "training": trained, "evaluation": evaluation,
               "costs": rep.to_dict()}
    (run / "where.json").write_text(json.dumps(summary, indent=2, default=str))
    print_where(where, evaluation, ledger.format_report(rep, f"cost ledger {db} run={run_id}"))
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.rehearsal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs", help="where runs and the ledger live (default %(default)s)")
    ap.add_argument("--run-name", default="rehearsal", help="output folder under --root")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")                 # 2 ranks + encoder actors share the cores
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")   # a busy machine
    t0 = time.time()
    rehearsal_flow(root=a.root, run_name=a.run_name)
    print(f"rehearsal finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
