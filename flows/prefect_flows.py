"""Prefect flows: download -> precompute -> four training stages -> evaluation, costed in the ledger.

    prefect deployment run micro-budget/full                      # through a work pool (prefect.yaml)
    python -m flows.prefect_flows --profile local                      # the same flow in this process
    python -m flows.prefect_flows --profile local --flow train --budget-usd 0.0005

Flows only orchestrate: every step is a plain function in flows/steps.py that calls dataprep/microdit.
Finished assets (a folder with manifest.json, named by the hash of its config) are skipped, so a re-run
after a crash skips what is done and training resumes from its last checkpoint. After each step the flow,
the ledger's only writer, records the step's manifests (flows/ledger.py, idempotent).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from microdit.cli import run_cli
from microdit.manifest import read_manifest
from microdit.redact import install_log_redaction

from . import ledger, progress, steps
from .prices import load_prices
from .profiles import DataSource, Profile, check_budget, get_profile, parse_overrides

# Skipping is decided by the assets themselves (manifest.json in a config-hashed folder), not by
# Prefect's result cache: it survives a lost Prefect database and never returns a folder that was deleted.
TASK = dict(cache_policy=NO_CACHE)


def _setup(profile: str, overrides: dict | None, run_name: str | None, root: str,
           budget_usd: float | None = None) -> tuple[Profile, Path, str]:
    install_log_redaction()                      # flow-run logs reach the Prefect server: no signed URLs in them
    check_budget(budget_usd)
    p = get_profile(profile, overrides)
    steps.check_resolutions(p)
    run_name = run_name or p.name
    run = steps.run_root(root, run_name, p)
    os.environ.setdefault("RAY_TMPDIR", str(run / "tmp" / "ray"))   # Ray's sockets and logs stay in the run
    return p, run, run_name


def _db(root: str, ledger_db: str | None) -> Path:
    return Path(ledger_db) if ledger_db else Path(root).resolve() / "ledger.duckdb"


def _budget(budget_usd: float | None, run_id: str, root: str, ledger_db: str | None) -> steps.RunBudget | None:
    return None if budget_usd is None else steps.RunBudget(budget_usd, run_id, _db(root, ledger_db))


def _log():
    """The run logger inside a flow/task run; a plain logger when a task's .fn() is called directly."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("micro-budget")


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # called outside a flow run (task.fn() in tests)
        return None


# ----------------------------------------------------------------------------------------------------
# Tasks: thin wrappers over flows.steps, plus the ledger writer
# ----------------------------------------------------------------------------------------------------

@task(name="download", **TASK)
def download_task(p: Profile, source, run: Path, budget: steps.RunBudget | None = None) -> str:
    with progress.step_events(run, "download", dataset=source.dataset):
        folder, skipped = steps.download_step(p, source, run, budget)
    _log().info("%s %s", "skip (finished)" if skipped else "downloaded", folder)
    return str(folder)


@task(name="precompute", **TASK)
def precompute_task(p: Profile, raw: str, run: Path, budget: steps.RunBudget | None = None) -> str:
    with progress.step_events(run, "precompute"):
        folder, skipped = steps.precompute_step(p, Path(raw), run, budget)
    _log().info("%s %s", "skip (finished)" if skipped else "precomputed", folder)
    return str(folder)


@task(name="train-stage", **TASK)
def train_stage_task(cfg, guard: steps.BudgetGuard | None = None, launcher: str = "inprocess",
                     nproc: int = 1, run: Path | None = None, threads: int = 0) -> str:
    hook = StageProgressArtifact(cfg)
    if run is None:
        return str(steps.train_step(cfg, guard, launcher, nproc, on_step=hook, threads=threads))
    with progress.step_events(run, f"train:{cfg.name}", out_dir=cfg.out_dir, steps=cfg.steps,
                              batch_size=cfg.batch_size):
        out = str(steps.train_step(cfg, guard, launcher, nproc, on_step=hook, threads=threads))
    if steps.stage_complete(cfg):
        hook(cfg.steps, {"loss": (read_manifest(out).metrics.get("final_loss") or float("nan"))})
    return out


class StageProgressArtifact:
    """A Prefect progress artifact per stage (key progress-<stage>), updated from the trainer's step hook."""

    def __init__(self, cfg, every_seconds: float = 5.0):
        self.cfg, self.every, self.last, self.id = cfg, every_seconds, 0.0, None

    def __call__(self, step: int, state: dict) -> None:
        now = time.monotonic()
        if self.id is not None and now - self.last < self.every and step < self.cfg.steps:
            return
        self.last = now
        text = f"{self.cfg.name}: step {step}/{self.cfg.steps}, loss {state.get('loss', float('nan')):.4f}"
        pct = min(100.0, 100.0 * step / max(1, self.cfg.steps))
        try:
            if self.id is None:
                self.id = create_progress_artifact(pct, key=f"progress-{self.cfg.name}", description=text)
            else:
                update_progress_artifact(self.id, pct, description=text)
        except Exception as e:  # progress display must never stop training
            _log().warning("progress artifact not updated: %s", e)
            self.id, self.every = self.id or "off", float("inf")


@task(name="evaluate", **TASK)
def evaluate_task(p: Profile, checkpoint: str, run: Path, reference: str | None = None) -> tuple[str, dict]:
    with progress.step_events(run, "evaluate", suites=list(p.eval_suites)):
        folder, report, skipped = steps.evaluate_step(p, Path(checkpoint), run,
                                                      Path(reference) if reference else None)
    _log().info("%s %s", "skip (finished)" if skipped else "evaluated", folder)
    return str(folder), report


@task(name="record-costs", retries=2, retry_delay_seconds=[2, 10], **TASK)
def record_task(folders: list[str], step: str, profile: str, run_id: str, db: Path) -> float:
    """Ingest the step's manifests into the ledger (one transaction; already-recorded assets are kept)."""
    got = ledger.ingest(folders, profile=profile, run_id=run_id, step=step, db=db, flow_run_id=_flow_run_id())
    new = [x for x in got if x.new]
    _log().info("ledger: %s +%d asset(s), $%.6f", step, len(new), sum(x.total_usd for x in new))
    return sum(x.total_usd for x in got)


# ----------------------------------------------------------------------------------------------------
# Flows (each separately deployable; `full` chains them)
# ----------------------------------------------------------------------------------------------------

@flow(name="micro-budget-data", log_prints=True)
def data_flow(profile: str = "local", overrides: dict | None = None, run_name: str | None = None,
              root: str = "runs", ledger_db: str | None = None, budget_usd: float | None = None) -> list[str]:
    """Download every training set of the profile (each file or URL retries with delays, inside the step).
    With `budget_usd`, a download that is not finished yet does not start once the run's spend reaches it."""
    p, run, run_id = _setup(profile, overrides, run_name, root, budget_usd)
    budget = _budget(budget_usd, run_id, root, ledger_db)
    out = []
    for src in p.datasets:
        raw = download_task(p, src, run, budget)    # retries happen per file inside (profile.download_retries)
        record_task([raw], "download", p.name, run_id, _db(root, ledger_db))
        out.append(raw)
    return out


@flow(name="micro-budget-precompute", log_prints=True)
def precompute_flow(profile: str = "local", raw: list[str] | None = None, overrides: dict | None = None,
                    run_name: str | None = None, root: str = "runs", ledger_db: str | None = None,
                    budget_usd: float | None = None) -> list[str]:
    """Latents of every raw set at the profile's resolutions (Ray; MDS shards); budget-guarded like data_flow."""
    p, run, run_id = _setup(profile, overrides, run_name, root, budget_usd)
    raw = raw or data_flow(profile, overrides, run_name, root, ledger_db, budget_usd)
    budget = _budget(budget_usd, run_id, root, ledger_db)
    out = []
    for r in raw:
        lat = precompute_task(p, r, run, budget)
        record_task([lat], "precompute", p.name, run_id, _db(root, ledger_db))
        out.append(lat)
    return out


@flow(name="micro-budget-train", log_prints=True)
def train_flow(profile: str = "local", latents: list[str] | None = None, overrides: dict | None = None,
               run_name: str | None = None, root: str = "runs", ledger_db: str | None = None,
               budget_usd: float | None = None) -> dict:
    """The four stages, each from the previous one's weights. `budget_usd` caps the run's total spend:
    the trainer's stop hook ends a stage cleanly (resumable checkpoint) once the projected spend would
    pass it, and no stage starts once the budget is spent. Re-run with a larger budget to continue."""
    p, run, run_id = _setup(profile, overrides, run_name, root, budget_usd)
    log, db = _log(), _db(root, ledger_db)
    latents = latents or precompute_flow(profile, None, overrides, run_name, root, ledger_db, budget_usd)
    rate = load_prices().usd_per_second(num_gpus=p.num_gpus, gpu_type=p.gpu_type, cpu_cores=p.cpu_cores)
    done, status = [], "complete"
    for cfg in steps.stage_configs(p, list(latents), run):       # folders or URLs
        if steps.stage_complete(cfg):
            log.info("skip %s (finished): %s", cfg.name, steps.final_folder(cfg))
            progress.record(run, f"train:{cfg.name}", "skip")
            ckpt = str(steps.final_folder(cfg))
        else:
            before = (ledger.spent_usd(run_id=run_id, db=db, exclude_lineage=cfg.out_dir)
                      if budget_usd is not None else 0.0)
            start, guard = steps.stage_budget(budget_usd, before, rate)
            if not start:
                status = f"budget ${budget_usd:g} reached before {cfg.name}"
                log.warning(status)
                break
            if guard is not None:
                log.info("%s: $%.6f spent of $%g; training stops before passing it", cfg.name, before, budget_usd)
            train = train_stage_task.with_options(name=f"train-{cfg.name}")
            ckpt = train(cfg, guard, p.launcher, p.train_processes or max(p.num_gpus, 1), run,
                         steps.cpu_threads(p))
            stage_artifact(cfg, ckpt)
        record_task([ckpt], f"train:{cfg.name}", p.name, run_id, db)
        done.append(ckpt)
        if not steps.stage_complete(cfg):
            why = f"by the budget (${budget_usd:g})" if budget_usd is not None else "early (wall-clock limit)"
            status = f"stopped in {cfg.name} {why}; resumable checkpoint {ckpt}"
            log.warning(status)
            break
    return {"checkpoints": done, "status": status}


@flow(name="micro-budget-evaluate", log_prints=True)
def evaluate_flow(checkpoint: str, profile: str = "local", overrides: dict | None = None,
                  run_name: str | None = None, root: str = "runs", ledger_db: str | None = None) -> dict:
    """Evaluate a checkpoint with the profile's suites (report.json + manifest.json + image grids)."""
    p, run, run_id = _setup(profile, overrides, run_name, root)
    reference = None
    if p.eval_dataset:                                       # the FID reference set (COCO 2014 val)
        reference = download_task(p, DataSource(p.eval_dataset), run)
        record_task([reference], "download", p.name, run_id, _db(root, ledger_db))
    folder, report = evaluate_task(p, checkpoint, run, reference)
    record_task([folder], "evaluate", p.name, run_id, _db(root, ledger_db))
    return {"folder": folder, "report": report}


@flow(name="micro-budget", log_prints=True)
def full_flow(profile: str = "local", overrides: dict | None = None, run_name: str | None = None,
              root: str = "runs", ledger_db: str | None = None, budget_usd: float | None = None) -> dict:
    """download -> precompute -> four training stages -> evaluation -> cost report (runs/<run>/summary.json)."""
    p, run, run_id = _setup(profile, overrides, run_name, root, budget_usd)
    db = _db(root, ledger_db)
    raw = data_flow(profile, overrides, run_name, root, ledger_db, budget_usd)
    latents = precompute_flow(profile, raw, overrides, run_name, root, ledger_db, budget_usd)
    trained = train_flow(profile, latents, overrides, run_name, root, ledger_db, budget_usd)
    evaluation = None
    if trained["status"] == "complete":
        evaluation = evaluate_flow(trained["checkpoints"][-1], profile, overrides, run_name, root, ledger_db)
    rep = ledger.report(run_id=run_id, profile=p.name, db=db)
    summary = {"run": run_id, "profile": p.name, "run_dir": str(run), "ledger": str(db), "raw": raw,
               "latents": latents, "training": trained, "evaluation": evaluation, "costs": rep.to_dict(),
               "cost_table": ledger.format_report(rep, f"cost ledger {db} run={run_id}")}
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    run_artifacts(rep, evaluation)
    print(summary["cost_table"])
    return summary


# ----------------------------------------------------------------------------------------------------
# Artifacts: what the Prefect UI shows for a run (per stage, the scores, the cost table)
# ----------------------------------------------------------------------------------------------------

def stage_artifact(cfg, ckpt: str) -> None:
    """Markdown artifact `stage-<name>`: the stage's figures and its sample grid."""
    m = read_manifest(ckpt)
    if m is None:
        return
    mt = m.metrics
    grid = Path(cfg.out_dir) / "samples" / "final.png"
    md = (f"### {cfg.name}: {mt.get('steps')} steps at {cfg.resolution} px, mask {cfg.mask_ratio}\n\n"
          f"| wall s | samples/s | train loss (last 20) | val loss start | val loss end |\n|---|---|---|---|---|\n"
          f"| {m.wall_seconds:.0f} | {mt.get('samples_per_s') or 0:.0f} | {_num(mt.get('final_loss'))} | "
          f"{_num(mt.get('val_loss_start'))} | {_num(mt.get('val_loss_end'))} |\n\n"
          f"Checkpoint: `{ckpt}`" + (f"\n\nSample grid: [{grid}](file://{grid})" if grid.exists() else ""))
    create_markdown_artifact(md, key=f"stage-{cfg.name}", description=f"training {cfg.name}")


def run_artifacts(rep, evaluation: dict | None) -> None:
    """Table artifact `cost-table` (the ledger's rows and total) and markdown artifact `scores`."""
    rows = [{k: r.get(k) for k in ("step", "assets", "samples", "wall_s", "gpu_hours", "total_usd")} for r in rep.rows]
    rows.append({"step": "total", "assets": rep.total.get("assets"), "samples": None,
                 "wall_s": rep.total.get("wall_s"), "gpu_hours": rep.total.get("gpu_hours"),
                 "total_usd": rep.total.get("total_usd")})
    create_table_artifact(rows, key="cost-table", description="cost of every asset of the run, by step (DuckDB ledger)")
    if not evaluation:
        return
    folder = Path(evaluation["folder"])
    lines = ["### Evaluation", "", "| suite | score | value |", "|---|---|---|"]
    for suite, res in (evaluation["report"].get("suites") or {}).items():
        for k, v in res.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {suite} | {k} | {_num(v)} |")
            elif isinstance(v, dict) and k == "tasks":
                lines += [f"| {suite} | {t} | {_num(x)} |" for t, x in v.items() if isinstance(x, (int, float))]
    grids = sorted(folder.rglob("*grid*.png"))
    lines += ["", *(f"- [{g.name}](file://{g})" for g in grids)]
    create_markdown_artifact("\n".join(lines), key="scores", description=f"evaluation report {folder}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


FLOWS = {"full": full_flow, "data": data_flow, "precompute": precompute_flow, "train": train_flow}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.prefect_flows", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", choices=sorted(FLOWS), default="full", help="which flow (default %(default)s)")
    ap.add_argument("--profile", default="local", help="local | subset | paper (flows/profiles.py)")
    ap.add_argument("--overrides", default=None, help='JSON of profile fields, e.g. \'{"steps_scale": 0.1}\'')
    ap.add_argument("--run-name", default=None, help="output folder under --root (default: the profile name)")
    ap.add_argument("--root", default="runs", help="where runs and the ledger live (default %(default)s)")
    ap.add_argument("--budget-usd", type=float, default=None,
                    help="no step starts, and training stops, before the run spends more")
    a = ap.parse_args(argv)
    overrides = parse_overrides(a.overrides)
    get_profile(a.profile, overrides)        # a wrong profile or override fails here, before Prefect starts
    check_budget(a.budget_usd)
    FLOWS[a.flow](profile=a.profile, overrides=overrides, run_name=a.run_name, root=a.root, budget_usd=a.budget_usd)


if __name__ == "__main__":
    run_cli(main)
