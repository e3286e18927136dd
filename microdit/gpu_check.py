"""GPU check: the paper recipe's GPU paths on one GPU in a few minutes, as one table (and a JSON file).

    make gpu-check                                                     # = the line below
    python -m microdit.gpu_check --out runs/gpu_check.json            # one H100/H200: XL, bf16, compile
    python -m microdit.gpu_check --no-compile --stages 1,4            # quicker: eager, two stages
    OMP_NUM_THREADS=1 python -m microdit.gpu_check --device cpu --out /tmp/gpu_check.json   # toy size, CPU

Rows (each is ok, failed or skipped, with why; one failing row does not stop the others):
- `stageN step`: 3 optimizer steps of paper stage N at its per-GPU micro-batch by the training loop
  (StageRun: MicroDiT_XL_2, bf16 autocast, torch.compile, AdamW with the stage's clip, EMA where the
  stage keeps one) on one GPU, fed random batches of the stage's shapes (`RandomBatchRun`); the peak of
  `torch.cuda.max_memory_allocated` against the planner's estimate of the same run
  (microdit.memory, strategy "single"); the step time is the last step's.
- `stage1 MFU`: model FLOPs of a step (forward from `estimate_flops` + backward counted as 2x forward)
  per second of the last stage-1 step over the GPU's dense bf16 peak (microdit.bench.PEAK_BF16_FLOPS).
- `bf16 vs fp32 loss`: the EDM loss of one batch with the same noise in fp32 and under bf16 autocast
  (CUDA's rules; on a CPU the emulated ones): relative difference <= 2 %.
- `sharded checkpoint`: one step of stage 3, the training loop's sharded asynchronous checkpoint
  (torch.distributed.checkpoint, microdit.training.sharded) and a resume from it into a fresh StageRun:
  model, optimizer moments, EMA (on the device) and step equal; how long the save held training up
  and took in all.
- `SDXL-VAE encode`: diffusers AutoencoderKL with the SDXL VAE's configuration (random weights) encodes a
  batch of 512 px images in bf16: finite latents of shape (N, 4, 64, 64), images per second.
`--device cpu` runs the same rows at toy size (MicroDiT_Nano_2, tiny VAE, no compile, fp32 steps as the
loop runs on a CPU); the memory and MFU rows are skipped there (no CUDA allocator, no peak FLOP/s).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten

from .bench import PEAK_BF16_FLOPS, peak_bf16_flops, train_step_flops
from .cli import run_cli
from .cuda_rules import cpu_autocast_like_cuda
from .edm import EDMConfig, edm_loss
from .model import create_model
from .schema import LatentSchema
from .training.config import PAPER_STAGES
from .training.loop import StageRun

GIB = 2 ** 30
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.13025)
TOY_VAE = dict(SDXL_VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, layers_per_block=1)


@dataclass
class Size:
    """What the check runs at: the real sizes on a GPU, toy ones on a CPU."""
    preset: str
    caption_channels: int
    caption_len: int
    resolution_scale: float          # stage resolution x this (1 on a GPU)
    micro_batch: int | None          # None = each stage's own micro-batch
    compile: bool
    vae: dict
    vae_batch: int
    vae_res: int


GPU = Size("MicroDiT_XL_2", 1024, 77, 1.0, None, True, SDXL_VAE, 16, 512)
CPU = Size("MicroDiT_Nano_2", 32, 8, 0.125, 2, False, TOY_VAE, 2, 64)


class Check:
    """Rows of the table; `row(name)` runs a function and records ok / failed (with the error) / skipped."""

    def __init__(self):
        self.rows: list[dict] = []

    def row(self, name: str, fn, *args) -> dict | None:
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Skip as e:
            self.rows.append({"check": name, "status": "skipped", "why": str(e)})
            return None
        except Exception as e:                                    # noqa: BLE001 - every row must report
            traceback.print_exc(file=sys.stderr)
            self.rows.append({"check": name, "status": "failed", "why": f"{type(e).__name__}: {e}"[:300]})
            return None
        ok = out.pop("ok", True)
        self.rows.append({"check": name, "status": "ok" if ok else "failed", "seconds": time.perf_counter() - t0,
                          **out})
        return out


class Skip(Exception):
    pass


def _stage_model(size: Size, stage, device):
    lat = int(stage.resolution * size.resolution_scale) // 8
    torch.manual_seed(0)
    model = create_model(size.preset, latent_res=lat, in_channels=4, caption_channels=size.caption_channels,
                         pos_interp_scale=stage.pos_interp_scale).to(device)
    model.activation_checkpointing = stage.activation_checkpointing
    return model.train(), lat


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else cpu_autocast_like_cuda()


class RandomBatchRun(StageRun):
    """The training loop's StageRun fed `steps` random micro-batches of the stage's shapes (no latent set)."""

    def __init__(self, cfg, ctx, caption_len: int, caption_dim: int, steps: int):
        super().__init__(cfg, ctx)
        self.caption_len, self.caption_dim, self.steps = caption_len, caption_dim, steps

    def open_schema(self) -> LatentSchema:
        return LatentSchema(resolutions=(self.cfg.resolution,), latent_channels=4, downsample=8,
                            caption_len=self.caption_len, caption_dim=self.caption_dim)

    def open_loader(self) -> "RandomBatches":
        g, lat = torch.Generator().manual_seed(self.cfg.seed), self.cfg.resolution // 8
        return RandomBatches({"latents": torch.randn(self.micro, 4, lat, lat, generator=g) * 0.5,
                              "caption": torch.randn(self.micro, self.caption_len, self.caption_dim, generator=g)}
                             for _ in range(self.steps))


class RandomBatches(list):
    """Fixed batches with the loader's checkpoint interface (nothing to remember)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def stage_steps(size: Size, stage, device: str, steps: int = 3) -> dict:
    """`steps` optimizer steps of one stage at its per-GPU micro-batch, by the training loop itself
    (microdit.training.loop.StageRun: setup, train_step, optimizer_step, update_ema) on random batches of
    the stage's shapes; peak memory against the planner's estimate of the same one-GPU run."""
    from .memory import Workload, estimate
    from .training import distributed as dist_utils
    res = int(stage.resolution * size.resolution_scale)
    micro = size.micro_batch or stage.micro_batch_size or stage.batch_size // 8
    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage.replace(preset=size.preset, resolution=res, data=[], val_data="", batch_size=micro,
                            micro_batch_size=micro, strategy="ddp", compile=size.compile, steps=steps,
                            checkpoint_every=0, sample_every=0, progress=False, out_dir=str(Path(tmp) / stage.name))
        run = RandomBatchRun(cfg, dist_utils.DistContext(device=torch.device(device)), size.caption_len,
                             size.caption_channels, steps)
        run.setup()
        run.resume()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        batches, losses, dt = iter(run.loader), [], 0.0
        run.wrapped.train()
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(run.train_step(batches))               # .item(): synchronises
            run.optimizer_step()
            run.update_ema()
            dt = time.perf_counter() - t0
        run.monitor.close()
        model_cfg = run.model.config
        peak_gib = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
        del run, batches
    torch._dynamo.reset()                                          # next stage: new shapes, fresh graphs
    w = Workload(preset=size.preset, resolution=res, caption_len=size.caption_len,
                 caption_channels=size.caption_channels, pos_interp_scale=stage.pos_interp_scale,
                 micro_batch=micro, mask_ratio=stage.mask_ratio, bf16=device == "cuda",
                 activation_checkpointing=stage.activation_checkpointing)
    out = {"micro_batch": micro, "resolution": res, "step_s": dt, "loss": losses[-1],
           "estimate_gib": estimate(w, 1, "single", ema=stage.ema_decay > 0)["total"] / GIB}
    if device == "cuda":
        torch.cuda.empty_cache()
        out["peak_gib"] = peak_gib
        out["peak_over_estimate"] = peak_gib / out["estimate_gib"]
        peak = peak_bf16_flops(torch.cuda.get_device_name())
        flops = train_step_flops(model_cfg, micro, stage.mask_ratio, size.caption_len)
        out["tflops_per_s"] = flops / dt / 1e12
        out["mfu"] = flops / dt / peak if peak else None
    return out


def mfu_row(stage1: dict | None, device: str) -> dict:
    if device != "cuda":
        raise Skip("no GPU: no peak FLOP/s to compare with")
    if stage1 is None:
        raise Skip("the stage-1 row did not run")
    if stage1.get("mfu") is None:
        raise Skip(f"unknown GPU peak (known: {', '.join(PEAK_BF16_FLOPS)})")
    return {"mfu": stage1["mfu"], "tflops_per_s": stage1["tflops_per_s"], "step_s": stage1["step_s"],
            "flops": "forward (estimate_flops) + backward as 2x forward", "ok": True}


def bf16_vs_fp32(size: Size, device: str) -> dict:
    stage = PAPER_STAGES[0]
    model, lat = _stage_model(size, stage, device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():                      # fresh weights leave the output layer at zero: move every weight
        for p in model.parameters():
            p.add_(torch.randn(p.shape, device=device, generator=g) * 0.02)
    x = torch.randn(4, 4, lat, lat, device=device, generator=g)
    y = torch.randn(4, size.caption_len, size.caption_channels, device=device, generator=g)

    def loss(bf16: bool) -> float:
        gen = torch.Generator(device).manual_seed(1)
        with torch.no_grad(), (_autocast(device) if bf16 else torch.autocast(device, enabled=False)):
            return float(edm_loss(model, x, y, EDMConfig(), mask_ratio=stage.mask_ratio, generator=gen,
                                  patch_size=model.patch_size))
    l32, l16 = loss(False), loss(True)
    rel = abs(l16 - l32) / abs(l32)
    return {"loss_fp32": l32, "loss_bf16": l16, "relative_difference": rel, "ok": rel <= 0.02}


def sharded_checkpoint(size: Size, device: str) -> dict:
    """One step of stage 3 (EMA kept), the loop's sharded asynchronous checkpoint, and a resume from it
    into a fresh StageRun: model, optimizer moments, EMA and step equal."""
    from .training import distributed as dist_utils
    stage = PAPER_STAGES[2]
    res = int(stage.resolution * size.resolution_scale)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = stage.replace(preset=size.preset, resolution=res, data=[], val_data="", batch_size=2,
                            micro_batch_size=2, strategy="ddp", compile=False, steps=1, checkpoint_every=0,
                            sample_every=0, progress=False, out_dir=str(Path(tmp) / stage.name))
        ctx = dist_utils.DistContext(device=torch.device(device))

        def started() -> RandomBatchRun:
            run = RandomBatchRun(cfg, ctx, size.caption_len, size.caption_channels, 1)
            run.setup()
            run.resume()
            return run
        run = started()
        run.train_step(iter(run.loader))
        run.optimizer_step()
        run.update_ema()
        run.step = 1
        t0 = time.perf_counter()
        run.save_checkpoint()
        blocked_s = time.perf_counter() - t0
        folder = run.writer.wait()
        total_s = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        run.monitor.close()
        fresh = started()                                          # resumes from the checkpoint just written
        fresh.monitor.close()
        same = {"model_equal": _equal(run.model.state_dict(), fresh.model.state_dict()),
                "optimizer_equal": _equal(*(r.optimizer.state_dict()["state"] for r in (run, fresh))),
                "ema_equal": _equal(run.ema.shadow, fresh.ema.shadow), "step_equal": fresh.step == 1,
                "ema_on_device": all(v.device.type == device for v in fresh.ema.shadow.values())}
    return {"gb": nbytes / 1e9, "save_blocked_s": blocked_s, "save_total_s": total_s, **same,
            "ok": all(same.values())}


def _equal(a: dict, b: dict) -> bool:
    flat_a, flat_b = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(flat_a) == len(flat_b) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b))


def vae_encode(size: Size, device: str) -> dict:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(**size.vae).to(device, torch.bfloat16).eval()
    images = torch.rand(size.vae_batch, 3, size.vae_res, size.vae_res, device=device, dtype=torch.bfloat16) * 2 - 1
    with torch.inference_mode():
        vae.encode(images[:1])                                   # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    f = 2 ** (len(size.vae["block_out_channels"]) - 1)
    shape_ok = tuple(z.shape) == (size.vae_batch, 4, size.vae_res // f, size.vae_res // f)
    return {"latents": list(z.shape), "dtype": str(z.dtype).replace("torch.", ""), "images_per_s": size.vae_batch / dt,
            "ok": shape_ok and bool(torch.isfinite(z).all())}


def run(device: str, compile: bool = True, stages: str = "1,2,3,4") -> list[dict]:
    size = GPU if device == "cuda" else CPU
    size = Size(**{**size.__dict__, "compile": size.compile and compile})
    chosen = [s for i, s in enumerate(PAPER_STAGES, 1) if str(i) in stages.split(",")]
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check = Check()
    results = {s.name: check.row(f"{s.name} step", stage_steps, size, s, device) for s in chosen}
    check.row("stage1 MFU", mfu_row, results.get("stage1"), device)
    check.row("bf16 vs fp32 loss", bf16_vs_fp32, size, device)
    check.row("sharded checkpoint", sharded_checkpoint, size, device)
    check.row("SDXL-VAE encode bf16", vae_encode, size, device)
    return check.rows


def print_rows(rows: list[dict]) -> None:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    for r in rows:
        detail = ", ".join(f"{k}={fmt(v)}" for k, v in r.items() if k not in ("check", "status"))
        print(f"  {r['check']:<22} {r['status']:<8} {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microdit.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="runs/gpu_check.json", help="JSON file of the table")
    ap.add_argument("--no-compile", action="store_true", help="eager steps (when compiling XL takes too long)")
    ap.add_argument("--stages", default="1,2,3,4", help="paper stages to step through (comma list)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run on a GPU machine, or --device cpu for the toy-size CPU check", file=sys.stderr)
        return 2
    rows = run(args.device, compile=not args.no_compile, stages=args.stages)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (toy size)"
    print(f"GPU check on {name}, torch {torch.__version__}")
    print_rows(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"written: {out}")
    return 0 if all(r["status"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    run_cli(main)
