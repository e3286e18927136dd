"""One training stage, from set-up to its final folder: `train(cfg)` runs a `StageRun`.

    from microdit.training.loop import train
    train(TrainConfig.load("stage.json"))          # or: python -m microdit.training --config stage.json

`StageRun` names each part of a stage: `setup` (model, optimizer, data), `resume` (from the last
checkpoint), `train_step` (accumulated forward/backward, `optimizer_step`, `update_ema`),
`save_checkpoint`, `save_samples` and `finish` (validation, final folder and manifest). The seams a
different engine plugs into are `open_schema` / `open_loader` (where batches come from), `wrap_model`,
`optimizer_step`, `update_ema`, `exported_state`, `sharded_state` (what a checkpoint holds) and `export`
(the loadable weights).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from ..edm import edm_loss
from ..manifest import CostMeter, Manifest, folder_bytes, read_manifest
from ..storage import location
from . import distributed as dist_utils
from .config import RESOLVED_FIELDS, TrainConfig, batch_split, edm_config, resolve_data_mean
from .optim import EMA, make_optimizer, make_scheduler
from .sharded import CheckpointWriter, load_latest, load_train_tensors, train_tensors
from .state import (CONFIG_NAME, check_saved_config, clean_partial, latest_checkpoint, rng_state, set_rng_state,
                    slot_generators, truncate_metrics, write_folder_atomically)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


# --------------------------------------------------------------------------------------------
#                                      Building blocks
# --------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, schema):
    """The stage's model: fresh, or the previous stage's weights with positions for this resolution (and,
    where this stage's patches are larger than the previous stage's, carried over by `grow_patches`)."""
    from ..model import create_model
    latent_res = cfg.resolution // schema.downsample
    model = create_model(cfg.preset, latent_res=latent_res, in_channels=schema.latent_channels,
                         caption_channels=schema.caption_dim, pos_interp_scale=cfg.pos_interp_scale,
                         **cfg.model_overrides)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.init_from:
        from safetensors.torch import load_file
        path = Path(cfg.init_from)
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"init_from {path}: no model.safetensors (a finished stage's final/ folder)")
        sd = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k != "pos_embed"}
        from ..checkpoint import read_meta
        old_patch = read_meta(path)[1].patch_size
        if old_patch != model.patch_size:
            from ..model import grow_patches
            pixel = schema.image_autoencoder.startswith("pixel")
            try:
                sd = grow_patches(sd, old_patch, model.patch_size, schema.downsample if pixel else 1)
            except ValueError as e:
                raise ValueError(f"init_from {path}: {e}") from None
        missing, unexpected = model.load_state_dict(sd, strict=False)
        fresh = {k for k in missing if k.startswith("patch_skip.")}    # added at this stage: starts at zero
        if unexpected or set(missing) - fresh != {"pos_embed"}:
            raise ValueError(f"init_from {path} does not match preset {cfg.preset} with overrides "
                             f"{cfg.model_overrides}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.set_resolution(latent_res, cfg.pos_interp_scale)
    return model


def _infinite(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the latent set yields no full batch: it has fewer samples than one micro-batch")


# --------------------------------------------------------------------------------------------
#                                          One stage
# --------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, should_stop=None) -> Path:
    """Train one stage; return its final folder (or, when stopped early, the checkpoint written then).

    should_stop(step, state) -> bool is asked after every step (rank 0 decides); a True answer, or
    cfg.max_wall_seconds passing, stops with a resumable checkpoint (rerun to continue).
    """
    cfg.validate()
    final = Path(cfg.out_dir) / "final"
    check_saved_config(cfg)
    if read_manifest(final) is not None:
        print(f"[{cfg.name}] already finished: {final}", file=sys.stderr)
        return final
    ctx = dist_utils.setup()
    try:
        return StageRun(cfg, ctx, should_stop).run()
    finally:
        dist_utils.teardown(ctx)


class StageRun:
    """The state of one stage while it trains: weights, optimizer, data position, counters."""

    def __init__(self, cfg: TrainConfig, ctx: dist_utils.DistContext, should_stop=None):
        self.cfg, self.ctx, self.should_stop = cfg, ctx, should_stop
        self.out = Path(cfg.out_dir)
        self.final = self.out / "final"
        self.edm = edm_config(cfg, resolve_data_mean(cfg))
        if cfg.data_mean == "auto" and ctx.is_main:
            print(f"[{cfg.name}] data_mean auto: {self.edm.data_mean:g}", file=sys.stderr)
        self.t_start, self.cpu_start = time.time(), CostMeter._cpu()
        self.step, self.samples_seen = 0, 0
        self.recent: list[float] = []             # the last 20 losses (final_loss is their mean)
        self.samples_per_s = 0.0

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Model (fresh or from init_from), EMA, validation set, wrapper, optimizer, schedule, data, RNG."""
        from ..data import LatentSet
        from .validate import validation_loss
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_partial(self.out)
        dist_utils.barrier()
        self.schema = self.open_schema()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.schema).to(ctx.device)
        moe_names = set(self.model.moe_parameter_names())
        self.val_set = LatentSet(cfg.val_data, cfg.resolution, cache_dir=cfg.cache_dir()) if cfg.val_data else None
        val_start = None
        if self.val_set is not None and latest_checkpoint(self.out) is None and ctx.is_main:
            val_start = validation_loss(self.model, self.val_set, edm=self.edm)    # the starting weights
        self.prior = {"wall": 0.0, "cpu": 0.0, "val_start": val_start}           # carried over resumes
        self.wrapped = self.wrap_model()
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay else None        # where the parameters live
        self.optimizer = make_optimizer(self.wrapped, cfg, moe_names)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.micro, self.accum = batch_split(cfg, ctx.world_size)
        self.loader = self.open_loader()
        self.gens = slot_generators(cfg.seed, ctx.rank, ctx.world_size, self.accum, ctx.device)
        self.writer = CheckpointWriter(self.out, cfg.keep_checkpoints, ctx.rank, ctx.checkpoint_group)
        resolved = (ctx.world_size, self.micro, self.accum, self.schema.to_dict())
        self.cfg_dict = {**cfg.to_dict(), **dict(zip(RESOLVED_FIELDS, resolved))}

    def open_schema(self):
        """The latent sets' schema (latent and caption shapes, encoders) at the stage's resolution."""
        from ..data import open_latent_sets
        return open_latent_sets(self.cfg.data, self.cfg.resolution)

    def open_loader(self):
        """This rank's micro-batches of the latent sets (resumable: state_dict / load_state_dict)."""
        from ..data import latent_loader
        cfg = self.cfg
        return latent_loader(cfg.data, cfg.resolution, self.micro, seed=cfg.seed, shuffle=cfg.shuffle,
                             proportions=cfg.data_proportions or None, run_dir=self.out,
                             pin_memory=self.ctx.device.type == "cuda", **cfg.loader_options())

    def wrap_model(self) -> torch.nn.Module:
        """The model as the optimizer and the forward pass see it (DDP, FSDP, compiled, or itself)."""
        return dist_utils.wrap(self.model, self.cfg.strategy, self.ctx, self.cfg.compile, self.cfg.precision)

    # ---- resume ---------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the last checkpoint (weights, optimizer, schedule, EMA, data position, RNG,
        counters); without one, start a fresh metrics log."""
        from .monitor import Monitor
        ctx, metrics = self.ctx, self.out / "metrics.jsonl"
        last, st, tensors = load_latest(self.out, lambda: self.sharded_state()[0], ctx.checkpoint_group)
        if last is not None:
            load_train_tensors(self.wrapped, self.optimizer, tensors, st["param_groups"])
            self.scheduler.load_state_dict(st["scheduler"])
            self.loader.load_state_dict(st["loader"])
            set_rng_state(self.gens, st["rng"], last)
            self.step, self.samples_seen, self.prior = st["step"], st["samples_seen"], st["prior"]
            if ctx.is_main:
                truncate_metrics(metrics, self.step)
                print(f"[{self.cfg.name}] resuming from {last} (step {self.step})", file=sys.stderr)
        elif ctx.is_main and metrics.exists():
            metrics.unlink()
        self.monitor = Monitor(self.out, self.cfg.steps, self.step, self.cfg.batch_size, self.cfg.name,
                               enabled=ctx.is_main, progress=self.cfg.progress)
        if self.prior["val_start"] is not None and last is None:
            self.monitor.scalars(self.step, "val", self.prior["val_start"])

    def sharded_state(self) -> tuple[dict, list]:
        """(model, optimizer moments and EMA as this rank holds them, optimizer hyper-parameters)."""
        return train_tensors(self.wrapped, self.optimizer, self.ema.shadow if self.ema is not None else None)

    # ---- one step -------------------------------------------------------------------------------

    def train_step(self, data) -> float:
        """One optimizer step over `accum` micro-batches; returns the mean loss over all ranks."""
        from ..data import caption_dropout, to_device
        cfg, device = self.cfg, self.ctx.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=(cfg.precision == "bf16" and device.type == "cuda"))
        loss_sum = torch.zeros((), device=device)
        for k, gens in enumerate(self.gens.values()):
            batch = next(data)
            x, y = to_device(batch, device)                # moved as float16, cast on the device
            y = caption_dropout(y, cfg.caption_dropout, gens["dropout"])
            with dist_utils.no_sync(self.wrapped, skip=k < self.accum - 1), autocast:
                loss = edm_loss(self.wrapped, x, y, self.edm, cfg.mask_ratio, generator=gens["noise"],
                                patch_size=self.model.patch_size)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        loss = dist_utils.all_mean(loss_sum / self.accum).item()
        if not math.isfinite(loss):
            self.monitor.close()
            self.writer.wait()
            kept = latest_checkpoint(self.out)
            raise TrainingDiverged(
                f"[{cfg.name}] loss is {loss} at step {self.step + 1}: training stopped before the optimizer "
                f"step; the last good checkpoint is untouched ({kept or 'none written yet'}). Lower lr "
                f"({cfg.lr}) or grad_clip ({cfg.grad_clip}), or check the latent set for NaN/inf values, "
                "then rerun the same command to resume from it.")
        return loss

    def optimizer_step(self) -> tuple[float, float]:
        """Clip the gradients' norm to cfg.grad_clip, step optimizer and schedule; returns (grad norm, lr used)."""
        grad_norm = dist_utils.clip_grad_norm(self.wrapped, self.cfg.grad_clip)      # all ranks' shards
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)                # each rank its own shard, nothing gathered

    # ---- checkpoints and exported weights -------------------------------------------------------

    def exported_state(self) -> dict:
        """The weights a checkpoint exports (EMA when kept), whole, as CPU copies on rank 0."""
        whole = {}
        for k, v in (self.ema.shadow if self.ema is not None else self.model.state_dict()).items():
            v = dist_utils.full(v)                                   # all-gathered under FSDP2 (collective)
            if self.ctx.is_main:
                whole[k] = v.detach().to("cpu", copy=True)         # a copy: training moves on
        return whole

    def export(self, folder: Path, state_dict: dict, step: int | None = None) -> None:
        """model.safetensors + config.json: what the inference pipeline loads (weights of `step`)."""
        from ..checkpoint import save_model
        cfg, schema = self.cfg, self.schema
        save_model(folder, self.model, preset=cfg.preset, image_autoencoder=schema.image_autoencoder,
                   text_encoder=schema.text_encoder, resolution=cfg.resolution, edm=self.edm,
                   extra={"stage": cfg.name, "step": self.step if step is None else step,
                          "ema": self.ema is not None}, state_dict=state_dict)

    def save_checkpoint(self, block: bool = False) -> Path:
        """checkpoints/step_<step>/: every rank's shard written in the background (collective); rank 0
        adds the small state and the whole exported weights. block=True: in place when it returns."""
        tensors, param_groups = self.sharded_state()
        exported = self.exported_state()
        rngs = {s: g for part in dist_utils.gather_objects(rng_state(self.gens)) for s, g in part.items()}
        state = fill = None
        if self.ctx.is_main:
            state = {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.ctx.world_size,
                     "param_groups": param_groups, "scheduler": self.scheduler.state_dict(),
                     "loader": self.loader.state_dict(), "rng": rngs,
                     "prior": {**self.prior, "wall": self.wall_seconds(), "cpu": self.cpu_seconds()}}

            def fill(folder: Path, step=self.step) -> None:          # runs in a thread: training moves on
                self.export(folder, exported, step)
                (folder / CONFIG_NAME).write_text(json.dumps(self.cfg_dict, indent=2, default=str))
        return self.writer.save(self.step, tensors, state, fill, block=block)

    def eval_model(self):
        """The exported weights as a plain module (EMA when kept; gathered whole under FSDP: collective)."""
        cfg, ctx = self.cfg, self.ctx
        sharded = dist_utils.is_sharded(self.model)
        if self.ema is None and not sharded:
            return self.model
        from copy import deepcopy
        sd = self.exported_state()
        m = build_model(cfg.replace(init_from=""), self.schema).to(ctx.device) if sharded else deepcopy(self.model)
        if ctx.is_main:
            m.load_state_dict(sd)
        return m

    def save_samples(self, tag: str) -> None:
        """samples/<tag>.png (+ .txt of its captions) and the same grid in TensorBoard."""
        from ..manifest import write_png_atomic
        from ..sampling import enlarge
        from .monitor import sample_captions, sample_grid
        cfg = self.cfg
        if cfg.num_samples <= 0:
            return
        model = self.eval_model()
        if not self.ctx.is_main:
            return
        caps = sample_captions(cfg, self.schema, cfg.num_samples)
        if caps is None:
            return
        grid = sample_grid(model, caps[0], self.schema.latent_shape(cfg.resolution), self.schema.image_autoencoder,
                           self.edm, cfg.sample_steps, cfg.guidance_scale, seed=cfg.seed)
        if grid is not None:
            path = write_png_atomic(self.out / "samples" / f"{tag}.png", enlarge(grid, max(1, 128 // cfg.resolution)))
            path.with_suffix(".txt").write_text("\n".join(caps[1]) + "\n")
            self.monitor.image(self.step, "samples", grid)

    def wall_seconds(self) -> float:
        """Wall time of the stage over all its runs (resumes add up)."""
        return self.prior["wall"] + time.time() - self.t_start

    def cpu_seconds(self) -> float:
        return self.prior["cpu"] + CostMeter._cpu() - self.cpu_start

    # ---- the loop -------------------------------------------------------------------------------

    def wants_stop(self, loss: float) -> bool:
        """max_wall_seconds passed or should_stop said so (rank 0's answer, taken by every rank)."""
        cfg = self.cfg
        stop = bool(cfg.max_wall_seconds and self.wall_seconds() >= cfg.max_wall_seconds)
        if self.should_stop is not None and not stop:
            stop = bool(self.should_stop(self.step, {"step": self.step, "samples_seen": self.samples_seen,
                                                     "loss": loss, "wall_seconds": self.wall_seconds()}))
        return dist_utils.broadcast_flag(stop, self.ctx.device)

    def run(self) -> Path:
        self.setup()
        self.resume()
        cfg, data, stopped = self.cfg, _infinite(self.loader), None
        self.wrapped.train()
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            loss = self.train_step(data)
            grad_norm, lr = self.optimizer_step()
            self.update_ema()
            self.step += 1
            self.samples_seen += cfg.batch_size
            sps = cfg.batch_size / (time.perf_counter() - t0)
            self.samples_per_s = sps if self.samples_per_s == 0 else 0.9 * self.samples_per_s + 0.1 * sps
            self.recent = (self.recent + [loss])[-20:]
            self.monitor.step(self.step, loss, lr, grad_norm, self.samples_per_s,
                              log=self.step % max(1, cfg.log_every) == 0)
            if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                self.save_samples(f"step_{self.step:08d}")
            if self.step >= cfg.steps:
                break
            if self.wants_stop(loss):
                stopped = self.save_checkpoint(block=True)
                break
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            self.writer.poll()
        self.writer.wait()
        return self.finish(stopped)

    # ---- the end of the stage (or a clean early stop) -------------------------------------------

    def finish(self, stopped: Path | None) -> Path:
        """Validation, final samples, manifest; final/ written atomically (or the early-stop checkpoint)."""
        from ..data import close_loader
        from .validate import validation_loss
        cfg, ctx = self.cfg, self.ctx
        close_loader(self.loader)                      # streaming's download-ahead threads stop here
        final_model = self.eval_model() if self.val_set is not None else None
        val_end = validation_loss(final_model, self.val_set, edm=self.edm) if (
            self.val_set is not None and ctx.is_main) else None
        if val_end:
            self.monitor.scalars(self.step, "val", val_end)
        if stopped is None:
            self.save_samples("final")
        val_start = self.prior["val_start"]
        metrics = {"steps": self.step, "final_loss": sum(self.recent) / max(1, len(self.recent)),
                   "samples_per_s": self.samples_per_s, "batch_size": cfg.batch_size, "resolution": cfg.resolution,
                   "mask_ratio": cfg.mask_ratio, "val_loss_start": (val_start or {}).get("mean"),
                   "val_loss_end": (val_end or {}).get("mean"), "val_start": val_start, "val_end": val_end,
                   "stopped_early": stopped is not None}
        wall, cpu = self.wall_seconds(), self.cpu_seconds()
        cuda = ctx.device.type == "cuda"
        exported = None if stopped is not None else self.exported_state()
        ddp = cfg.strategy == "ddp"
        metrics["replica_checksums"] = dist_utils.replica_checksums(self.model, ctx) if ddp else None
        self.monitor.close()
        if not ctx.is_main:
            return self.final
        parents = [location(d) for d in cfg.data] + ([cfg.init_from] if cfg.init_from else [])
        manifest = Manifest(kind="checkpoint", name=cfg.name, config=self.cfg_dict, parents=parents,
                            samples=self.samples_seen, wall_seconds=wall, cpu_seconds=cpu,
                            gpu_seconds=wall * ctx.world_size if cuda else 0.0,
                            gpu_type=torch.cuda.get_device_name(ctx.device) if cuda else "",
                            num_gpus=ctx.world_size if cuda else 0, metrics=metrics)
        if stopped is not None:
            manifest.bytes = folder_bytes(stopped)
            manifest.write(stopped)
            print(f"[{cfg.name}] stopped at step {self.step}: {stopped} (rerun the same command to continue)",
                  file=sys.stderr)
            return stopped

        def fill(tmp: Path):
            self.export(tmp, exported)
            (tmp / CONFIG_NAME).write_text(json.dumps(self.cfg_dict, indent=2, default=str))
            manifest.bytes = folder_bytes(tmp)
            manifest.write(tmp)

        write_folder_atomically(self.final, fill)
        print(f"[{cfg.name}] done: {self.final} ({self.step} steps, {wall:.0f} s, val loss "
              f"{metrics['val_loss_start']} -> {metrics['val_loss_end']})", file=sys.stderr)
        return self.final
