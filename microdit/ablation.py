"""The masking ablation at CPU scale: no masking vs naive 75% masking vs deferred 75% masking.

    python -m microdit.ablation --data data/shapes-latents --val-data data/shapes-val --out runs/ablation

Trains MicroDiT_Nano_2 for the same number of steps on the shapes latents (16 px by default) three
times: (a) no masking, (b) naive masking (75% of patches dropped right after patchify: patch_mixer=False),
(c) deferred masking (75% dropped after the patch mixer), then prints wall time, held-out validation
loss at fixed noise levels (same sigmas, same noise) and the shapes evaluator's GenEval-style score.
With --finetune-steps N every variant then trains N more steps without masking (the recipe's stage 2,
which masked training needs before unmasked sampling) and is evaluated after it.
The paper's finding (Sehwag et al., Fig. 3): (c) is much better than (b) at about the same cost.
Finished variants are skipped on a rerun (their final/ folders are kept).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .cli import UserError, check_positive, run_cli

VARIANTS = {
    "a_no_mask": dict(mask_ratio=0.0, model_overrides={}),
    "b_naive_mask75": dict(mask_ratio=0.75, model_overrides={"patch_mixer": False}),
    "c_deferred_mask75": dict(mask_ratio=0.75, model_overrides={}),
}


def run_ablation(data, val_data: str, out, steps: int = 400, resolution: int = 16, batch_size: int = 64,
                 lr: float = 2e-3, seed: int = 0, n_per_task: int = 8, variants=tuple(VARIANTS),
                 progress: bool = True, sample_steps: int = 20, finetune_steps: int = 0) -> list[dict]:
    from .checkpoint import load_model
    from .data import LatentSet, open_latent_sets
    from .edm import EDMConfig
    from .manifest import Manifest
    from .training.loop import train
    from .training.config import CPU_STAGES
    from .training.validate import shapes_score, validation_loss
    schema = open_latent_sets(list(data), resolution)
    base = CPU_STAGES[0].replace(data=list(data), resolution=resolution, steps=steps, batch_size=batch_size, lr=lr,
                                 warmup_steps=min(50, steps // 10), seed=seed, num_samples=0, checkpoint_every=0,
                                 val_data="", progress=progress,
                                 P_mean=-0.6 if resolution <= 16 else 0.0, P_std=1.2 if resolution <= 16 else 0.6,
                                 sigma_data=0.9, data_mean=0.0,      # the settings its documented table used
                                 pos_interp_scale=1.0 if resolution <= 16 else resolution / 16)
    val = LatentSet(val_data, resolution)
    rows = []
    for name in variants:
        cfg = base.replace(name=name, out_dir=str(Path(out) / name), **VARIANTS[name])
        final = train(cfg)
        wall = Manifest.read(final).wall_seconds
        if finetune_steps:       # the recipe's unmasked stage: every variant, so that costs stay comparable
            final = train(cfg.replace(name=name + "_unmasked", out_dir=str(Path(out) / (name + "_unmasked")),
                                      init_from=str(final), mask_ratio=0.0, steps=finetune_steps, warmup_steps=0,
                                      schedule="constant", lr=lr * 0.3))
            wall += Manifest.read(final).wall_seconds
        model, meta = load_model(str(final))
        edm = EDMConfig(**meta["edm"])
        vl = validation_loss(model, val, edm=edm, num_samples=512)
        score = shapes_score(model, schema.text_encoder, schema.image_autoencoder, schema.latent_shape(resolution),
                             n_per_task=n_per_task, num_steps=sample_steps, edm=edm, save_grid=Path(out) / f"{name}_shapes.png")
        rows.append({"variant": name, "mask_ratio": cfg.mask_ratio, "patch_mixer": cfg.model_overrides.get("patch_mixer", True),
                     "steps": steps, "unmasked_finetune_steps": finetune_steps, "train_wall_s": round(wall, 1),
                     "flops_per_step": model.flops(batch_size, cfg.mask_ratio, schema.caption_len) * 3,
                     "val_loss": round(vl["mean"], 4), "val_loss_by_sigma": {k: round(v, 4) for k, v in vl.items()},
                     "shapes_overall": None if score is None else round(score["overall"], 3),
                     "shapes_tasks": None if score is None else {k: round(v["score"], 3) for k, v in score["tasks"].items()}})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ablation.json").write_text(json.dumps(rows, indent=2))
    return rows


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"].startswith("a_")), rows[0])
    lines = ["| variant | mask | patch mixer | steps | train wall s (x a) | train GFLOPs/step | val loss | shapes score |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "n/a" if r["shapes_overall"] is None else f"{r['shapes_overall']:.3f}"
        lines.append(f"| {r['variant']} | {r['mask_ratio']} | {r['patch_mixer']} | {r['steps']} | "
                     f"{r['train_wall_s']} ({r['train_wall_s'] / base['train_wall_s']:.2f}) | "
                     f"{r['flops_per_step'] / 1e9:.2f} | {r['val_loss']:.4f} | {score} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m microdit.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="training latent set(s) (shapes)")
    p.add_argument("--val-data", required=True, help="held-out latent set for the validation loss")
    p.add_argument("--out", default="runs/ablation", help="one subfolder per variant + ablation.json")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every variant")
    p.add_argument("--resolution", type=int, default=16, help="image resolution (a latents_<res> column)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-per-task", type=int, default=8, help="held-out shapes prompts per task for the score")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="then train every variant this many steps without masking (the recipe's stage 2) before evaluating")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    check_positive(steps=a.steps, resolution=a.resolution, batch_size=a.batch_size, n_per_task=a.n_per_task)
    if a.lr <= 0 or a.finetune_steps < 0:
        raise UserError(f"--lr {a.lr} / --finetune-steps {a.finetune_steps}: give lr > 0 and finetune steps >= 0")
    for folder in [*a.data, a.val_data]:
        if not (Path(folder) / "schema.json").exists():
            raise UserError(f"{folder}: not a latent set (no schema.json): make one with dataprep.precompute or "
                            "microdit.training.synthetic")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0") or torch.get_num_threads()))
    rows = run_ablation(a.data, a.val_data, a.out, a.steps, a.resolution, a.batch_size, a.lr,
                        n_per_task=a.n_per_task, variants=a.variants, progress=not a.no_progress,
                        finetune_steps=a.finetune_steps)
    print(format_table(rows))


if __name__ == "__main__":
    run_cli(main)
