"""How far the shapes evaluator agrees with a person: corrupted images of the source and wrong prompts.

    python -m microdit.evaluate.shapes_check --resolution 32 --n 600      # prints one row per corruption

Images of `microdit.shapes` that a person still reads correctly after a mild corruption must be
accepted, and the same images checked against a wrong prompt of the same task must be rejected:
- blur: Gaussian, sigma 0.6 px;  noise: Gaussian, sigma 12/255 per channel;  jpeg: quality 70 (PIL's
  default 4:2:0 chroma subsampling);  jitter: every pixel on an object's outline takes the value of a
  random 4-neighbour with probability 0.5 (the outline moves by up to one pixel, raggedly);
- a wrong prompt is a prompt of the same task (`all_prompts`) that the drawn objects do not satisfy
  under GenEval's rules (checked on the ground-truth objects, so "a circle and a square" is not a wrong
  prompt for an image of "a square and a circle").
`accepted` is the GenEval overall score with the true prompts (mean over tasks of the fraction of images
judged correct); `wrong accepted` the same with the wrong prompts (an ideal evaluator: 1.0 and 0.0).
"""
from __future__ import annotations

import argparse
import io
import random

import numpy as np
from PIL import Image, ImageFilter

from microdit.cli import check_positive, run_cli
from microdit.shapes import all_prompts, generate_shapes

from .rules import Detection, check_image, summarize
from .shapes_eval import evaluate_image

BLUR_SIGMA, NOISE_SIGMA, JPEG_QUALITY, JITTER_P = 0.6, 12.0, 70, 0.5
_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(BLUR_SIGMA))


def noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    a = np.asarray(image, np.float64)
    return Image.fromarray(np.clip(np.round(a + rng.normal(0, NOISE_SIGMA, a.shape)), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Outline pixels (a 4-neighbour differs by more than 60 in summed RGB) take a random neighbour's value
    with probability JITTER_P."""
    src = np.asarray(image.convert("RGB")).astype(np.int64)
    H, W, _ = src.shape
    padded = np.pad(src, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifted = np.stack([padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy, dx in _NEIGHBOURS])   # (4, H, W, 3)
    outline = (np.abs(shifted - src).sum(-1) > 60).any(0)
    pick = rng.integers(0, 4, (H, W))
    change = outline & (rng.random((H, W)) < JITTER_P)
    out = np.where(change[..., None], np.take_along_axis(shifted, pick[None, ..., None], 0)[0], src)
    return Image.fromarray(out.astype(np.uint8))


CORRUPTIONS = {"none": lambda image, rng: image, "blur": blur, "noise": noise, "jpeg": jpeg, "jitter": jitter}


def satisfied_by_truth(objects: list[dict], metadata: dict) -> bool:
    """Whether the drawn objects themselves satisfy a prompt under GenEval's rules."""
    det: dict[str, list[Detection]] = {}
    for o in sorted(objects, key=lambda o: -(o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1])):
        det.setdefault(o["shape"], []).append(Detection(tuple(o["bbox"]), 1.0, o["color"]))
    return check_image(det, metadata)[0]


def wrong_prompt(objects: list[dict], tag: str, rng: random.Random) -> dict:
    """A prompt of task `tag` that the drawn objects do not satisfy."""
    return rng.choice([p for p in all_prompts(tag) if not satisfied_by_truth(objects, p)])


def check(n: int = 600, resolution: int = 32, seed: int = 0, corruptions=tuple(CORRUPTIONS)) -> dict:
    """{corruption: {"accepted", "wrong_accepted", "tasks": {task: accepted}}} over n source images."""
    samples = list(generate_shapes(n, resolution, seed=seed))
    out = {}
    for name in corruptions:
        rng, prompt_rng = np.random.default_rng(seed), random.Random(f"wrong-{seed}")
        right, wrong = [], []
        for s in samples:
            image = CORRUPTIONS[name](s.image, rng)
            truth = {**{k: v for k, v in s.meta.items() if k != "objects"}, "prompt": s.caption}
            right.append(evaluate_image(image, truth))
            wrong.append(evaluate_image(image, wrong_prompt(s.meta["objects"], truth["tag"], prompt_rng)))
        r, w = summarize(right), summarize(wrong)
        out[name] = {"accepted": r["overall"], "wrong_accepted": w["overall"],
                     "tasks": {t: v["score"] for t, v in r["tasks"].items()}}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m microdit.evaluate.shapes_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="source images (cycling through the six tasks)")
    ap.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="source seed (and corruption seed)")
    a = ap.parse_args(argv)
    check_positive(n=a.n, resolution=a.resolution)
    result = check(a.n, a.resolution, a.seed)
    print(f"{a.n} images at {a.resolution} px: accepted with the true prompt / with a wrong prompt of the same task")
    for name, r in result.items():
        tasks = "  ".join(f"{t} {v:.2f}" for t, v in r["tasks"].items())
        print(f"{name:7} accepted {r['accepted']:.3f}  wrong accepted {r['wrong_accepted']:.3f}   ({tasks})")


if __name__ == "__main__":
    run_cli(main)
