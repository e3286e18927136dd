"""Text-to-image generation with a trained MicroDiT: prompts -> caption embeddings -> EDM Heun sampling -> images
(`microdit.sampling`, the sampling path training and evaluation share).

    from microdit.pipeline import MicroDiTPipeline
    pipe = MicroDiTPipeline.from_pretrained("checkpoints/stage4")            # our folder, a hub id, or a release .pt
    images = pipe.generate(["a red cube left of a blue sphere"], seed=0)     # list of PIL images

The encoders come from the checkpoint's config (release `.pt` files: SDXL VAE (or Ostris for 16 channels) and
the DFN5B CLIP text tower, 512 px); pass `image_autoencoder=` / `text_encoder=` to override. Noise is drawn per
image from (seed, image index), so a result depends on the seed and the prompt's position, not on batch size.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .edm import EDMConfig
from .encoders import load_image_autoencoder, load_text_encoder
from .sampling import decode_images, sample_latents


def image_noise(seed: int, index: int, shape: tuple) -> torch.Tensor:
    """Unit Gaussian latents of image `index` under `seed` (drawn on the CPU: identical on every device)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return torch.randn(shape, generator=g)


class MicroDiTPipeline:
    def __init__(self, model, image_autoencoder, text_encoder, meta: dict | None = None, device="cpu",
                 edm: EDMConfig | None = None):
        meta = meta or {}
        cfg = model.config
        if text_encoder.dim != cfg.caption_channels:
            raise ValueError(f"text encoder {text_encoder.name!r} gives {text_encoder.dim}-wide embeddings but the "
                             f"model expects caption_channels={cfg.caption_channels}: pass the encoder it was trained with")
        if image_autoencoder.latent_channels != cfg.in_channels:
            raise ValueError(f"image autoencoder {image_autoencoder.name!r} has {image_autoencoder.latent_channels} "
                             f"latent channels but the model expects in_channels={cfg.in_channels}")
        self.model, self.image_autoencoder, self.text_encoder = model.eval(), image_autoencoder, text_encoder
        self.meta, self.device = meta, torch.device(device)
        self.edm = edm or EDMConfig(**meta.get("edm", {}))
        self.last_seed: int | None = None

    @classmethod
    def from_pretrained(cls, path: str, image_autoencoder: str | None = None, text_encoder: str | None = None,
                        device="cpu", dtype=torch.float32, preset: str | None = None) -> "MicroDiTPipeline":
        """Our folder (local or hub id) or a released `.pt`; encoder names default to the checkpoint's."""
        model, meta = load_model(path, preset=preset, device=device, dtype=dtype,
                                 image_autoencoder=image_autoencoder, text_encoder=text_encoder)
        enc_dtype = dtype if torch.device(device).type == "cuda" else torch.float32
        ae = load_image_autoencoder(meta["image_autoencoder"], device=device, dtype=enc_dtype)
        te = load_text_encoder(meta["text_encoder"], device=device, dtype=enc_dtype)
        return cls(model, ae, te, meta, device)

    @property
    def latent_shape(self) -> tuple:
        c = self.model.config
        return (c.in_channels, c.latent_res, c.latent_res)

    @property
    def resolution(self) -> int:
        return self.model.config.latent_res * self.image_autoencoder.downsample

    @torch.inference_mode()
    def generate_latents(self, prompts: list[str] | str, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                         seed: int | None = None, images_per_prompt: int = 1, batch_size: int = 8,
                         progress: bool = True, noise_seeds: list[int] | None = None) -> torch.Tensor:
        """Sampled latents (len(prompts) * images_per_prompt, C, h, w), prompt-major, float32 on the CPU.

        noise_seeds (optional, one per image): image k's noise is torch.randn from
        torch.Generator().manual_seed(noise_seeds[k]) instead of from (seed, k) (evaluation uses this).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or images_per_prompt < 1 or batch_size < 1 or num_inference_steps < 1:
            raise ValueError("need at least one prompt, images_per_prompt >= 1, batch_size >= 1 and steps >= 1")
        seed = random.SystemRandom().randrange(2 ** 31) if seed is None else int(seed)
        self.last_seed = seed
        jobs = [(i, p) for i, p in enumerate(p for p in prompts for _ in range(images_per_prompt))]
        if noise_seeds is not None and len(noise_seeds) != len(jobs):
            raise ValueError(f"noise_seeds: expected one per image ({len(jobs)}), got {len(noise_seeds)}")

        def noise_of(i):
            if noise_seeds is None:
                return image_noise(seed, i, self.latent_shape)
            return torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(noise_seeds[i])))
        batches = [jobs[k:k + batch_size] for k in range(0, len(jobs), batch_size)]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(batches) * num_inference_steps, desc="sampling", unit="step")
        out = []
        for batch in batches:
            y = self.text_encoder.encode([p for _, p in batch])
            noise = torch.stack([noise_of(i) for i, _ in batch])
            step = (lambda it: _ticks(it, bar)) if bar is not None else None
            out.append(sample_latents(self.model, noise, y, num_inference_steps, guidance_scale, self.edm, step).cpu())
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        return decode_images(self.image_autoencoder, latents, batch_size)

    def generate(self, prompts: list[str] | str, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 seed: int | None = None, images_per_prompt: int = 1, batch_size: int = 8,
                 progress: bool = True, noise_seeds: list[int] | None = None) -> list[Image.Image]:
        """PIL images, prompt-major: [p0 img0, p0 img1, ..., p1 img0, ...]."""
        latents = self.generate_latents(prompts, num_inference_steps, guidance_scale, seed, images_per_prompt,
                                        batch_size, progress, noise_seeds)
        return self.decode(latents, batch_size)


def _ticks(it, bar):
    for i in it:
        yield i
        bar.update(1)

