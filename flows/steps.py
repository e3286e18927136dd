"""The pipeline's steps as plain functions (no Prefect): a profile in, finished asset folders out.

Flows (flows/prefect_flows.py) wrap these in tasks. Each step writes into a folder named by the hash of
its own config and of its inputs' folders (`runs/<run>/<step>/<name>-<hash>`), so a folder whose
manifest.json exists is a finished asset made with exactly this config: re-running skips it, and a
changed input or setting makes a new folder instead of silently reusing an old one.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from microdit.cli import UserError
from microdit.manifest import config_hash, read_manifest, write_json_atomic

from .profiles import DataSource, Profile

log = logging.getLogger("micro-budget")


def asset_folder(base: Path, name: str, config: dict) -> Path:
    return Path(base) / f"{name}-{config_hash(config)[:10]}"


def finished(folder) -> bool:
    return read_manifest(folder) is not None


def run_root(root: str | os.PathLike, run_name: str, profile: Profile) -> Path:
    """runs/<run_name>/ with the resolved profile saved beside the outputs."""
    out = Path(root).resolve() / run_name
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "profile.json", profile.to_dict())
    return out


class BudgetSpent(UserError):
    """The run has spent its budget: a step that has not started yet does not start."""


class RunBudget:
    """The run's budget for steps before training (download, precompute): checked before a step starts."""

    def __init__(self, usd: float, run_id: str, db: Path):
        self.usd, self.run_id, self.db = usd, run_id, Path(db)

    def check(self, what: str) -> None:
        from . import ledger
        spent = ledger.spent_usd(run_id=self.run_id, db=self.db)
        if spent >= self.usd:
            raise BudgetSpent(f"budget ${self.usd:g} of run {self.run_id} is spent (${spent:.6f} recorded) before "
                              f"{what}: nothing was started; rerun with a larger budget to continue")


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def download_step(profile: Profile, source: DataSource, run: Path,
                  budget: RunBudget | None = None) -> tuple[Path, bool]:
    """One raw set (dataprep.download). Returns (folder, skipped)."""
    from dataprep.download import download
    cfg = {"dataset": source.dataset, "samples": source.samples, "fraction": source.fraction,
           "output_format": profile.download_format, "min_image_size": profile.min_image_size}
    out = asset_folder(run / "raw", source.dataset, cfg)
    if finished(out):
        return out, True
    if budget is not None:
        budget.check(f"downloading {source.dataset}")
    return Path(download(source.dataset, out, samples=source.samples, fraction=source.fraction,
                         output_format=profile.download_format, processes=profile.download_processes,
                         threads=profile.download_threads, min_image_size=profile.min_image_size,
                         retries=profile.download_retries, retry_delay=profile.retry_delay,
                         concurrency=profile.download_concurrency)), False


def precompute_config(profile: Profile, raw: Path, run: Path):
    """The latent set's PrecomputeConfig and where it goes: runs/<run>/latents/<name>-<hash>, or
    <profile.latents_url>/<run>/<name>-<hash> in object storage (staged under runs/<run>/staging)."""
    from dataprep.precompute import PrecomputeConfig
    fields = {"resolutions": tuple(profile.resolutions), "image_autoencoder": profile.image_autoencoder,
              "text_encoder": profile.text_encoder, "batch_size": profile.precompute_batch_size,
              "workers": profile.precompute_workers, "min_workers": profile.precompute_min_workers,
              "gpus_per_worker": profile.precompute_gpus_per_worker,
              "resources": dict(profile.precompute_resources), "threads": profile.precompute_threads,
              "unit_samples": profile.precompute_unit_samples,
              "address": profile.ray_address, "num_cpus": profile.ray_num_cpus,
              "min_size": profile.min_image_size, "short_side": profile.short_side}
    cfg = PrecomputeConfig(input=str(raw), out="", **fields)
    # the set is named by what determines the latents (not by workers, threads or batch size)
    local = asset_folder(run / "latents", raw.name.rsplit("-", 1)[0], cfg.identity())
    if profile.latents_url:
        cfg.out = f"{profile.latents_url.rstrip('/')}/{run.name}/{local.name}"
        cfg.staging = str(run / "staging" / local.name)
        return cfg, cfg.out
    cfg.out = str(local)
    return cfg, local


def precompute_step(profile: Profile, raw: Path, run: Path, budget: RunBudget | None = None
                    ) -> tuple[Path | str, bool]:
    """One latent set (dataprep.precompute, Ray in local mode unless the profile names a cluster);
    a folder, or a URL when the profile keeps latents in object storage."""
    from dataprep.precompute import precompute
    cfg, out = precompute_config(profile, raw, run)
    if finished(out):
        return out, True
    if budget is not None:
        budget.check(f"precomputing {raw.name}")
    return precompute(cfg), False


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def stage_configs(profile: Profile, latents: list, run: Path) -> list:
    """The profile's four stages on `latents`; out_dir = runs/<run>/train/<stage>-<hash>; chained by init_from."""
    from microdit.training.config import STAGES
    stages, prev = [], ""
    recipe = STAGES[profile.recipe]
    for i in profile.stages:
        if not 1 <= i <= len(recipe):
            raise ValueError(f"profile.stages has {i}: stages are numbered 1-{len(recipe)}")
    for s in [recipe[i - 1] for i in profile.stages] if profile.stages else recipe:
        steps = max(1, round(s.steps * profile.steps_scale))
        cfg = s.replace(data=[str(p) for p in latents], steps=steps, init_from=prev,
                        num_canonical_nodes=profile.num_canonical_nodes, loader_workers=profile.loader_workers,
                        cache_limit=profile.cache_limit, **profile.train_overrides)
        key = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "progress")}
        cfg = cfg.replace(out_dir=str(asset_folder(run / "train", s.name, key)))
        stages.append(cfg)
        prev = str(final_folder(cfg))
    return stages


def final_folder(cfg) -> Path:
    """Where a stage's final checkpoint (model.safetensors + config.json + manifest.json) lands."""
    return Path(cfg.out_dir) / "final"


def stage_complete(cfg) -> bool:
    """A stage is done when its final checkpoint exists (an early stop leaves a resumable checkpoint instead)."""
    return finished(final_folder(cfg))


class BudgetGuard:
    """`should_stop(step, state)` for the trainer: True once the projected spend would pass the budget.

    projected = dollars already recorded for the run (other assets) + this stage's running wall time
    (accumulated over its resumes) plus one more step, times the profile's $ per second.
    """

    def __init__(self, budget_usd: float, spent_before: float, usd_per_second: float):
        self.budget_usd, self.spent_before, self.rate = budget_usd, spent_before, usd_per_second
        self.stopped_at: int | None = None

    def projected(self, step: int, wall_seconds: float) -> float:
        per_step = wall_seconds / max(step, 1)
        return self.spent_before + (wall_seconds + per_step) * self.rate

    def __call__(self, step: int, state: dict) -> bool:
        stop = self.projected(state.get("step", step), state["wall_seconds"]) > self.budget_usd
        if stop:
            self.stopped_at = step
        return stop


def stage_budget(budget_usd: float | None, spent_before: float, usd_per_second: float
                 ) -> tuple[bool, BudgetGuard | None]:
    """The budget decision before a stage: (may it start, the stop hook that ends it before the budget
    passes). No budget: start, no hook. Nothing left (spent_before >= budget_usd): do not start."""
    if budget_usd is None:
        return True, None
    if spent_before >= budget_usd:
        return False, None
    return True, BudgetGuard(budget_usd, spent_before, usd_per_second)


def check_resolutions(profile: Profile) -> None:
    """Every stage the profile trains must find its resolution among the latents it precomputes: checked
    before any work starts (ValueError naming both), not discovered after precompute."""
    from microdit.training.config import STAGES
    recipe = STAGES[profile.recipe]
    chosen = [recipe[i - 1] for i in profile.stages if 1 <= i <= len(recipe)] if profile.stages else recipe
    for s in chosen:
        res = profile.train_overrides.get("resolution", s.resolution)
        if res not in profile.resolutions:
            raise ValueError(f"profile {profile.name!r} precomputes resolutions {tuple(profile.resolutions)} but "
                             f"recipe {profile.recipe!r} trains {s.name} at {res} px: add {res} to the profile's "
                             "resolutions (flows/profiles.py) or train that stage at a precomputed one")


@contextmanager
def torch_threads(n: int):
    """Run this thread's torch work on `n` CPU threads (0: leave as is), restoring the count afterwards.

    The worker starts with OMP_NUM_THREADS=1 so that the Prefect server, the worker and Ray's encoder actors
    do not oversubscribe the cores; in-process training and evaluation then take the cores the profile pays
    for (`Profile.cpu_cores`): on 2 cores a 32 px CPU training step runs 1.8x faster on 2 threads than on 1.
    """
    if n <= 0:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(profile: Profile) -> int:
    """torch threads for in-process CPU work: the profile's cores on a CPU run, else leave torch's choice."""
    return profile.cpu_cores if profile.num_gpus == 0 else 0


class StepHooks:
    """The trainer's should_stop(step, state): calls `on_step` (display), then asks `guard` (budget)."""

    def __init__(self, on_step=None, guard=None):
        self.on_step, self.guard = on_step, guard

    def __call__(self, step: int, state: dict) -> bool:
        if self.on_step is not None:
            self.on_step(step, state)
        return bool(self.guard(step, state)) if self.guard is not None else False


def train_step(cfg, guard: BudgetGuard | None = None, launcher: str = "inprocess", nproc: int = 1,
               on_step=None, threads: int = 0) -> Path:
    """Train (or resume) one stage; returns its final folder, or the checkpoint written when it stopped early.

    on_step(step, state), if given, is called after every optimizer step of an in-process run (progress display).
    threads: torch CPU threads of an in-process run (0 = as the process has them).

    launcher "inprocess": microdit.training.loop.train in this process, the guard as its stop hook (CPU, one GPU).
    launcher "torchrun": infra/torchrun.sh on this node's `nproc` GPUs; the guard becomes the stage's
    wall-clock limit (the trainer counts wall time over resumes, so the limit is the stage's total).
    """
    if launcher == "inprocess":
        from microdit.training.loop import train
        with torch_threads(threads):
            return Path(train(cfg, should_stop=StepHooks(on_step, guard)))
    if launcher != "torchrun":
        raise ValueError(f"unknown launcher {launcher!r}: use 'inprocess' or 'torchrun'")
    if guard is not None:
        cfg = cfg.replace(max_wall_seconds=max(1.0, (guard.budget_usd - guard.spent_before) / guard.rate))
    out = Path(cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = write_json_atomic(out.parent / f"{out.name}.json", cfg.to_dict())
    script = Path(__file__).resolve().parent.parent / "infra" / "torchrun.sh"
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PY": sys.executable}
    subprocess.run(["bash", str(script), "--config", str(cfg_file)], check=True, env=env)
    if finished(final_folder(cfg)):
        return final_folder(cfg)
    from microdit.training.state import latest_checkpoint
    last = latest_checkpoint(out)
    if last is None:
        raise RuntimeError(f"torchrun finished but {out} holds neither final/ nor a checkpoint")
    return last


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def evaluate_step(profile: Profile, checkpoint: Path, run: Path, reference: Path | None = None
                  ) -> tuple[Path, dict, bool]:
    """Evaluate the final model; returns (folder with report.json + manifest.json, report, skipped).

    reference: the downloaded eval set (profile.eval_dataset), passed to the FID suite as coco_root.
    """
    kwargs = dict(profile.eval_kwargs)
    if reference is not None:
        kwargs["coco_root"] = str(reference)
    cfg = {"checkpoint": str(checkpoint), "suites": list(profile.eval_suites), **kwargs}
    out = asset_folder(run / "eval", "eval", cfg)
    if finished(out):
        return out, json.loads((out / "report.json").read_text()), True
    from microdit.evaluate import evaluate
    with torch_threads(cpu_threads(profile)):
        report = evaluate(str(checkpoint), suites=list(profile.eval_suites), out_dir=str(out), **kwargs)
    return out, report, False
