"""Optimisation: AdamW with the MoE experts and routers at a reduced learning rate, schedules, EMA.

The release meant to train the MoE parameters at half the learning rate but its name filter never
matched them; here the groups come from `model.moe_parameter_names()` (names of the unwrapped model).
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, cfg: TrainConfig, moe_names: set[str]) -> list[dict]:
    """Two AdamW groups: dense parameters at cfg.lr, expert + router parameters at cfg.lr * moe_lr_scale.

    Parameter names may carry a wrapper prefix (DDP `module.`, FSDP, torch.compile `_orig_mod.`).
    """
    dense, moe = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = _strip_wrappers(name)
        (moe if bare in moe_names else dense).append(p)
    found = sum(1 for n, _ in model.named_parameters() if _strip_wrappers(n) in moe_names)
    if found != len(moe_names):
        raise RuntimeError(f"{len(moe_names)} MoE parameter names but {found} found in the model: "
                           "the wrapper renamed them; check _strip_wrappers")
    groups = [{"params": dense, "lr": cfg.lr, "base_lr": cfg.lr, "name": "dense"}]
    if moe:
        lr = cfg.lr * cfg.moe_lr_scale
        groups.append({"params": moe, "lr": lr, "base_lr": lr, "name": "moe"})
    return groups


def _strip_wrappers(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, moe_names: set[str]) -> torch.optim.AdamW:
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg, moe_names), lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warm-up over cfg.warmup_steps; then constant, or cosine from 1 to cfg.final_lr_fraction
    at the last step of the stage.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.final_lr_fraction
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


class EMA:
    """Exponential moving average of the parameters (buffers copied): ema = d * ema + (1 - d) * param.

    The average lives where the parameters live: on their device, and under FSDP2 as the same shards
    (each rank averages its own shard, nothing is gathered); exports assemble the whole weights.
    Build it from the model after `distributed.wrap` (FSDP2 shards the parameters in place); a
    checkpoint saves and loads `shadow` in place (sharded), so it never leaves that device.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {_strip_wrappers(k): v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """`model` may be wrapped (names are stripped of wrapper prefixes)."""
        from .distributed import local
        params = [(_strip_wrappers(n), p) for n, p in model.named_parameters()]
        torch._foreach_lerp_([local(self.shadow[n]) for n, _ in params],
                             [local(p.detach()).float() for _, p in params], 1 - self.decay)
        for name, b in model.named_buffers():
            local(self.shadow[_strip_wrappers(name)]).copy_(local(b))
