"""Memory planner: estimated peak GPU memory per rank of each training stage, without a GPU.

    python -m microdit.bench memory --recipe paper --gpu-memory 80       # table; exit 1 if a stage does not fit
    python -m microdit.memory calibrate --batch 2                        # planner vs a real CPU forward of XL

Estimate = sharded training state (analytic) + parameters gathered for compute (analytic) + the peak of
live tensors in one forward + backward of the real model on fake tensors (`LiveBytes`; no memory is
allocated) under CUDA's bf16 autocast rules (microdit.cuda_rules), at the stage's per-rank micro-batch,
mask ratio, resolution and activation checkpointing.

Assumptions (FSDP2 as microdit.training.distributed sets it up: `fully_shard` on each backbone block
with reshard_after_forward=False, the release's SHARD_GRAD_OP, and on the root; W ranks):
- sharded fp32 parameters, fp32 gradients and AdamW's two fp32 moments: 16 bytes x P / W; an fp32 EMA
  copy where the stage keeps one, sharded like the parameters: 4 x P / W;
- compute parameters are bf16 all-gathers that stay gathered from forward into backward: 2 x P at the
  start of backward; gradients are reduce-scattered in fp32 after each block's backward (two blocks'
  fp32 buffers in flight) and the unsharded bf16 gradients freed; with gradient accumulation the
  micro-steps before the last skip that sync and FSDP2 keeps the unsharded gradients in fp32: 4 x P;
- with `strategy="ddp"`: full fp32 parameters, gradients, AdamW moments and DDP's fp32 gradient buckets
  on every rank, and autocast's bf16 weight copies (counted by the fake run); "single": the same on one
  unwrapped GPU without the buckets (microdit.gpu_check);
- `compile`: the eager graph is measured (inductor's partitioner saves no more than eager for this
  model; the GPU check compares). The CUDA context (~0.5 GiB) and allocator fragmentation are not counted:
  a stage fits when its estimate <= headroom x GPU memory (0.9 x 80 = 72 GiB).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .cli import run_cli
from .cuda_rules import cpu_autocast_like_cuda, cuda_rules_on_cpu, fake_tensors, to_fake
from .edm import EDMConfig, edm_loss
from .model import DiTBlock, create_model

GIB = 2 ** 30


@dataclass
class Workload:
    """What one rank computes in one micro-step (the planner's input, from a TrainConfig)."""
    preset: str = "MicroDiT_XL_2"
    resolution: int = 256             # image pixels; latents are resolution / downsample
    downsample: int = 8               # VAE downsampling (SDXL VAE: 8)
    latent_channels: int = 4
    caption_len: int = 77
    caption_channels: int = 1024
    pos_interp_scale: float = 1.0
    micro_batch: int = 256
    mask_ratio: float = 0.0
    bf16: bool = True
    activation_checkpointing: bool = False
    model_overrides: dict | None = None


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive: each op's new output storages are added, and removed when they die.

    Storages that exist before the mode is entered (parameters, buffers) are not counted. `peak` is the
    maximum over the run; `mark(name)` records the live bytes at a point (e.g. the end of forward)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.marks: dict[str, int] = {}
        self._seen: set[int] = set()
        self._foreign: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:           # storages made before (parameters): not counted,
            if isinstance(t, torch.Tensor):                   # nor their views
                st = t.untyped_storage()
                if id(st) not in self._seen and id(st) not in self._foreign:
                    self._foreign.add(id(st))
                    weakref.finalize(st, self._foreign.discard, id(st))
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = id(st)
                if key not in self._seen and key not in self._foreign:
                    self._seen.add(key)
                    nbytes = st.nbytes()
                    self.live += nbytes
                    weakref.finalize(st, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out

    def mark(self, name: str) -> None:
        self.marks[name] = self.live


def build_meta_model(w: Workload):
    with torch.device("meta"):
        model = create_model(w.preset, latent_res=w.resolution // w.downsample, in_channels=w.latent_channels,
                             caption_channels=w.caption_channels, pos_interp_scale=w.pos_interp_scale,
                             **(w.model_overrides or {}))
    model.activation_checkpointing = w.activation_checkpointing
    return model


def measure_step(w: Workload, free_grads: bool = True, param_dtype: torch.dtype | None = None) -> dict:
    """Live-byte peak of one forward + backward on fake CPU tensors under CUDA's autocast rules.

    `free_grads` drops each gradient once it is accumulated (FSDP2 reduce-scatters and frees it)."""
    model = build_meta_model(w).train()
    if param_dtype is None:
        param_dtype = torch.bfloat16 if w.bf16 else torch.float32
    lat = w.resolution // w.downsample
    with fake_tensors("cpu"):
        to_fake(model, "cpu", param_dtype)
        if free_grads:
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        with LiveBytes() as mem, cuda_rules_on_cpu():
            x = torch.randn(w.micro_batch, w.latent_channels, lat, lat)
            y = torch.randn(w.micro_batch, w.caption_len, w.caption_channels)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=w.bf16):
                loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=w.mask_ratio, patch_size=model.patch_size)
            mem.mark("forward")
            loss.backward()
            del loss, x, y
            mem.mark("end")
    return {"peak": mem.peak, "after_forward": mem.marks["forward"], "end": mem.marks["end"]}


def parameter_counts(w: Workload) -> tuple[int, int, int]:
    """(all parameters, parameters of the largest block, parameters outside the blocks)."""
    model = build_meta_model(w)
    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = model.num_params()
    return total, max(sizes), total - sum(sizes)


def estimate(w: Workload, world_size: int = 8, strategy: str = "fsdp", ema: bool = False,
             accumulation: int = 1) -> dict:
    """Estimated peak bytes per rank, split into its parts."""
    P, block, root = parameter_counts(w)
    if strategy == "fsdp":
        states = 16 * P / world_size + (4 * P / world_size if ema else 0)
        states += 4 * P if accumulation > 1 else 0                    # unsynced fp32 gradients between micro-steps
        gathered = (2 if w.bf16 else 4) * P + 4 * 2 * block
        run = measure_step(w, free_grads=True)
    else:                                                           # "ddp", or "single" (one unwrapped GPU)
        buckets = 4 * P if strategy == "ddp" else 0
        states = 4 * P + 8 * P + buckets + (4 * P if ema else 0)     # params, AdamW, DDP buckets, EMA
        gathered = 0
        run = measure_step(w, free_grads=False, param_dtype=torch.float32)
    total = states + gathered + run["peak"]
    return {"params": P, "states": states, "gathered": gathered, "activations": run["peak"],
            "after_forward": run["after_forward"], "total": total}


def workload_of(cfg, world_size: int, latent_channels: int = 4, downsample: int = 8, caption_len: int = 77,
                caption_channels: int = 1024) -> tuple[Workload, int]:
    """The Workload of a TrainConfig on `world_size` ranks, and its gradient-accumulation steps."""
    from .training.config import batch_split
    micro, accum = batch_split(cfg, world_size)
    return Workload(preset=cfg.preset, resolution=cfg.resolution, downsample=downsample,
                    latent_channels=latent_channels, caption_len=caption_len, caption_channels=caption_channels,
                    pos_interp_scale=cfg.pos_interp_scale, micro_batch=micro, mask_ratio=cfg.mask_ratio,
                    bf16=cfg.precision == "bf16", activation_checkpointing=cfg.activation_checkpointing,
                    model_overrides=cfg.model_overrides or None), accum


def plan(stages, world_size: int = 8, gpu_memory_gib: float = 80.0, headroom: float = 0.9) -> list[dict]:
    rows = []
    for cfg in stages:
        w, accum = workload_of(cfg, world_size)
        est = estimate(w, world_size, cfg.strategy, ema=cfg.ema_decay > 0, accumulation=accum)
        rows.append({"stage": cfg.name, "resolution": cfg.resolution, "mask_ratio": cfg.mask_ratio,
                     "micro_batch": w.micro_batch, "accumulation": accum,
                     "activation_checkpointing": cfg.activation_checkpointing, "compile": cfg.compile,
                     "ema": cfg.ema_decay > 0, "states_gib": est["states"] / GIB,
                     "gathered_gib": est["gathered"] / GIB, "activations_gib": est["activations"] / GIB,
                     "estimate_gib": est["total"] / GIB, "limit_gib": headroom * gpu_memory_gib,
                     "fits": est["total"] / GIB <= headroom * gpu_memory_gib})
    return rows


def print_plan(rows: list[dict], world_size: int, gpu_memory_gib: float) -> None:
    print(f"estimated peak memory per GPU, {world_size} GPUs, {gpu_memory_gib:g} GiB each "
          f"(fits: estimate <= {rows[0]['limit_gib']:.1f} GiB)")
    head = ["stage", "res", "mask", "micro", "accum", "ckpt", "compile", "EMA", "states", "gathered",
            "activations", "estimate GiB", "fits"]
    cells = [head] + [[r["stage"], r["resolution"], r["mask_ratio"], r["micro_batch"], r["accumulation"],
                       "yes" if r["activation_checkpointing"] else "no", "yes" if r["compile"] else "no",
                       "yes" if r["ema"] else "no", f"{r['states_gib']:.1f}", f"{r['gathered_gib']:.1f}",
                       f"{r['activations_gib']:.1f}", f"{r['estimate_gib']:.1f}", "yes" if r["fits"] else "NO"]
                      for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    for k, c in enumerate(cells):
        print("  " + "  ".join(str(v).rjust(wd) for v, wd in zip(c, widths)))
        if k == 0:
            print("  " + "  ".join("-" * wd for wd in widths))


# --------------------------------------------------------------------------------------------
#                          Calibration against a real CPU forward
# --------------------------------------------------------------------------------------------

def saved_activation_bytes(w: Workload, seed: int = 0) -> int:
    """Bytes of the distinct storages autograd saves for backward in one real CPU forward (no parameters).

    The model is built on "meta" and materialised in the compute dtype (XL in bf16: 2.3 GB)."""
    model = build_meta_model(w).train()
    dtype = torch.bfloat16 if w.bf16 else torch.float32
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, b in model.named_buffers():
            b.zero_()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    keep = []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
            keep.append(t)                       # hold it: a freed address could be reused by another
        return t

    lat = w.resolution // w.downsample
    x = torch.randn(w.micro_batch, w.latent_channels, lat, lat, generator=g)
    y = torch.randn(w.micro_batch, w.caption_len, w.caption_channels, generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with cpu_autocast_like_cuda(torch.bfloat16) if w.bf16 else contextlib.nullcontext():
            loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=w.mask_ratio, patch_size=model.patch_size)
    del loss, keep
    return sum(saved.values())


def calibrate(w: Workload) -> dict:
    real = saved_activation_bytes(w)
    fake = measure_step(w, free_grads=True)["after_forward"]
    return {"real_saved_bytes": real, "planner_after_forward_bytes": fake, "ratio": fake / real}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microdit.memory", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="per-stage estimate of a recipe")
    p.add_argument("--recipe", default="paper")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU")
    p.add_argument("--gpus", type=int, default=8, help="ranks (GPUs) sharing the global batch")
    p.add_argument("--headroom", type=float, default=0.9, help="fraction of the GPU memory the estimate may use")
    c = sub.add_parser("calibrate", help="planner vs saved activations of a real CPU forward")
    c.add_argument("--preset", default="MicroDiT_XL_2")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--resolution", type=int, default=256)
    c.add_argument("--mask-ratio", type=float, default=0.75)
    c.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 under CUDA's rules (2x memory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "calibrate":
        w = Workload(preset=args.preset, resolution=args.resolution, micro_batch=args.batch,
                     mask_ratio=args.mask_ratio, bf16=not args.fp32)
        r = calibrate(w)
        print(f"{args.preset}, {args.resolution} px, batch {args.batch}, mask {args.mask_ratio}, "
              f"{'fp32' if args.fp32 else 'bf16 (CUDA rules)'}: real CPU forward saves "
              f"{r['real_saved_bytes'] / GIB:.3f} GiB; planner live after forward "
              f"{r['planner_after_forward_bytes'] / GIB:.3f} GiB; ratio {r['ratio']:.3f}")
        return 0
    from .training.config import STAGES
    if args.recipe not in STAGES:
        print(f"--recipe {args.recipe!r}: choose one of {sorted(STAGES)}", file=sys.stderr)
        return 2
    rows = plan(STAGES[args.recipe], args.gpus, args.gpu_memory, args.headroom)
    print_plan(rows, args.gpus, args.gpu_memory)
    bad = [r["stage"] for r in rows if not r["fits"]]
    if bad:
        print(f"does not fit: {', '.join(bad)} (lower micro_batch_size or turn on activation_checkpointing)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
