"""Offline synthetic source: coloured shapes with GenEval-style compositional captions.

    python -m microdit.shapes --n 12 --resolution 64 --out /tmp/shapes_preview   # writes PNG + caption + meta

Every sample is a plain background with a few large, flat-coloured shapes (circle, square, triangle) in
a small palette of well-separated colours, drawn without anti-aliasing, and a caption in one of GenEval's
six task kinds:

    single_object  "a photo of a circle"                      two_object  "a photo of a circle and a square"
    counting       "a photo of three squares"                 colors      "a photo of a red circle"
    position       "a photo of a circle left of a square"     color_attr  "a photo of a red circle and a blue triangle"

The ground truth travels in `meta`: {"tag", "include" (and "exclude" for counting) in GenEval's metadata
format, with shape names as classes, "objects": [{"shape", "color", "bbox": [x0, y0, x1, y1] fractions}]}.
Geometry is resolution-free: sample `i` of seed `s` is the same scene at 16, 32 or 64 px. Shapes are
sized so that they stay recognisable after a 64 -> 16 px downsize (at most 4 objects, each >= 26% of the
image side, >= 12% of the side between objects), which is what `microdit.evaluate.shapes_eval` relies on.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from .cli import check_positive, run_cli

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES = ("circle", "square", "triangle")
# Well separated in RGB (and still after a 4x downsize blends them with the background).
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
COLORS = tuple(PALETTE)
BACKGROUND = (255, 255, 255)
COUNTS = (2, 3, 4)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")

MIN_GAP = 0.125          # free space between objects, fraction of the side (2 px at 16 px)
MARGIN = 0.04            # free space between an object and the image border
SUPERSAMPLE = 4          # drawn at 4x and box-averaged: mild anti-aliasing, same look at every resolution


@dataclass
class ShapesSample:
    image: Image.Image   # RGB, resolution x resolution
    caption: str
    meta: dict           # {"tag", "include", ["exclude"], "objects": [{"shape", "color", "bbox"}]}


# ---------------------------------------------------------------------------------------------------
# Captions and GenEval-style rules
# ---------------------------------------------------------------------------------------------------

def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(shape: str, color: str | None = None) -> str:
    return _a(f"{color} {shape}" if color else shape)


def make_prompt(tag: str, shapes: list[str], colors: list[str | None], count: int = 1,
                relation: str | None = None) -> dict:
    """GenEval metadata {"tag", "include", ["exclude"], "prompt"} for one task instance."""
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": shapes[0], "count": 1}],
                "prompt": f"a photo of {_phrase(shapes[0])}"}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": s, "count": 1} for s in shapes[:2]],
                "prompt": f"a photo of {_phrase(shapes[0])} and {_phrase(shapes[1])}"}
    if tag == "counting":
        return {"tag": tag, "include": [{"class": shapes[0], "count": count}],
                "exclude": [{"class": shapes[0], "count": count + 1}],
                "prompt": f"a photo of {NUMBERS[count]} {_plural(shapes[0])}"}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": shapes[0], "count": 1, "color": colors[0]}],
                "prompt": f"a photo of {_phrase(shapes[0], colors[0])}"}
    if tag == "position":   # "A <relation> B": B is include[0], A carries the relation to group 0
        a, b = shapes[:2]
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {_phrase(a)} {relation} {_phrase(b)}"}
    if tag == "color_attr":
        return {"tag": tag, "include": [{"class": s, "count": 1, "color": c} for s, c in zip(shapes[:2], colors[:2])],
                "prompt": f"a photo of {_phrase(shapes[0], colors[0])} and {_phrase(shapes[1], colors[1])}"}
    raise ValueError(f"unknown task {tag!r}: expected one of {TASKS}")


def all_prompts(tag: str) -> list[dict]:
    """Every distinct prompt of a task in this domain (small: 3 to 180 per task)."""
    out = []
    if tag == "single_object":
        out = [make_prompt(tag, [s], [None]) for s in SHAPES]
    elif tag == "two_object":
        out = [make_prompt(tag, [a, b], [None, None]) for a in SHAPES for b in SHAPES if a != b]
    elif tag == "counting":
        out = [make_prompt(tag, [s], [None], count=n) for s in SHAPES for n in COUNTS]
    elif tag == "colors":
        out = [make_prompt(tag, [s], [c]) for s in SHAPES for c in COLORS]
    elif tag == "position":
        out = [make_prompt(tag, [a, b], [None, None], relation=r) for a in SHAPES for b in SHAPES if a != b
               for r in RELATIONS]
    elif tag == "color_attr":
        out = [make_prompt(tag, [a, b], [ca, cb]) for a in SHAPES for b in SHAPES if a != b
               for ca in COLORS for cb in COLORS if ca != cb]
    else:
        raise ValueError(f"unknown task {tag!r}: expected one of {TASKS}")
    return out


def shapes_prompts(n_per_task: int, seed: int = 0, tasks=None) -> list[dict]:
    """Evaluation prompts in GenEval metadata format: n_per_task per task, drawn without replacement from
    the task's distinct prompts (cycling through a fresh shuffle when a task has fewer than n_per_task)."""
    rng = random.Random(f"shapes-prompts-{seed}")
    out = []
    for tag in tasks or TASKS:
        pool, picked = all_prompts(tag), []
        while len(picked) < n_per_task:
            order = pool[:]
            rng.shuffle(order)
            picked += order[: n_per_task - len(picked)]
        out += picked
    return out


# ---------------------------------------------------------------------------------------------------
# Layout (resolution-free geometry) and drawing
# ---------------------------------------------------------------------------------------------------

def _box(cx: float, cy: float, s: float) -> list[float]:
    return [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]


def _grid_layout(rng: random.Random, n: int) -> list[list[float]]:
    """n (<= 4) boxes in distinct cells of a 2x2 grid, jittered inside their cell, gaps >= MIN_GAP."""
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)
    s = rng.uniform(0.26, 0.32)
    slack = 0.5 - s - MIN_GAP      # room to move while keeping half the gap on each side inside the cell
    boxes = []
    for col, row in cells:
        cx = 0.25 + 0.5 * col + rng.uniform(-slack / 2, slack / 2)
        cy = 0.25 + 0.5 * row + rng.uniform(-slack / 2, slack / 2)
        boxes.append(_box(cx, cy, s))
    return boxes


def _pair_layout(rng: random.Random, relation: str) -> list[list[float]]:
    """Two boxes [A, B] with A `relation` B by a clear margin under GenEval's position rule."""
    s = rng.uniform(0.28, 0.36)
    lo, hi = MARGIN + s / 2, 1 - MARGIN - s / 2
    along_a = rng.uniform(lo, 0.5 - MIN_GAP / 2 - s / 2)          # first half along the relation's axis
    along_b = rng.uniform(0.5 + MIN_GAP / 2 + s / 2, hi)
    across = rng.uniform(0.3, 0.7)
    across_b = min(max(across + rng.uniform(-0.08, 0.08), lo), hi)
    if relation in ("right of", "below"):
        along_a, along_b = along_b, along_a
    if relation in ("left of", "right of"):
        return [_box(along_a, across, s), _box(along_b, across_b, s)]
    return [_box(across, along_a, s), _box(across_b, along_b, s)]


def _single_layout(rng: random.Random) -> list[list[float]]:
    s = rng.uniform(0.36, 0.6)
    lo, hi = MARGIN + s / 2, 1 - MARGIN - s / 2
    return [_box(rng.uniform(lo, hi), rng.uniform(lo, hi), s)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, fill) -> None:
    """One shape in the pixel box (x0, y0, x1, y1) (x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":    # pointing up
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def draw_scene(objects: list[dict], resolution: int, background=BACKGROUND, supersample: int = SUPERSAMPLE) -> Image.Image:
    """Draw objects ({"shape", "color", "bbox"} in fractions) at `resolution` px: flat colours drawn at
    `supersample` x the size and box-averaged down (mild anti-aliasing: only edge pixels blend with the
    background; supersample=1 draws hard edges)."""
    size = resolution * supersample
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw_shape(draw, obj["shape"], tuple(round(v * size) for v in obj["bbox"]), PALETTE[obj["color"]])
    return img.reduce(supersample) if supersample > 1 else img


def shape_coverage(shape: str, bbox: list[float], width: int, height: int, supersample: int = SUPERSAMPLE):
    """Coverage in [0, 1] (height, width) float array of one shape drawn like `draw_scene` (bbox in fractions)."""
    import numpy as np
    size = (width * supersample, height * supersample)
    mask = Image.new("L", size, 0)
    box = (round(bbox[0] * size[0]), round(bbox[1] * size[1]), round(bbox[2] * size[0]), round(bbox[3] * size[1]))
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return np.asarray(mask.reduce(supersample) if supersample > 1 else mask, np.float64) / 255.0


def sample_scene(rng: random.Random, tag: str) -> tuple[dict, list[dict]]:
    """(GenEval metadata with prompt, objects) for one random instance of a task."""
    two = rng.sample(SHAPES, 2)
    cols = rng.sample(COLORS, 2)
    if tag == "single_object":
        meta, boxes, shapes = make_prompt(tag, two[:1], [None]), _single_layout(rng), two[:1]
        colors = [rng.choice(COLORS)]
    elif tag == "colors":
        meta, boxes, shapes, colors = make_prompt(tag, two[:1], cols[:1]), _single_layout(rng), two[:1], cols[:1]
    elif tag == "two_object":
        meta, boxes, shapes = make_prompt(tag, two, [None, None]), _grid_layout(rng, 2), two
        colors = [rng.choice(COLORS) for _ in range(2)]
    elif tag == "color_attr":
        meta, boxes, shapes, colors = make_prompt(tag, two, cols), _grid_layout(rng, 2), two, cols
    elif tag == "counting":
        n = rng.choice(COUNTS)
        meta, boxes, shapes = make_prompt(tag, two[:1], [None], count=n), _grid_layout(rng, n), two[:1] * n
        colors = [rng.choice(COLORS) for _ in range(n)]
    elif tag == "position":
        rel = rng.choice(RELATIONS)
        meta, boxes, shapes = make_prompt(tag, two, [None, None], relation=rel), _pair_layout(rng, rel), two
        colors = [rng.choice(COLORS) for _ in range(2)]
    else:
        raise ValueError(f"unknown task {tag!r}: expected one of {TASKS}")
    objects = [{"shape": s, "color": c, "bbox": [round(v, 4) for v in b]} for s, c, b in zip(shapes, colors, boxes)]
    return meta, objects


def scene_for_prompt(metadata: dict, seed: int = 0) -> list[dict]:
    """Objects of a scene that satisfies a GenEval-format prompt of this domain (ground truth for tests)."""
    rng = random.Random(f"scene-{seed}-{metadata['prompt']}")
    inc, tag = metadata["include"], metadata["tag"]
    if tag == "position":
        boxes = _pair_layout(rng, inc[1]["position"][0])
        reqs = [inc[1], inc[0]]
    elif tag == "counting":
        boxes, reqs = _grid_layout(rng, inc[0]["count"]), [inc[0]] * inc[0]["count"]
    elif len(inc) == 1:
        boxes, reqs = _single_layout(rng), inc
    else:
        boxes, reqs = _grid_layout(rng, len(inc)), inc
    return [{"shape": r["class"], "color": r.get("color") or rng.choice(COLORS), "bbox": [round(v, 4) for v in b]}
            for r, b in zip(reqs, boxes)]


def generate_shapes(n: int, resolution: int = 64, seed: int = 0, tasks=None) -> Iterator[ShapesSample]:
    """Yield n samples; sample i cycles through `tasks` (default all six) and depends only on (seed, i)."""
    tasks = tuple(tasks or TASKS)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}: expected a subset of {TASKS}")
    for i in range(n):
        rng = random.Random(f"shapes-{seed}-{i}")
        tag = tasks[i % len(tasks)]
        meta, objects = sample_scene(rng, tag)
        caption = meta.pop("prompt")
        meta["objects"] = objects
        yield ShapesSample(draw_scene(objects, resolution), caption, meta)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m microdit.shapes", description="Write a few synthetic shapes samples (PNG + .txt caption + .json meta).")
    ap.add_argument("--n", type=int, default=12, help="number of samples")
    ap.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="same seed -> same images")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    check_positive(n=args.n, resolution=args.resolution)
    from .manifest import write_png_atomic
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(generate_shapes(args.n, args.resolution, args.seed)):
        write_png_atomic(out / f"{i:05d}.png", s.image)
        (out / f"{i:05d}.txt").write_text(s.caption)
        (out / f"{i:05d}.json").write_text(json.dumps(s.meta))
    print(f"wrote {args.n} samples to {out}")


if __name__ == "__main__":
    run_cli(main)
