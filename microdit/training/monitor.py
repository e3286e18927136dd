"""What a user watches: a tqdm bar (samples/s, ETA), TensorBoard scalars, metrics.jsonl, sample grids.

    tensorboard --logdir runs/cpu          # loss, lr, grad_norm, samples_per_s of every stage
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..edm import EDMConfig


class Monitor:
    """Rank-0 logging of one stage; every method is a no-op on other ranks."""

    def __init__(self, out_dir, total_steps: int, start_step: int, batch_size: int, name: str,
                 enabled: bool = True, progress: bool = True):
        self.enabled, self.batch_size = enabled, batch_size
        self.out = Path(out_dir)
        self.metrics_path = self.out / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:          # pragma: no cover
            warnings.warn("tensorboard is not installed: no TensorBoard scalars")
        self._f = open(self.metrics_path, "a")

    def step(self, step: int, loss: float, lr: float, grad_norm: float, samples_per_s: float, log: bool) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.0f}")
        if self.tb is not None and log:
            for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        if self.enabled and self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, step: int, tag: str, grid) -> None:
        """A PIL image into TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self._f.close()


def sample_captions(cfg, schema, n: int) -> tuple[torch.Tensor, list[str]] | None:
    """Caption embeddings for the sample grids: cfg.sample_prompts (encoded), else held-out captions."""
    if cfg.sample_prompts:
        from ..encoders import MissingWeightsError, load_text_encoder
        try:
            te = load_text_encoder(schema.text_encoder)
        except MissingWeightsError as e:
            warnings.warn(f"sample prompts cannot be encoded here: {e}")
            return None
        prompts = list(cfg.sample_prompts)[:n]
        with torch.inference_mode():
            return te.encode(prompts).float(), prompts
    from ..data import LatentSet
    ds = LatentSet(cfg.val_data or cfg.data[0], cfg.resolution, cache_dir=cfg.cache_dir())
    b = ds.batch(range(min(n, len(ds))))
    return b["caption"], b["caption_text"]


def sample_grid(model, captions: torch.Tensor, latent_shape, image_autoencoder: str, edm: EDMConfig,
                num_steps: int = 20, guidance_scale: float = 5.0, seed: int = 0):
    """One image per caption embedding, in a near-square PIL grid (None when the image autoencoder's
    weights are not available here). The noise comes from one generator seeded with `seed`."""
    from ..encoders import MissingWeightsError, load_image_autoencoder
    from ..sampling import decode_images, image_grid, sample_latents
    try:
        ae = load_image_autoencoder(image_autoencoder)
    except MissingWeightsError as e:
        warnings.warn(f"no sample grids: {e}")
        return None
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((captions.shape[0], *latent_shape), generator=gen, device=device)
    images = decode_images(ae, sample_latents(model, noise, captions, num_steps, guidance_scale, edm))
    return image_grid(images, columns=int(max(1, round(captions.shape[0] ** 0.5))), padding=1)
