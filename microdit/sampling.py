"""Sampling a batch: unit-Gaussian noise + caption embeddings -> EDM Heun with classifier-free guidance ->
latents -> images, and the grid that shows them.

    from microdit.sampling import decode_images, image_grid, sample_latents
    latents = sample_latents(model, noise, captions, num_steps=30, guidance_scale=5.0, edm=EDMConfig())
    grid = image_grid(decode_images(image_autoencoder, latents), columns=4)

The one sampling path of the project: the inference pipeline (and through it evaluation), the
training sample grids and the shapes score of validation all call these. How the noise is drawn
(seeded per image, or from one generator) is the caller's choice.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .edm import EDMConfig, heun_sampler


def sample_latents(model, noise: torch.Tensor, captions: torch.Tensor, num_steps: int = 30,
                   guidance_scale: float = 5.0, edm: EDMConfig | None = None, progress=None) -> torch.Tensor:
    """Denoised latents (float32, on the model's device) from `noise` (N, C, h, w) for `captions` (N, L, D).

    The model runs in eval mode under inference_mode and is put back in the mode it was in.
    progress: wraps the step range (e.g. a tqdm updater), as in `heun_sampler`.
    """
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return heun_sampler(model, noise.to(p.device), captions.to(p.device, p.dtype), num_steps,
                                guidance_scale, edm, progress)
    finally:
        model.train(was_training)


@torch.inference_mode()
def decode_images(image_autoencoder, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """Latents -> PIL RGB images through the autoencoder (on its own device), `batch_size` at a time."""
    images = []
    for k in range(0, len(latents), batch_size):
        images += to_pil(image_autoencoder.decode(latents[k:k + batch_size].cpu()))
    return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] (N, 3, H, W) -> PIL RGB."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def enlarge(image: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour upscaling by an integer factor (tiny images stay crisp)."""
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def image_grid(images: list[Image.Image], columns: int, captions: list[str] | None = None, cell: int | None = None,
               padding: int = 0, scale: int = 1) -> Image.Image:
    """Images in rows of `columns` on white: `padding` pixels around each, every cell resized to `cell`
    pixels (nearest) when given, a caption of up to three lines under each when given, the whole sheet
    enlarged by `scale`."""
    w, h = (cell, cell) if cell else images[0].size
    text_h = 36 if captions else 0
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * (w + padding) + padding, rows * (h + text_h + padding) + padding), "white")
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        x, y = padding + (i % columns) * (w + padding), padding + (i // columns) * (h + text_h + padding)
        im = im.convert("RGB")
        sheet.paste(im.resize((w, h), Image.NEAREST) if im.size != (w, h) else im, (x, y))
        if captions:
            draw.multiline_text((x + 2, y + h), "\n".join(_wrap(captions[i], w // 6)[:3]), fill=(0, 0, 0), spacing=0)
    return enlarge(sheet, scale)


def _wrap(caption: str, width: int) -> list[str]:
    words, lines, line = caption.replace("a photo of ", "").split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]
