"""Profiles: one table of how big a pipeline run is (`local`, `subset`, `paper`), used by every flow.

    python -m flows.profiles                 # print the table
    python -m flows.profiles local           # one profile as JSON
    python -m flows.profiles local --overrides '{"steps_scale": 0.1}'   # with changes

A flow takes `profile="local"` plus optional `overrides={"field": value}` (e.g. fewer samples in tests);
the resolved profile is saved beside the run's outputs (runs/<run>/profile.json).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace

from microdit.configs import check_fields

from microdit.cli import UserError, run_cli


@dataclass(frozen=True)
class DataSource:
    dataset: str                       # dataprep.specs.SPECS key
    samples: int | None = None         # take this many samples (None = `fraction` or all)
    fraction: float | None = None      # or this fraction of the set


@dataclass(frozen=True)
class Profile:
    name: str                                  # local | subset | paper | rehearsal
    description: str                           # one line for --help and the docs
    # ---- data ----
    datasets: tuple = ()                       # DataSource per training set
    image_autoencoder: str = "pixel:2"         # microdit.encoders.load_image_autoencoder name
    text_encoder: str = "tiny-clip:16"         # microdit.encoders.load_text_encoder name
    resolutions: tuple = (16, 32)              # image sizes whose latents are precomputed (low, high)
    min_image_size: int = 256                  # images with a shorter short side are dropped (the paper: 256): by
                                               # img2dataset as they arrive for URL sets (never resized or written),
                                               # by convert for archive sets
    download_format: str = "parquet"           # img2dataset layout: parquet | webdataset (one shard = one convert
                                               # unit); files only for small local sets (units of 1000 files)
    download_processes: int = 8                # img2dataset processes: about one per core of the download node
                                               # (the cluster head, m6i.2xlarge: 8 vCPUs, infra/ray/cluster.yaml)
    download_threads: int = 64                 # img2dataset threads per process: downloads wait on the network
    short_side: int = 512                      # larger ones are resized to this short side first (the paper: 512)
    precompute_batch_size: int = 32            # images per encoder call
    precompute_workers: int | None = None      # encoder actors at most (None = one per GPU, else one per CPU)
    precompute_min_workers: int = 1            # actors the autoscaling pool keeps when work runs out
    precompute_gpus_per_worker: float | None = None  # GPUs each actor asks Ray for (None = 1 on a GPU machine, else 0)
    precompute_resources: dict = field(default_factory=dict)  # custom Ray resources per actor ({"latent_encoder": 1})
    precompute_threads: int | None = None      # torch threads per CPU actor (None = CPUs // workers)
    precompute_unit_samples: int | None = None  # samples per restartable work unit (None = precompute's rule)
    ray_address: str | None = None             # None = Ray started locally by the step; "auto" = a cluster
    ray_num_cpus: int | None = None            # local Ray only: CPUs it may use (None = all)
    latents_url: str | None = None             # object storage for latent sets (s3://bucket/prefix; None = run folder)
    cache_limit: str = ""                      # training's local cache of latents read from a URL ("" = unbounded)
    num_canonical_nodes: int = 1               # the shuffle's node count: fixed across resumes and cluster sizes
    loader_workers: int = 0                    # DataLoader worker processes per training rank
    # ---- training ----
    recipe: str = "cpu"                        # microdit.training STAGES key: "cpu" or "paper"
    steps_scale: float = 1.0                   # every stage's steps x this (subset: a short run of each)
    stages: tuple = ()                         # which stages to run, 1-based (empty = all four, in order)
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields applied to every stage
    launcher: str = "inprocess"                # "inprocess" (the flow's process) or "torchrun" (infra/torchrun.sh)
    train_processes: int = 0                   # torchrun processes on the node (0 = num_gpus, at least 1)
    num_gpus: int = 0                          # GPUs training uses (0 = CPU); prices the budget guard
    gpu_type: str = ""                         # infra/prices.toml [gpu] key, e.g. "H100-80GB"
    cpu_cores: int = 2                         # cores a CPU run uses: prices CPU-only training; torch threads of
                                               # in-process training and evaluation on a CPU run
    # ---- evaluation ----
    eval_suites: tuple = ("shapes",)           # microdit.evaluate suites: shapes (GenEval-style + FD) | fid30k | geneval | clip
    eval_kwargs: dict = field(default_factory=dict)      # extra evaluate(...) arguments (EvalConfig fields)
    eval_dataset: str | None = None            # reference set downloaded for FID (its folder is passed as coco_root)
    # ---- robustness ----
    download_retries: int = 3                  # retries per file (archives, resumed with HTTP Range) or per URL
                                               # (img2dataset): the one retry layer; the flow's task does not retry
    retry_delay: float = 5.0                   # seconds before a file's first retry, doubling after
    download_concurrency: int = 4              # archives (SA-1B tars, ~11 GB each) downloaded at once

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "Profile":
        check_fields(Profile, changes, "profile")
        if "datasets" in changes:
            changes["datasets"] = tuple(d if isinstance(d, DataSource) else DataSource(**d)
                                        for d in changes["datasets"])
        for k in ("resolutions", "eval_suites", "stages"):
            if k in changes:
                changes[k] = tuple(changes[k])
        return replace(self, **changes)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile(
        name="local",
        description="embedded default: shapes over loopback img2dataset, offline encoders, CPU presets, minutes",
        datasets=(DataSource("shapes", samples=6000),),
        image_autoencoder="pixel:2", text_encoder="tiny-clip:16", resolutions=(16, 32),
        min_image_size=32, short_side=64, download_format="files", download_processes=1, download_threads=16,
        precompute_batch_size=256, precompute_workers=2,
        precompute_threads=1, ray_num_cpus=2,
        recipe="cpu", num_gpus=0, cpu_cores=2,
        # guidance 3: the CPU recipe's final model scored shapes 0.433 / 0.450 / 0.388 at guidance 2 / 3 / 4 (docs/training.md, P6)
        eval_suites=("shapes",), eval_kwargs={"steps": 20, "guidance": 3.0, "shapes_prompts_per_task": 10,
                                              "images_per_prompt": 4, "shapes_real_images": 500},
        download_retries=1, retry_delay=1.0),
    Profile(
        name="subset",
        description="a small fraction of the real sets, real encoders, one GPU node (8 GPUs), a short run of each stage",
        datasets=(DataSource("cc12m", samples=200_000), DataSource("diffusiondb", samples=100_000)),
        image_autoencoder="sdxl", text_encoder="openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
        resolutions=(256, 512), precompute_batch_size=64, precompute_workers=8, precompute_gpus_per_worker=1,
        loader_workers=4, recipe="paper", steps_scale=0.02, launcher="torchrun", num_gpus=8, gpu_type="H100-80GB", cpu_cores=0,
        eval_suites=("fid30k", "geneval", "clip"), eval_dataset="coco2014-val",
        eval_kwargs={"num_samples": 5000, "device": "cuda"}),
    Profile(
        name="paper",
        description="the full recipe: SA-1B + CC12M + JourneyDB + DiffusionDB, SDXL VAE + DFN5B, 8xH100, 2.6 days",
        datasets=(DataSource("sa1b"), DataSource("cc12m"), DataSource("journeydb"), DataSource("diffusiondb")),
        image_autoencoder="sdxl", text_encoder="openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378",
        resolutions=(256, 512), precompute_batch_size=64, ray_address="auto",
        # an autoscaling pool of up to 8 one-GPU encoder actors: pending actors make the autoscaler start
        # GPU nodes (infra/ray/cluster.yaml has min_workers 0); latents: docs/data.md, "Storage plan"
        precompute_workers=8, precompute_min_workers=1, precompute_gpus_per_worker=1, loader_workers=4,
        recipe="paper", steps_scale=1.0, launcher="torchrun", num_gpus=8, gpu_type="H100-80GB", cpu_cores=0,
        eval_suites=("fid30k", "geneval", "clip"), eval_dataset="coco2014-val",
        eval_kwargs={"num_samples": 30000, "device": "cuda"}),
    Profile(
        name="rehearsal",
        description="the paper's code path at toy size on one CPU machine: latents in S3 (loopback), a 2-node "
                    "Ray cluster with declared resources, torchrun x2 (FSDP2 over gloo), a resume",
        datasets=(DataSource("shapes", samples=600),),
        image_autoencoder="tiny-kl", text_encoder="tiny-clip:16", resolutions=(16, 32),
        min_image_size=32, short_side=64, precompute_batch_size=50,
        # `python -m flows.rehearsal` starts the S3 server and the cluster and fills in ray_address; the
        # encoder node declares latent_encoder=2, the head none: every actor must land on the encoder node
        precompute_workers=2, precompute_min_workers=1, precompute_threads=1, precompute_gpus_per_worker=0,
        precompute_resources={"latent_encoder": 1}, latents_url="s3://micro-budget-rehearsal/latents",
        precompute_unit_samples=50, cache_limit="1mb", loader_workers=1,
        recipe="cpu", steps_scale=0.02, stages=(1, 3), launcher="torchrun", train_processes=2,
        train_overrides={"strategy": "fsdp", "checkpoint_every": 5, "num_samples": 4, "sample_steps": 4},
        num_gpus=0, cpu_cores=2,
        eval_suites=("shapes",), eval_kwargs={"steps": 4, "guidance": 3.0, "shapes_prompts_per_task": 2,
                                              "images_per_prompt": 1, "shapes_real_images": 50},
        download_retries=1, retry_delay=1.0),
]}


def get_profile(name: str, overrides: dict | None = None) -> Profile:
    if name not in PROFILES:
        raise UserError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} (flows/profiles.py)")
    if overrides is not None and not isinstance(overrides, dict):
        raise UserError(f"overrides {overrides!r}: give a JSON object of profile fields, e.g. '{{\"steps_scale\": 0.1}}'")
    try:
        return PROFILES[name].replace(**(overrides or {}))
    except TypeError as e:                                   # e.g. a data set given as a list, not an object
        raise UserError(f"overrides {overrides}: {e}") from None


def parse_overrides(text: str | None) -> dict | None:
    """The --overrides JSON of a command line: a JSON object of profile fields (None when not given)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--overrides is not valid JSON ({e}): give an object like '{{\"steps_scale\": 0.1}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--overrides {text!r}: give a JSON object of profile fields, e.g. '{{\"steps_scale\": 0.1}}'")
    return value


def check_budget(budget_usd: float | None) -> None:
    if budget_usd is not None and not budget_usd >= 0:
        raise UserError(f"budget {budget_usd}: give a budget of 0 dollars or more (or none for no limit)")


def _table() -> str:
    rows = [f"{'profile':8} {'recipe':6} {'GPUs':>5}  {'encoders':34} description"]
    for p in PROFILES.values():
        rows.append(f"{p.name:8} {p.recipe:6} {p.num_gpus:>5}  {p.image_autoencoder + ' + ' + p.text_encoder[:20]:34}"
                    f" {p.description}")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.profiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", nargs="?", help=f"print this profile as JSON ({', '.join(PROFILES)}); "
                    "default: the table of all")
    ap.add_argument("--overrides", default=None, help="JSON of profile fields to change")
    a = ap.parse_args(argv)
    if a.profile is None:
        print(_table())
    else:
        print(json.dumps(get_profile(a.profile, parse_overrides(a.overrides)).to_dict(), indent=2))


if __name__ == "__main__":
    run_cli(main)
