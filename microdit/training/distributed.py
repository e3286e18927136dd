"""Data-parallel training on existing engines: torchrun (DDP or FSDP2) on one or many nodes, or Ray Train.

    # one node, 8 GPUs (FSDP2, parameters kept whole between forward and backward like the release's
    # SHARD_GRAD_OP; bf16 all-gathers, fp32 gradient reduction):
    torchrun --standalone --nproc_per_node=8 -m microdit.training --recipe paper --stage 1 --data ...
    # several nodes (run on each node, same rendezvous endpoint):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 -m microdit.training ...
    # on the Ray cluster precompute uses: python -m microdit.training ... --ray-workers 32 --ray-gpu

`setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group
(nccl on GPUs, gloo on CPUs) unless a launcher (Ray Train) already did, plus a gloo group of its own for
checkpoint writes that run in a background thread beside training's collectives.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0                 # global rank
    world_size: int = 1           # number of processes
    local_rank: int = 0           # rank on this node (GPU index)
    device: torch.device = torch.device("cpu")
    owns_group: bool = False      # this module started the process group (and ends it)
    checkpoint_group: object = None  # gloo group for checkpoint I/O (None: one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns,
                           checkpoint_group=dist.new_group(backend="gloo"))
    return DistContext(device=device)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, ctx: DistContext, compile: bool = False,
         precision: str = "fp32") -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard`) on each transformer block and the root; then optional torch.compile.

    FSDP2 shards parameters, gradients and optimizer state in place (`model` itself becomes the sharded
    module; parameter names do not change). Blocks keep their parameters whole between forward and
    backward (reshard_after_forward=False, the release's SHARD_GRAD_OP). On CUDA with precision "bf16"
    parameters are all-gathered in bf16 and gradients reduced in fp32; on CPU everything stays fp32.
    """
    if ctx.world_size > 1:
        if strategy == "fsdp":
            shard(model, ctx, precision)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def shard(model: torch.nn.Module, ctx: DistContext, precision: str = "fp32") -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if ctx.device.type == "cuda" and precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps (all but the last)."""
    inner = getattr(model, "_orig_mod", model)
    if not skip:
        yield
    elif is_sharded(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif hasattr(inner, "no_sync"):
        with inner.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Scale the gradients so that their norm over all ranks' shards is at most max_norm (0 = only
    measure); return that global norm, the same number on every rank."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    full = getattr(norm, "full_tensor", None)           # a DTensor under FSDP2: reduce the partial norms
    return float((full() if full is not None else norm).item())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the tensor itself when it is not sharded)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered when sharded: collective)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def all_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's decision, on every rank (stop requests must be taken together)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def replica_checksums(model: torch.nn.Module, ctx: DistContext) -> list[float] | None:
    """Every rank's weight checksum (data-parallel replicas must agree; raise if they do not)."""
    if ctx.world_size == 1:
        return None
    with torch.no_grad():
        mine = float(sum((p.double() * (i + 1)).sum().item() for i, p in enumerate(model.parameters())))
    sums = gather_objects(mine)
    if len(set(sums)) != 1:
        raise RuntimeError(f"data-parallel replicas disagree after training: weight checksums {sums}")
    return sums
