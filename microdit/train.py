r"""Train MicroDiT: the paper's four-stage masked recipe, or the same four stages scaled down for a CPU.

    # the whole CPU recipe (MicroDiT_Nano_2, 16 px then 32 px, a few minutes on 2 cores):
    python -m microdit.train --recipe cpu --data data/shapes-latents --val-data data/shapes-val --out runs/cpu
    # the paper's recipe on one 8-GPU node (FSDP SHARD_GRAD_OP, bf16):
    torchrun --standalone --nproc_per_node=8 -m microdit.train --recipe paper --data /data/sa1b /data/cc12m \
        --proportions 0.5 0.5 --out runs/paper
    # one stage from a JSON TrainConfig, with overrides:
    python -m microdit.train --config stage.json --set steps=500 lr=1e-3

Run the same command again after a crash or a kill: finished stages are skipped and the running one
resumes from its last checkpoint (on CPU every later step's loss equals the uninterrupted run's).
Each stage starts from the previous stage's final weights, positions re-made for its resolution.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .edm import EDMConfig, edm_loss
from .manifest import CostMeter, Manifest, folder_bytes, read_manifest
from .training import distributed as dist_utils
from .training.config import STAGES, TrainConfig, stage_configs
from .training.optim import EMA, make_optimizer, make_scheduler
from .training.state import (CONFIG_NAME, clean_partial, latest_checkpoint, load_latest, rng_state,
                             save_resumable, set_rng_state, truncate_metrics, write_folder_atomically)

__all__ = ["TrainConfig", "STAGES", "train", "run_stages", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# --------------------------------------------------------------------------------------------
#                                      Building blocks
# --------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, schema):
    """The stage's model: fresh, or the previous stage's weights with positions for this resolution."""
    from .model import create_model
    latent_res = cfg.resolution // schema.downsample
    model = create_model(cfg.preset, latent_res=latent_res, in_channels=schema.latent_channels,
                         caption_channels=schema.caption_dim, pos_interp_scale=cfg.pos_interp_scale,
                         **cfg.model_overrides)
    if cfg.init_from:
        from safetensors.torch import load_file
        path = Path(cfg.init_from)
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"init_from {path}: no model.safetensors (a finished stage's final/ folder)")
        sd = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k != "pos_embed"}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or set(missing) != {"pos_embed"}:
            raise ValueError(f"init_from {path} does not match preset {cfg.preset} with overrides "
                             f"{cfg.model_overrides}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.set_resolution(latent_res, cfg.pos_interp_scale)
    return model


def batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) with micro * steps * world = global batch."""
    per_rank, rem = divmod(cfg.batch_size, world_size)
    if rem:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world_size}")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (batch_size / world size) is not a multiple of "
                         f"micro_batch_size {micro}")
    return micro, per_rank // micro


def _infinite(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the latent set yields no full batch: it has fewer samples than one micro-batch")


def _edm_config(cfg: TrainConfig) -> EDMConfig:
    return EDMConfig(sigma_data=cfg.sigma_data, P_mean=cfg.P_mean, P_std=cfg.P_std)


def _sample_captions(cfg: TrainConfig, schema, n: int) -> tuple[torch.Tensor, list[str]] | None:
    """Caption embeddings for the sample grids: cfg.sample_prompts (encoded), else held-out captions."""
    if cfg.sample_prompts:
        from .encoders import MissingWeightsError, load_text_encoder
        try:
            te = load_text_encoder(schema.text_encoder)
        except MissingWeightsError as e:
            warnings.warn(f"sample prompts cannot be encoded here: {e}")
            return None
        prompts = list(cfg.sample_prompts)[:n]
        with torch.inference_mode():
            return te.encode(prompts).float(), prompts
    from .data import LatentSet
    ds = LatentSet(cfg.val_data or cfg.data[0], cfg.resolution)
    b = ds.batch(range(min(n, len(ds))))
    return b["caption"], b["caption_text"]


# --------------------------------------------------------------------------------------------
#                                          One stage
# --------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, should_stop=None) -> Path:
    """Train one stage; return its final folder (or, when stopped early, the checkpoint written then).

    should_stop(step, state) -> bool is asked after every step (rank 0 decides); a True answer, or
    cfg.max_wall_seconds passing, stops with a resumable checkpoint (rerun to continue).
    """
    cfg.validate()
    out = Path(cfg.out_dir)
    final = out / "final"
    if read_manifest(final) is not None:
        print(f"[{cfg.name}] already finished: {final}", file=sys.stderr)
        return final
    ctx = dist_utils.setup()
    try:
        return _train(cfg, ctx, out, final, should_stop)
    finally:
        dist_utils.teardown(ctx)


def _train(cfg: TrainConfig, ctx, out: Path, final: Path, should_stop) -> Path:
    from .data import LatentSet, caption_dropout, latent_loader, open_latent_sets
    from .training.monitor import Monitor, sample_grid, save_png
    from .training.validate import validation_loss

    t_start, cpu_start = time.time(), CostMeter._cpu()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
    dist_utils.barrier()
    schema = open_latent_sets(cfg.data, cfg.resolution)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, schema).to(ctx.device)
    moe_names = set(model.moe_parameter_names())
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    val_set = LatentSet(cfg.val_data, cfg.resolution) if cfg.val_data else None
    val_start = None
    if val_set is not None and latest_checkpoint(out) is None and ctx.is_main:
        val_start = validation_loss(model, val_set, edm=_edm_config(cfg))     # the stage's starting weights
    wrapped = dist_utils.wrap(model, cfg.strategy, ctx, cfg.compile)
    wrapped.patch_size = model.patch_size            # edm_loss reads it (wrappers do not forward attributes)
    optimizer = make_optimizer(wrapped, cfg, moe_names)
    scheduler = make_scheduler(optimizer, cfg)
    micro, accum = batch_split(cfg, ctx.world_size)
    loader = latent_loader(cfg.data, cfg.resolution, micro, seed=cfg.seed, shuffle=cfg.shuffle,
                           proportions=cfg.data_proportions or None, run_dir=out)
    gens = {"noise": torch.Generator(device=ctx.device).manual_seed(cfg.seed * 7919 + ctx.rank),
            "dropout": torch.Generator().manual_seed(cfg.seed * 104729 + ctx.rank)}
    edm = _edm_config(cfg)
    latent_shape = schema.latent_shape(cfg.resolution)
    cfg_dict = {**cfg.to_dict(), "world_size": ctx.world_size, "micro_batch": micro, "accumulation": accum,
                "schema": schema.to_dict()}

    # ---- resume ----
    step, samples_seen, prior = 0, 0, {"wall": 0.0, "cpu": 0.0, "val_start": val_start}
    last, st = load_latest(out)
    if last is not None:
        _set_full_state(wrapped, optimizer, st["model"], st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        loader.load_state_dict(st["loader"])
        set_rng_state(gens, st["rng"][ctx.rank])
        step, samples_seen, prior = st["step"], st["samples_seen"], st["prior"]
        if ctx.is_main:
            truncate_metrics(out / "metrics.jsonl", step)
            print(f"[{cfg.name}] resuming from {last} (step {step})", file=sys.stderr)
    elif ctx.is_main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    monitor = Monitor(out, cfg.steps, step, cfg.batch_size, cfg.name, enabled=ctx.is_main, progress=cfg.progress)
    if val_start is not None:
        monitor.scalars(step, "val", val_start)

    def exported_state() -> dict:
        """The weights a checkpoint exports (EMA when kept), gathered whole (collective under FSDP)."""
        if ema is not None:
            return dict(ema.shadow)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export(folder, sd):
        from .checkpoint import save_model
        save_model(folder, model, preset=cfg.preset, image_autoencoder=schema.image_autoencoder,
                   text_encoder=schema.text_encoder, resolution=cfg.resolution, edm=edm,
                   extra={"stage": cfg.name, "step": step, "ema": ema is not None}, state_dict=sd)

    def checkpoint() -> Path | None:
        msd, osd = _get_full_state(wrapped, optimizer)
        exp = exported_state()
        rngs = dist_utils.gather_objects(rng_state(gens))
        if not ctx.is_main:
            return None
        st = {"step": step, "samples_seen": samples_seen, "model": msd, "optimizer": osd,
              "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
              "loader": loader.state_dict(), "rng": rngs,
              "prior": {**prior, "wall": prior["wall"] + time.time() - t_start,
                        "cpu": prior["cpu"] + CostMeter._cpu() - cpu_start}}
        return save_resumable(out, step, st, lambda folder: export(folder, exp), cfg_dict, cfg.keep_checkpoints)

    def eval_model():
        """The exported weights as a plain module (EMA when kept; gathered whole under FSDP: collective)."""
        if ema is None and not (ctx.world_size > 1 and cfg.strategy == "fsdp"):
            return model
        from copy import deepcopy
        sd = exported_state()
        m = deepcopy(model) if ctx.world_size == 1 or cfg.strategy != "fsdp" else build_model(
            cfg.replace(init_from=""), schema).to(ctx.device)
        if ctx.is_main:
            m.load_state_dict(sd)
        return m

    def samples(tag: str) -> None:
        if cfg.num_samples <= 0:
            return
        sample_model = eval_model()
        if not ctx.is_main:
            return
        caps = _sample_captions(cfg, schema, cfg.num_samples)
        if caps is None:
            return
        grid = sample_grid(sample_model, caps[0], latent_shape, schema.image_autoencoder, edm,
                           cfg.sample_steps, cfg.guidance_scale, seed=cfg.seed)
        if grid is not None:
            path = save_png(grid, out / "samples" / f"{tag}.png", upscale=max(1, 128 // cfg.resolution))
            path.with_suffix(".txt").write_text("\n".join(caps[1]) + "\n")
            monitor.image(step, "samples", grid)

    # ---- the loop ----
    data = _infinite(loader)
    device_type = ctx.device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16,
                              enabled=(cfg.precision == "bf16" and device_type == "cuda"))
    wrapped.train()
    recent = []
    sps, stopped = 0.0, None
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=ctx.device)
        for k in range(accum):
            batch = next(data)
            x = batch["latents"].to(ctx.device, non_blocking=True)
            y = caption_dropout(batch["caption"], cfg.caption_dropout, gens["dropout"]).to(ctx.device)
            with dist_utils.no_sync(wrapped, skip=k < accum - 1), autocast:
                loss = edm_loss(wrapped, x, y, edm, cfg.mask_ratio, generator=gens["noise"])
                (loss / accum).backward()
            loss_sum += loss.detach()
        loss_val = dist_utils.all_mean(loss_sum / accum).item()
        if not math.isfinite(loss_val):
            monitor.close()
            kept = latest_checkpoint(out)
            raise TrainingDiverged(
                f"[{cfg.name}] loss is {loss_val} at step {step + 1}: training stopped before the optimizer "
                f"step; the last good checkpoint is untouched ({kept or 'none written yet'}). Lower lr "
                f"({cfg.lr}) or grad_clip ({cfg.grad_clip}), or check the latent set for NaN/inf values, "
                "then rerun the same command to resume from it.")
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip or float("inf")).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with dist_utils.full_params(wrapped) as inner:
                ema.update(inner)
        step += 1
        samples_seen += cfg.batch_size
        dt = time.perf_counter() - t0
        sps = cfg.batch_size / dt if sps == 0 else 0.9 * sps + 0.1 * cfg.batch_size / dt
        recent = (recent + [loss_val])[-20:]
        monitor.step(step, loss_val, lr, grad_norm, sps, log=step % max(1, cfg.log_every) == 0)
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
            samples(f"step_{step:08d}")
        if step >= cfg.steps:
            break
        stop = bool(cfg.max_wall_seconds and prior["wall"] + time.time() - t_start >= cfg.max_wall_seconds)
        if should_stop is not None and not stop:
            stop = bool(should_stop(step, {"step": step, "samples_seen": samples_seen, "loss": loss_val,
                                          "wall_seconds": prior["wall"] + time.time() - t_start}))
        if dist_utils.broadcast_flag(stop, ctx.device):
            stopped = checkpoint()
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()

    # ---- the end of the stage (or a clean early stop) ----
    final_model = eval_model() if val_set is not None else None
    val_end = validation_loss(final_model, val_set, edm=edm) if (val_set is not None and ctx.is_main) else None
    if val_end:
        monitor.scalars(step, "val", val_end)
    if stopped is None:
        samples("final")
    metrics = {"steps": step, "final_loss": sum(recent) / max(1, len(recent)), "samples_per_s": sps,
               "batch_size": cfg.batch_size, "resolution": cfg.resolution, "mask_ratio": cfg.mask_ratio,
               "val_loss_start": (prior["val_start"] or {}).get("mean"), "val_loss_end": (val_end or {}).get("mean"),
               "val_start": prior["val_start"], "val_end": val_end, "stopped_early": stopped is not None}
    wall = prior["wall"] + time.time() - t_start
    cpu = prior["cpu"] + CostMeter._cpu() - cpu_start
    cuda = ctx.device.type == "cuda"
    msd = None if stopped is not None else exported_state()
    metrics["replica_checksums"] = _replica_checksums(model, cfg.strategy, ctx)
    monitor.close()
    if not ctx.is_main:
        return final
    manifest = Manifest(kind="checkpoint", name=cfg.name, config=cfg_dict,
                        parents=[str(Path(d).resolve()) for d in cfg.data] + ([cfg.init_from] if cfg.init_from else []),
                        samples=samples_seen, wall_seconds=wall, cpu_seconds=cpu,
                        gpu_seconds=wall * ctx.world_size if cuda else 0.0,
                        gpu_type=torch.cuda.get_device_name(ctx.device) if cuda else "",
                        num_gpus=ctx.world_size if cuda else 0, metrics=metrics)
    if stopped is not None:
        manifest.bytes = folder_bytes(stopped)
        manifest.write(stopped)
        print(f"[{cfg.name}] stopped at step {step}: {stopped} (rerun the same command to continue)", file=sys.stderr)
        return stopped

    def fill(tmp: Path):
        export(tmp, msd)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg_dict, indent=2, default=str))
        manifest.bytes = folder_bytes(tmp)
        manifest.write(tmp)

    write_folder_atomically(final, fill)
    print(f"[{cfg.name}] done: {final} ({step} steps, {wall:.0f} s, val loss "
          f"{metrics['val_loss_start']} -> {metrics['val_loss_end']})", file=sys.stderr)
    return final


def _replica_checksums(model, strategy: str, ctx) -> list[float] | None:
    """Every rank's weight checksum (data-parallel replicas must agree; raise if they do not)."""
    if ctx.world_size == 1 or strategy != "ddp":
        return None
    with torch.no_grad():
        mine = float(sum((p.double() * (i + 1)).sum().item() for i, p in enumerate(model.parameters())))
    sums = dist_utils.gather_objects(mine)
    if len(set(sums)) != 1:
        raise RuntimeError(f"data-parallel replicas disagree after training: weight checksums {sums}")
    return sums


def _get_full_state(wrapped, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _set_full_state(wrapped, optimizer, msd, osd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(wrapped, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------
#                                       Several stages
# --------------------------------------------------------------------------------------------

def run_stages(stages: list[TrainConfig], should_stop=None) -> list[Path]:
    """Train the stages in order, each from the previous one's final weights; returns the final folders.

    A stage stopped early (should_stop / max_wall_seconds) ends the run: later stages need its weights.
    """
    finals: list[Path] = []
    for i, cfg in enumerate(stages):
        if i > 0 and not cfg.init_from:
            cfg = cfg.replace(init_from=str(finals[-1]))
        result = train(cfg, should_stop=should_stop)
        finals.append(result)
        if result.name != "final":
            break
    return finals


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
    p = argparse.ArgumentParser(prog="python -m microdit.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(STAGES), help="the four-stage recipe: paper or cpu")
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
    if a.ray_workers:
        from .ray_cluster import ray_session
        with ray_session(address=os.environ.get("RAY_ADDRESS", "auto")):    # token auth: docs/security.md
            prev = ""
            for cfg in stages:
                cfg = cfg.replace(init_from=cfg.init_from or prev)
                dist_utils.ray_train(cfg.to_dict(), a.ray_workers, a.ray_gpu)
                prev = str(Path(cfg.out_dir) / "final")
        return
    finals = run_stages(stages)
    if int(os.environ.get("RANK", "0")) == 0:
        for row in stage_summary(finals):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
