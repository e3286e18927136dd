"""EDM diffusion (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Small named pieces, in the paper's symbols: preconditioning (Table 1), the training loss (Eq. 2 with
the lambda(sigma) weight of Table 1), the noise schedule (Eq. 5) and the 2nd-order Heun sampler
(Algorithm 1), plus classifier-free guidance with the all-zero caption as the unconditional branch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class EDMConfig:
    sigma_data: float = 0.9     # data standard deviation the preconditioning assumes
    data_mean: float = 0.0      # value the data is centred on: the preconditioning works on x - data_mean
    P_mean: float = -0.6        # training: ln(sigma) ~ N(P_mean, P_std^2); (-0.6, 1.2) at 256 px, (0, 0.6) at 512
    P_std: float = 1.2
    sigma_min: float = 0.002    # sampler range
    sigma_max: float = 80.0
    rho: float = 7.0            # sampler step spacing exponent

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "EDMConfig":
        """The settings of a checkpoint's `edm` entry: known fields, finite numbers (ValueError otherwise)."""
        if not isinstance(d, dict):
            raise ValueError(f"edm settings must be an object of numbers, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k not in known:
                raise ValueError(f"unknown edm field {k!r} (known: {sorted(known)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"edm.{k} is {v!r}: a finite number is needed")
        return cls(**{k: float(v) for k, v in d.items()})


def precondition(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of EDM Table 1 (sigma shaped to broadcast over the image)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, sigma_data: float = 0.9,
            mask_ratio: float = 0.0, keep_ids: torch.Tensor | None = None, data_mean: float = 0.0) -> torch.Tensor:
    """D(x; sigma) = m + c_skip (x - m) + c_out F(c_in (x - m); c_noise, y) with m = data_mean (EDM's
    preconditioning of data centred on m; m = 0 is Table 1 as printed). sigma: scalar or (N,)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    sigma = sigma.expand(x.shape[0], 1, 1, 1)
    c_skip, c_out, c_in, c_noise = precondition(sigma, sigma_data)
    xc = x - data_mean if data_mean else x
    F_x = model(c_in * xc, c_noise.flatten(), y, mask_ratio=mask_ratio, keep_ids=keep_ids)
    return data_mean + c_skip * xc + c_out * F_x.float()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(n: int, cfg: EDMConfig, device=None, generator=None) -> torch.Tensor:
    return (torch.randn(n, device=device, generator=generator) * cfg.P_std + cfg.P_mean).exp()


def edm_loss(model, x: torch.Tensor, y: torch.Tensor, cfg: EDMConfig, mask_ratio: float = 0.0,
             generator: torch.Generator | None = None, sigma: torch.Tensor | None = None,
             per_sample: bool = False, patch_size: int | None = None) -> torch.Tensor:
    """Weighted denoising loss. With masking, the per-patch loss is averaged over kept patches only.

    `generator` makes sigma, noise and the kept-token draw reproducible (exact resume, validation).
    `patch_size` (the model's) is needed with masking: it turns latents into the model's tokens.
    """
    n, device = x.shape[0], x.device
    if sigma is None:
        sigma = sample_sigma(n, cfg, device, generator)
    sigma = sigma.reshape(n, 1, 1, 1).to(x.dtype)
    noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype) * sigma
    keep_ids = None
    if mask_ratio > 0:
        if not patch_size:
            raise ValueError("edm_loss with mask_ratio > 0 needs the model's patch_size")
        from .model import random_keep_ids
        p = patch_size
        keep_ids = random_keep_ids(n, (x.shape[2] // p) * (x.shape[3] // p), mask_ratio, device, generator)
    D = denoise(model, x + noise, sigma, y, cfg.sigma_data, mask_ratio, keep_ids, cfg.data_mean)
    loss = loss_weight(sigma, cfg.sigma_data) * (D - x) ** 2                   # (N, C, H, W)
    if keep_ids is None:
        per = loss.flatten(1).mean(dim=1)
    else:
        per_patch = F.avg_pool2d(loss.mean(dim=1, keepdim=True), patch_size).flatten(1)        # (N, T)
        per = torch.gather(per_patch, 1, keep_ids).mean(dim=1)
    return per if per_sample else per.mean()


def sigma_steps(num_steps: int, cfg: EDMConfig, device=None) -> torch.Tensor:
    """EDM Eq. 5: sigma_max -> sigma_min spaced by rho, followed by a final 0 (num_steps + 1 values)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    smax, smin, r = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho), cfg.rho
    steps = (smax + i / max(num_steps - 1, 1) * (smin - smax)) ** r
    return torch.cat([steps, torch.zeros_like(steps[:1])])


def guided_denoise(model, x: torch.Tensor, sigma, y: torch.Tensor, guidance_scale: float,
                   sigma_data: float, data_mean: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: u + s (c - u), u from the all-zero caption embedding."""
    if guidance_scale == 1.0:
        return denoise(model, x, sigma, y, sigma_data, data_mean=data_mean)
    both = denoise(model, torch.cat([x, x]), sigma, torch.cat([y, torch.zeros_like(y)]), sigma_data,
                   data_mean=data_mean)
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def heun_sampler(model, noise: torch.Tensor, y: torch.Tensor, num_steps: int = 30, guidance_scale: float = 5.0,
                 cfg: EDMConfig | None = None, progress=None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, S_churn = 0): Euler step + 2nd-order correction except the last.

    noise: unit Gaussian latents (N, C, H, W); returns denoised latents in float32.
    """
    cfg = cfg or EDMConfig()
    t = sigma_steps(num_steps, cfg, noise.device)
    x_next = noise.to(torch.float64) * t[0] + cfg.data_mean
    steps = range(num_steps) if progress is None else progress(range(num_steps))
    for i in steps:
        t_cur, t_next = t[i], t[i + 1]
        x_cur = x_next
        d_cur = (x_cur - guided_denoise(model, x_cur.float(), t_cur, y, guidance_scale, cfg.sigma_data,
                                        cfg.data_mean).double()) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - guided_denoise(model, x_next.float(), t_next, y, guidance_scale,
                                               cfg.sigma_data, cfg.data_mean).double()) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()
