"""Image generation for evaluation: `ImageGenerator` (over `microdit.pipeline`) and a resumable image store.

Every image has its own seed (its initial noise comes from `torch.Generator().manual_seed(seed)`), so an
image does not depend on which batch it was generated in: a rerun regenerates only the missing files and
gets the images an uninterrupted run would have made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..manifest import write_png_atomic


class ImageGenerator:
    """Text -> images with a MicroDiT checkpoint through `microdit.pipeline.MicroDiTPipeline` (caption encoder
    -> EDM Heun sampler with classifier-free guidance -> decoder), one noise seed per image."""

    def __init__(self, checkpoint: str, device: str = "cpu", steps: int = 30, guidance: float = 5.0,
                 image_autoencoder: str | None = None, text_encoder: str | None = None):
        from microdit.pipeline import MicroDiTPipeline
        self.pipe = MicroDiTPipeline.from_pretrained(str(checkpoint), image_autoencoder=image_autoencoder,
                                                     text_encoder=text_encoder, device=device)
        self.steps, self.guidance, self.resolution = steps, guidance, int(self.pipe.resolution)

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per prompt; image k's initial noise is randn from torch.Generator().manual_seed(seeds[k])."""
        return self.pipe.generate(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                                  seed=0, batch_size=len(prompts), progress=False, noise_seeds=list(seeds))


@dataclass
class Job:
    path: Path        # where the PNG goes
    prompt: str
    seed: int


def generate_missing(generator, jobs: list[Job], batch_size: int = 32, desc: str = "generate") -> int:
    """Generate the jobs whose file is missing, in batches; returns how many were generated."""
    from tqdm import tqdm
    todo = [j for j in jobs if not j.path.exists()]
    if not todo:
        return 0
    with tqdm(total=len(todo), desc=desc, unit="img") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            for job, im in zip(batch, generator([j.prompt for j in batch], [j.seed for j in batch])):
                write_png_atomic(job.path, im)   # a killed run never leaves half an image
            bar.update(len(batch))
    return len(todo)


def load_images(jobs: list[Job]) -> list[Image.Image]:
    out = []
    for j in jobs:
        with Image.open(j.path) as im:
            out.append(im.convert("RGB"))
    return out


def seed_for(base_seed: int, *keys: int) -> int:
    """Seed of one image, e.g. seed_for(seed, suite_id, prompt_index, image_index): distinct per key tuple."""
    return int(np.random.SeedSequence([base_seed, *keys]).generate_state(1)[0])
