r"""Train MicroDiT: the paper's four-stage masked recipe, or the same four stages scaled down for a CPU.

    # the whole CPU recipe (MicroDiT_Nano_2, 16 px then 32 px, a few minutes on 2 cores):
    python -m microdit.training --recipe cpu --data data/shapes-latents --val-data data/shapes-val --out runs/cpu
    # the paper's recipe on one 8-GPU node (FSDP2, bf16):
    torchrun --standalone --nproc_per_node=8 -m microdit.training --recipe paper --data /data/sa1b /data/cc12m \
        --proportions 0.5 0.5 --out runs/paper
    # one stage from a JSON TrainConfig, with overrides:
    python -m microdit.training --config stage.json --set steps=500 lr=1e-3

Run the same command again after a crash or a kill: finished stages are skipped and the running one
resumes from its last checkpoint (on CPU every later step's loss equals the uninterrupted run's).
Each stage starts from the previous stage's final weights, positions re-made for its resolution.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..manifest import read_manifest
from .config import STAGES, TrainConfig, stage_configs
from .loop import TrainingDiverged, train
from .state import check_saved_config

__all__ = ["TrainConfig", "STAGES", "train", "run_stages", "stage_summary", "ray_train", "TrainingDiverged"]


# --------------------------------------------------------------------------------------------
#                                       Several stages
# --------------------------------------------------------------------------------------------

def check_stage_data(stages: list[TrainConfig]) -> None:
    """Every stage's latent sets (and validation set) hold its resolution: checked before stage 1 trains,
    so a missing 32 px column is an error now, not after the 16 px stages. UserError names what to change."""
    from ..cli import UserError
    from ..data import open_latent_sets
    from ..schema import LatentSchema
    for cfg in stages:
        for folder in [*cfg.data, *([cfg.val_data] if cfg.val_data else [])]:
            have = [int(r) for r in LatentSchema.read(folder).resolutions]
            if int(cfg.resolution) not in have:
                low = [s.name for s in stages if int(s.resolution) in have]
                raise UserError(
                    f"{cfg.name} trains at {cfg.resolution} px but {folder} has latents for {have} px only: "
                    f"precompute it with --resolutions {' '.join(str(r) for r in sorted({*have, cfg.resolution}))}"
                    + (f", or train only {' '.join(low)} (--stages)" if low else "")
                    + ", or use --recipe quick (one 16 px stage)")
        open_latent_sets(cfg.data, cfg.resolution)            # shards agree with their schema.json


def run_stages(stages: list[TrainConfig], should_stop=None) -> list[Path]:
    """Train the stages in order, each from the previous one's final weights; returns the final folders.

    Every stage's data is checked first (check_stage_data). A stage stopped early (should_stop /
    max_wall_seconds) ends the run: later stages need its weights.
    """
    check_stage_data(stages)
    finals: list[Path] = []
    for i, cfg in enumerate(stages):
        if i > 0 and not cfg.init_from:
            cfg = cfg.replace(init_from=str(finals[-1]))
        result = train(cfg, should_stop=should_stop)
        finals.append(result)
        if result.name != "final":
            break
    return finals


def absolute_paths(cfg_dict: dict) -> dict:
    """The config with its folders made absolute against this process's working directory: Ray Train
    workers run elsewhere (in Ray's session folder), where a relative path means something else."""
    d = dict(cfg_dict)
    for key in ("out_dir", "val_data", "init_from"):
        if d.get(key):
            d[key] = os.path.abspath(d[key])
    d["data"] = [os.path.abspath(f) for f in d.get("data", [])]
    return d


def ray_train(cfg_dict: dict, num_workers: int, use_gpu: bool, storage_path: str | None = None):
    """Run `train` on `num_workers` Ray Train workers (one per GPU) of a running Ray cluster (joined
    with `microdit.ray_cluster.ray_session`); Ray Train starts the torch process group itself.
    Relative folders in the config mean this process's working directory."""
    cfg_dict = absolute_paths(cfg_dict)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):              # runs in each worker process
        import ray.train

        from microdit.training.config import TrainConfig
        from microdit.training.loop import train
        os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))
        train(TrainConfig.from_dict(config))

    trainer = TorchTrainer(loop, train_loop_config=cfg_dict,
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
                           run_config=RunConfig(storage_path=storage_path, name=cfg_dict.get("name", "microdit")))
    return trainer.fit()


def stage_summary(finals: list[Path]) -> list[dict]:
    rows = []
    for f in finals:
        m = read_manifest(f)
        if m is None:
            continue
        rows.append({"stage": m.name, "steps": m.metrics.get("steps"), "wall_s": round(m.wall_seconds, 1),
                     "samples_per_s": round(m.metrics.get("samples_per_s") or 0, 1),
                     "val_loss_start": m.metrics.get("val_loss_start"), "val_loss_end": m.metrics.get("val_loss_end"),
                     "final_loss": m.metrics.get("final_loss")})
    return rows


# --------------------------------------------------------------------------------------------
#                                            CLI
# --------------------------------------------------------------------------------------------

def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m microdit.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(STAGES),
                   help="paper or cpu (four stages, 16/32 px on CPU), or quick (one unmasked 16 px stage, "
                        "for a small set of your own: docs/your-data.md)")
    p.add_argument("--stages", type=int, nargs="+", help="which stages of the recipe (1-4; default all)")
    p.add_argument("--config", help="one stage from a TrainConfig JSON file (instead of --recipe)")
    p.add_argument("--data", nargs="+", help="latent set folders (MDS shards + schema.json)")
    p.add_argument("--proportions", type=float, nargs="+", help="mixing proportion per latent set")
    p.add_argument("--val-data", default="", help="held-out latent set: validation loss and sample captions")
    p.add_argument("--out", help="run folder (recipe: one subfolder per stage)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override TrainConfig fields in every stage (JSON values), e.g. steps=100 lr=1e-3")
    p.add_argument("--ray-workers", type=int, default=0, help="run each stage on this many Ray Train workers")
    p.add_argument("--ray-gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = OMP_NUM_THREADS or torch default)")
    a = p.parse_args(argv)
    threads = a.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    overrides = {}
    for item in a.set:
        if "=" not in item:
            p.error(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = _parse_value(v)
    if a.data:
        overrides["data"] = a.data
    if a.proportions:
        overrides["data_proportions"] = a.proportions
    if a.val_data:
        overrides["val_data"] = a.val_data
    if a.config:
        stages = [TrainConfig.load(a.config).replace(**overrides, **({"out_dir": a.out} if a.out else {}))]
    elif a.recipe:
        if not a.data or not a.out:
            p.error("--recipe needs --data and --out")
        data = overrides.pop("data")
        val = overrides.pop("val_data", "")
        stages = stage_configs(a.recipe, data, a.out, val, **overrides)
        if a.stages:
            if not all(1 <= i <= len(stages) for i in a.stages):
                p.error(f"--stages {' '.join(map(str, a.stages))}: recipe {a.recipe} has stages 1-{len(stages)}")
            first = min(a.stages)
            stages = [stages[i - 1] for i in sorted(a.stages)]
            if first > 1 and not stages[0].init_from:
                prev = Path(a.out) / STAGES[a.recipe][first - 2].name / "final"
                if read_manifest(prev) is None:
                    p.error(f"stage {first} starts from stage {first - 1}'s weights, but {prev} is not finished: "
                            f"run stage {first - 1} first (or pass --set init_from=FOLDER)")
                stages[0] = stages[0].replace(init_from=str(prev))
    else:
        p.error("give --recipe or --config")
    for i in range(1, len(stages)):            # each stage from the previous one's final weights
        if not stages[i].init_from:
            stages[i] = stages[i].replace(init_from=str(Path(stages[i - 1].out_dir) / "final"))
    for cfg in stages:                         # every stage's config is checked before the first one trains
        cfg.validate()
        check_saved_config(cfg)
    check_stage_data(stages)
    if a.ray_workers:
        from ..ray_cluster import ray_session
        with ray_session(address=os.environ.get("RAY_ADDRESS", "auto")):    # token auth: docs/security.md
            prev = ""
            for cfg in stages:
                cfg = cfg.replace(init_from=cfg.init_from or prev)
                ray_train(cfg.to_dict(), a.ray_workers, a.ray_gpu)
                prev = str(Path(cfg.out_dir) / "final")
        return
    finals = run_stages(stages)
    if int(os.environ.get("RANK", "0")) == 0:
        for row in stage_summary(finals):
            print(json.dumps(row))
