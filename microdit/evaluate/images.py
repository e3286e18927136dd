"""Image generation for evaluation: `ImageGenerator` (over `microdit.pipeline`) and a resumable image store.

Every image has its own seed (its initial noise comes from `torch.Generator().manual_seed(seed)`), so an
image does not depend on which batch it was generated in: a rerun regenerates only the missing files and
gets the images an uninterrupted run would have made.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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


def save_png(image: Image.Image, path: Path) -> None:
    """Write then rename: a killed run never leaves a half-written image behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


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
                save_png(im, job.path)
            bar.update(len(batch))
    return len(todo)


def load_images(jobs: list[Job]) -> list[Image.Image]:
    out = []
    for j in jobs:
        with Image.open(j.path) as im:
            out.append(im.convert("RGB"))
    return out


def image_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 8, cell: int = 96) -> Image.Image:
    """A contact sheet (nearest-neighbour upscaled cells, optional caption under each) for a person to look at."""
    from PIL import ImageDraw
    rows = max(1, -(-len(images) // cols))
    text_h = 36 if captions else 0
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if captions:
            words, lines, line = captions[i].replace("a photo of ", "").split(), [], ""
            for w in words:
                if len(line) + len(w) + 1 > cell // 6:
                    lines.append(line)
                    line = w
                else:
                    line = f"{line} {w}".strip()
            draw.multiline_text((x + 2, y + cell), "\n".join((lines + [line])[:3]), fill=(0, 0, 0), spacing=0)
    return sheet


def seed_for(base_seed: int, *keys: int) -> int:
    """Seed of one image, e.g. seed_for(seed, suite_id, prompt_index, image_index): distinct per key tuple."""
    return int(np.random.SeedSequence([base_seed, *keys]).generate_state(1)[0])
