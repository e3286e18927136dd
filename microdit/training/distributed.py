"""Data-parallel training on existing engines: torchrun (DDP or FSDP) on one or many nodes, or Ray Train.

    # one node, 8 GPUs (FSDP SHARD_GRAD_OP, like the release):
    torchrun --standalone --nproc_per_node=8 -m microdit.training --recipe paper --stage 1 --data ...
    # several nodes (run on each node, same rendezvous endpoint):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 -m microdit.training ...
    # on the Ray cluster precompute uses: python -m microdit.training ... --ray-workers 32 --ray-gpu

`setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the process group
(nccl on GPUs, gloo on CPUs) unless a launcher (Ray Train) already did.
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
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    return DistContext(device=device)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, ctx: DistContext, compile: bool = False) -> torch.nn.Module:
    """DDP, or FSDP with SHARD_GRAD_OP (gradients and optimizer state sharded, parameters kept whole
    between forward and backward) wrapping each transformer block; then optional torch.compile."""
    if ctx.world_size > 1:
        if strategy == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            from ..model import DiTBlock
            model = FSDP(model, sharding_strategy=ShardingStrategy.SHARD_GRAD_OP, use_orig_params=True,
                         auto_wrap_policy=ModuleWrapPolicy({DiTBlock}),
                         device_id=ctx.device if ctx.device.type == "cuda" else None)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""
    inner = getattr(model, "_orig_mod", model)
    if skip and hasattr(inner, "no_sync"):
        return inner.no_sync()
    return nullcontext()


@contextmanager
def full_params(model: torch.nn.Module):
    """Whole (unsharded) parameters inside the block (FSDP); a no-op otherwise."""
    inner = getattr(model, "_orig_mod", model)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:          # pragma: no cover
        FSDP = None
    if FSDP is not None and isinstance(inner, FSDP):
        with FSDP.summon_full_params(inner, writeback=False):
            yield inner
    else:
        yield inner


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
