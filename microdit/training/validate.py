"""Held-out validation loss at fixed noise levels: the same sigmas and the same noise every time.

    from microdit.training.validate import validation_loss
    validation_loss(model, LatentSet("data/shapes-val", 32), sigmas=(0.1, 0.5, 1, 2, 5))

Comparable across checkpoints, runs and masking variants of one resolution (no masking, no dropout,
the EDM-weighted loss of every patch).
"""
from __future__ import annotations

import torch

from ..edm import EDMConfig, edm_loss

DEFAULT_SIGMAS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


@torch.no_grad()
def validation_loss(model, dataset, sigmas=DEFAULT_SIGMAS, num_samples: int = 256, batch_size: int = 64,
                    seed: int = 0, edm: EDMConfig | None = None, device=None) -> dict:
    """Mean EDM loss on the first `num_samples` of `dataset` (a microdit.data.LatentSet) at each sigma.

    Returns {"sigma=<s>": loss, ..., "mean": mean over sigmas}. Noise comes from a generator seeded
    with `seed` (one per sigma), so two calls on the same weights give the same number.
    """
    edm = edm or EDMConfig()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = min(num_samples, len(dataset))
    out = {}
    for j, s in enumerate(sigmas):
        gen = torch.Generator(device=device).manual_seed(seed * 1000 + j)
        total = 0.0
        for i in range(0, n, batch_size):
            b = dataset.batch(range(i, min(n, i + batch_size)))
            x, y = b["latents"].to(device), b["caption"].to(device)
            sigma = torch.full((x.shape[0],), float(s), device=device)
            total += edm_loss(model, x, y, edm, 0.0, generator=gen, sigma=sigma, per_sample=True).sum().item()
        out[f"sigma={s:g}"] = total / n
    out["mean"] = sum(out.values()) / len(sigmas)
    model.train(was_training)
    return out


def shapes_score(model, text_encoder: str, image_autoencoder: str, latent_shape, n_per_task: int = 8,
                 seed: int = 0, num_steps: int = 20, guidance_scale: float = 5.0, edm: EDMConfig | None = None,
                 batch_size: int = 48, save_grid=None) -> dict | None:
    """GenEval-style shapes score of `model` on held-out `microdit.shapes` prompts (6 tasks x n_per_task),
    judged by `microdit.evaluate.shapes_eval`; None when that evaluator is not installed."""
    try:
        from microdit.evaluate.shapes_eval import score_images
    except ImportError:
        return None
    from ..encoders import load_image_autoencoder, load_text_encoder
    from ..manifest import write_png_atomic
    from ..sampling import decode_images, image_grid, sample_latents
    from ..shapes import shapes_prompts
    prompts = shapes_prompts(n_per_task, seed=seed)
    te, ae = load_text_encoder(text_encoder), load_image_autoencoder(image_autoencoder)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        with torch.inference_mode():
            y = te.encode([p["prompt"] for p in chunk]).float()
        noise = torch.randn((len(chunk), *latent_shape), generator=gen, device=device)
        images += decode_images(ae, sample_latents(model, noise, y, num_steps, guidance_scale, edm), len(chunk))
    summary, results = score_images(images, prompts)
    if save_grid is not None:
        write_png_atomic(save_grid, image_grid(images, n_per_task, padding=1, scale=max(1, 64 // images[0].width)))
        save_grid.with_suffix(".txt").write_text(
            "".join(f"{p['prompt']}\t{'ok' if r['correct'] else 'wrong'}\n" for p, r in zip(prompts, results)))
    return summary
