"""The main job: the whole pipeline on the embedded default, through the real Prefect deployment path.

    python -m flows.demo                          # what `make demo` runs (CPU, offline, minutes)
    python -m flows.demo --overrides '{"steps_scale": 0.1}'   # a shorter run (profile fields, JSON)
    python -m flows.demo --profile local --run-name local2     # another run folder beside runs/local

It starts, all on 127.0.0.1 and under runs/: a Prefect server (PREFECT_HOME=runs/prefect, a free port),
the `micro-budget-local` process work pool (infra/prefect/process-pool.json), the deployments of
prefect.yaml (`prefect deploy --all`), and a process worker; then runs `prefect deployment run
micro-budget/full`, waits for it, prints the evaluation scores, the cost table and where the image grid
is, and stops everything it started (by PID; an idle worker needs a second signal). Ray runs in local
mode inside the precompute step. A second run skips every finished asset.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from microdit.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
POOL = "micro-budget-local"
POOLS = (POOL, "gpu-node")             # the work pools prefect.yaml names


def stdlib_shadows() -> list[Path]:
    """Installed top-level modules named like a standard-library module, such as the 'dataclasses' backport
    img2dataset asks for: `prefect server start` runs uvicorn with --app-dir <site-packages>, which puts them
    ahead of the standard library, and the server dies (dataclass() got an unexpected keyword argument 'slots')."""
    import sysconfig
    found = []
    for d in {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}:
        if d.is_dir():
            found += [p for p in d.iterdir() if (p.suffix == ".py" and p.stem in sys.stdlib_module_names)
                      or (p.is_dir() and p.name in sys.stdlib_module_names and (p / "__init__.py").exists())]
    return sorted(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A background process in its own process group, logged to a file, stopped by its PID."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, again (an idle Prefect worker ignores the first), then SIGKILL; then whatever it started
        (a flow-run process gets its own process group from the worker) if still there."""
        children = descendants(self.pid)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            self._signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self._signal(signal.SIGKILL)          # children left in its group
        self.proc.wait(5)
        for pid in children:                  # children in groups of their own (flow runs, Ray)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(0.5 if sig == signal.SIGTERM else 0)
        self._fh.close()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)          # the group this process leads (start_new_session)
        except ProcessLookupError:
            pass

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of `pid` (Linux /proc; empty elsewhere), deepest last."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def wait_healthy(api: str, server: Service, timeout: float = 120.0) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not server.alive():
            raise RuntimeError(f"the Prefect server exited (log {server.log}):\n{server.tail()}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server was not healthy after {timeout:.0f} s (log {server.log}):\n{server.tail()}")


def prefect_cli(args: list[str], env: dict, what: str, timeout: float | None = 300) -> str:
    cmd = [sys.executable, "-m", "prefect", *args]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(args)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def demo_env(runs: Path, port: int, run_name: str) -> dict:
    tmp = runs / run_name / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)            # per-run TMPDIR: stale streaming locks go with it
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(runs / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_PROMPT="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               RAY_TMPDIR=str(tmp / "ray"), TMPDIR=str(tmp),
               HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), NO_ALBUMENTATIONS_UPDATE="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def run_demo(profile: str = "local", overrides: dict | None = None, run_name: str | None = None,
             deployment: str = "micro-budget/full", timeout: float = 3600.0) -> dict:
    run_name = run_name or profile
    shadows = stdlib_shadows()
    if shadows:
        raise SystemExit(f"error: {', '.join(map(str, shadows))} shadow(s) the standard library under the Prefect "
                         f"server: pip uninstall -y {' '.join(p.stem for p in shadows)}")
    runs = ROOT / "runs"
    (runs / "prefect").mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = demo_env(runs, port, run_name)
    api = env["PREFECT_API_URL"]
    services: list[Service] = []
    t0 = time.time()
    try:
        print(f"[demo] Prefect server on {api} (PREFECT_HOME={env['PREFECT_HOME']})", flush=True)
        server = Service("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env, runs / "prefect" / "server.log")
        services.append(server)
        print(f"[demo] server healthy in {wait_healthy(api, server):.1f} s", flush=True)
        for pool in POOLS:          # gpu-node gets no worker here: it only holds the GPU deployments
            prefect_cli(["work-pool", "create", pool, "--type", "process", "--overwrite",
                         "--base-job-template", str(ROOT / "infra" / "prefect" / "process-pool.json")], env,
                        f"creating the work pool {pool}")
        prefect_cli(["--no-prompt", "deploy", "--all"], env, "deploying prefect.yaml")
        print(f"[demo] deployed prefect.yaml; process worker on pool {POOL} (log runs/prefect/worker.log)",
              flush=True)
        worker = Service("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                    "--type", "process", "--limit", "1"], env, runs / "prefect" / "worker.log")
        services.append(worker)
        params = {"profile": profile, "run_name": run_name, "root": str(runs)}
        if overrides:
            params["overrides"] = overrides
        print(f"[demo] prefect deployment run {deployment} --params '{json.dumps(params)}' --watch", flush=True)
        cmd = [sys.executable, "-m", "prefect", "deployment", "run", deployment, "--params", json.dumps(params),
               "--watch", "--watch-timeout", str(int(timeout))]
        rc, watch_log = watch_run(cmd, env, runs / run_name, runs / "prefect" / "watch.log", timeout)
        flow_run_id = flow_run_id_from(watch_log.read_text(errors="replace"))
        if rc != 0:
            raise RuntimeError(f"the flow run did not complete (exit {rc}); the worker's log "
                               f"(runs/prefect/worker.log) ends with:\n{worker.tail(60)}\n"
                               f"{watch_log.read_text(errors='replace')[-2000:]}")
        reopen = {"flow_run_id": flow_run_id, "run_dir": str(runs / run_name), "prefect_home": env["PREFECT_HOME"]}
        summary_path = runs / run_name / "summary.json"
        if deployment != "micro-budget/full" or not summary_path.exists():
            return {"deployment": deployment, "state": "Completed", "demo_wall_seconds": time.time() - t0,
                    "reopen": reopen}
        summary = json.loads(summary_path.read_text())
        summary["demo_wall_seconds"] = time.time() - t0
        summary["reopen"] = reopen
        return summary
    finally:
        for s in reversed(services):
            s.stop()
        print(f"[demo] stopped {', '.join(f'{s.name} (pid {s.pid})' for s in reversed(services)) or 'nothing'}",
              flush=True)


def watch_run(cmd: list[str], env: dict, run_dir: Path, log: Path, timeout: float) -> tuple[int, Path]:
    """Run `prefect deployment run --watch` (its output to `log`) while showing the run's own progress:
    each step as it starts and ends, and one live line for the running stage (flows/progress.py)."""
    from .progress import Follower
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "progress.jsonl").unlink(missing_ok=True)         # this run's events only
    follower = Follower(run_dir)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout + 60
        try:
            while proc.poll() is None:
                follower.poll()
                if time.time() > deadline:
                    proc.kill()
                    break
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            follower.close()
    return proc.returncode, log


def flow_run_id_from(text: str) -> str | None:
    """The flow run's UUID from `prefect deployment run`'s output."""
    import re
    m = re.search(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", text)
    return m.group(1) if m else None


def reopen_commands(reopen: dict) -> list[str]:
    """How to look at a finished run again: the Prefect UI on its flow run, TensorBoard on its stages."""
    rel = lambda p: os.path.relpath(p, ROOT) if str(p).startswith(str(ROOT)) else str(p)    # noqa: E731
    py = rel(sys.executable)
    out = [f"Prefect UI:   PREFECT_HOME={rel(reopen['prefect_home'])} {py} -m prefect server start "
           "--host 127.0.0.1 --port 4200"]
    if reopen.get("flow_run_id"):
        out.append(f"              then open http://127.0.0.1:4200/runs/flow-run/{reopen['flow_run_id']} "
                   "(artifacts: progress, per-stage figures, scores, cost table)")
    out.append(f"TensorBoard:  {py} -m tensorboard.main --logdir {rel(reopen['run_dir'])}/train --host 127.0.0.1")
    out.append(f"Progress log: {rel(reopen['run_dir'])}/progress.jsonl (python -m flows.progress "
               f"{rel(reopen['run_dir'])} follows a running one)")
    return out


def print_result(summary: dict) -> None:
    print("\n================ micro-budget: result ================")
    ev = summary.get("evaluation") or {}
    report = ev.get("report") or {}
    print(f"run folder   {summary['run_dir']}")
    print(f"training     {summary['training']['status']}; final checkpoint "
          f"{(summary['training']['checkpoints'] or ['-'])[-1]}")
    try:
        from microdit.evaluate.run import format_report          # the evaluator's own summary
        print(format_report(report))
    except Exception:  # an older report layout: print its numbers
        for line in format_scores(report):
            print(line)
    print(f"evaluation   {ev.get('folder', '-')}")
    for g in image_grids(report, ev.get("folder")):
        print(f"image grid   {g}")
    print()
    print(summary["cost_table"])
    print(f"\nledger: {summary['ledger']}  (python -m flows.ledger report --db {summary['ledger']} "
          f"--run {summary['run']})")
    if "demo_wall_seconds" in summary:
        print(f"demo wall time: {summary['demo_wall_seconds']:.0f} s")
    if summary.get("reopen"):
        print("\nLook again later:")
        for line in reopen_commands(summary["reopen"]):
            print(line)


def format_scores(report: dict, prefix: str = "") -> list[str]:
    """Numbers of the evaluation report, one per line (nested suites flattened, lists and paths left out)."""
    out = []
    for k, v in report.items():
        if isinstance(v, dict) and k not in ("config", "manifest", "files", "images"):
            out += format_scores(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"score        {prefix}{k} = {v:.4f}" if isinstance(v, float) else
                       f"score        {prefix}{k} = {v}")
    return out


def image_grids(report: dict, folder: str | None) -> list[str]:
    found = []

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, str) and v.endswith((".png", ".jpg")) and "grid" in (k + v).lower():
                found.append(v)
    walk(report)
    if not found and folder:
        found = [str(p) for p in sorted(Path(folder).rglob("*grid*.png"))]
    return found


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    # Ctrl-C and SIGTERM both unwind through run_demo's `finally`, which stops what it started
    # (a shell's background job starts with SIGINT ignored: take it back).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local", help="profile (default %(default)s; flows/profiles.py)")
    ap.add_argument("--overrides", default=None, help="JSON of profile fields to change")
    ap.add_argument("--run-name", default=None, help="run folder under runs/ (default: the profile name)")
    ap.add_argument("--deployment", default="micro-budget/full", help="deployment to run (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the flow run")
    a = ap.parse_args(argv)
    from .profiles import get_profile, parse_overrides
    overrides = parse_overrides(a.overrides)
    get_profile(a.profile, overrides)          # a wrong profile or override fails here, before any server starts
    summary = run_demo(a.profile, overrides, a.run_name, a.deployment, a.timeout)
    if "cost_table" in summary:
        print_result(summary)
    else:
        print(f"[demo] {summary['deployment']}: {summary['state']} in {summary['demo_wall_seconds']:.0f} s")
        for line in reopen_commands(summary["reopen"]):
            print(line)
    return 0


if __name__ == "__main__":
    run_cli(main)
