"""Exact evaluator for the synthetic shapes domain (`dataprep.shapes`): GenEval's rules without a detector.

The drawing rules are known (flat palette colours on a plain background, edges that only blend with the
background, objects that never touch), so objects are read off the pixels:

1. colour model: every pixel p is explained as a blend bg + alpha * (c - bg) of the background and one
   palette colour c (the one with the smallest residual); alpha is the pixel's coverage;
2. objects: 4-connected components of pixels with coverage >= 0.5 (or far from the background in any
   colour), at least 1.2% of the image; the colour of an object is the palette colour with the smallest
   mean residual over its pixels, or None if no palette colour explains it (mean residual > 35% of the
   colour's distance from the background, or no pixel of it covered >= 85%: a tint is not an object);
3. geometry from the coverage map of the object grown by one pixel: width and height from the column and
   row coverage profiles, fill = covered area / (width x height), vertical skewness of the covered area.
   square: fill >= 0.9; circle: 0.68 <= fill < 0.9 (disc: pi/4); triangle (pointing up): skewness < -0.25
   (a triangle's mass is -0.57 skewed; discs and squares 0); anything else, or an aspect ratio outside
   [0.6, 1.67] (merged or smeared blobs), a box over half the image, or no palette colour (noise), is
   not a shape and counts as nothing;
4. the ideal shape of that class with the object's covered area and centroid (a triangle's height from
   its vertical variance) is drawn like the source draws it; the coverage maps may differ by at most
   0.05 + 1.4 / L of the ideal's area (L = sqrt(area) in pixels: blurred edges weigh more on small
   objects), else the blob is not a shape (the source's own objects: under ~1.3 / L, e.g. <= 0.24 at
   L = 4 px after a 64 -> 16 px downsize, <= 0.05 at L = 20 px);
5. every recognised object is a detection with confidence 1.0 (largest first), and the GenEval rules
   (`rules.check_image`) decide the image, with the colours above in place of CLIP's.

Measured on images of the source itself (600 samples each): fill of squares 0.96-1.00, discs 0.76-0.85,
triangles 0.51-0.83 with skewness <= -0.33 (others within +-0.13), at 16, 32 and 64 px drawn directly and
after 64 -> 16/32 px downsizing with PIL box, bilinear, bicubic and Lanczos filters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dataprep.shapes import BACKGROUND, COLORS, PALETTE, shape_coverage

from .rules import Detection, check_image, keep_detections, summarize

MIN_AREA = 0.012          # smallest object, fraction of the image area (a triangle of the source is >= 0.034)
COVERAGE = 0.5            # a pixel belongs to an object from this coverage on
COLOR_TOLERANCE = 0.35    # mean residual / |c - bg| above which an object has no palette colour
SQUARE_FILL, CIRCLE_FILL, TRIANGLE_SKEW = 0.9, 0.68, -0.25
MAX_ASPECT = 1.67
SOLID = 0.85             # an object has fully covered interior pixels (flat colour), not only a tint
# template mismatch allowed: sum |coverage - fitted ideal's coverage| / ideal area <= BASE + EDGE / L, L = sqrt(area)
# in pixels (blurred edges weigh more on small objects; the source's own objects stay under ~1.3 / L)
TEMPLATE_BASE, TEMPLATE_EDGE = 0.05, 1.4
MAX_BOX_AREA = 0.5        # the source's largest object box is 0.36 of the image; bigger blobs are not shapes


@dataclass
class ShapeObject:
    shape: str | None     # circle | square | triangle | None (not a shape of the domain)
    color: str | None     # palette colour name, or None
    bbox: tuple           # (x0, y0, x1, y1) fractions of the image
    area: float           # covered area, fraction of the image
    fill: float
    skew: float
    template_error: float = float("nan")   # mismatch with the ideal shape fitted to it (see TEMPLATE_BASE)


_BG = np.array(BACKGROUND, np.float64)
_V = np.array([PALETTE[c] for c in COLORS], np.float64) - _BG       # (K, 3) background -> colour


def _coverage(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel and palette colour: coverage alpha (H, W, K) and residual (H, W, K); distance from bg (H, W)."""
    p = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float64) - _BG
    alpha = np.clip(np.einsum("hwc,kc->hwk", p, _V) / (_V ** 2).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * _V, axis=-1)
    return alpha, residual, np.linalg.norm(p, axis=-1)


def _classify(fill: float, skew: float, aspect: float) -> str | None:
    if not (1 / MAX_ASPECT <= aspect <= MAX_ASPECT):
        return None
    if skew < TRIANGLE_SKEW and fill < SQUARE_FILL:
        return "triangle"
    if abs(skew) >= -TRIANGLE_SKEW:
        return None
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return None


def _fit_box(shape: str, mass: float, mx: float, my: float, var_y: float, H: int, W: int) -> tuple:
    """Box (fractions) of the ideal shape with this covered area and centroid (pixels); a triangle's height
    from its vertical variance (h^2 / 18), its centroid 2/3 of the height down."""
    if shape == "square":
        s = mass ** 0.5
        x0, y0, x1, y1 = mx - s / 2, my - s / 2, mx + s / 2, my + s / 2
    elif shape == "circle":
        d = (4 * mass / np.pi) ** 0.5
        x0, y0, x1, y1 = mx - d / 2, my - d / 2, mx + d / 2, my + d / 2
    else:
        h = (18 * var_y) ** 0.5
        b = 2 * mass / h
        x0, y0, x1, y1 = mx - b / 2, my - 2 * h / 3, mx + b / 2, my + h / 3
    return (x0 / W, y0 / H, x1 / W, y1 / H)


def find_objects(image) -> list[ShapeObject]:
    """All objects of an image (PIL or HxWx3 uint8), largest first."""
    from scipy import ndimage
    alpha, residual, dist = _coverage(image)
    H, W, _ = alpha.shape
    k_best = residual.argmin(-1)
    a_best = np.take_along_axis(alpha, k_best[..., None], -1)[..., 0]
    fg = (a_best >= COVERAGE) | (dist > COVERAGE * np.linalg.norm(_V, axis=1).min())
    labels, n = ndimage.label(fg)
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5
    out = []
    for i in range(1, n + 1):
        core = labels == i
        if core.sum() < MIN_AREA * H * W:
            continue
        mean_res = residual[core].mean(0)
        k = int(mean_res.argmin())
        solid = alpha[..., k][core].max() >= SOLID
        color = COLORS[k] if solid and mean_res[k] <= COLOR_TOLERANCE * np.linalg.norm(_V[k]) else None
        region = ndimage.binary_dilation(core, structure=np.ones((3, 3), bool)) & ((labels == 0) | core)
        cov = np.where(region, alpha[..., k] if color else np.minimum(dist / np.linalg.norm(_V[k]), 1), 0.0)
        cols, rows = cov.max(0), cov.max(1)
        w, h, mass = cols.sum(), rows.sum(), cov.sum()
        cx, cy = (cols * xs).sum() / w, (rows * ys).sum() / h
        row_mass = cov.sum(1)
        my = (row_mass * ys).sum() / mass
        var = (row_mass * (ys - my) ** 2).sum() / mass
        skew = float((row_mass * (ys - my) ** 3).sum() / mass / max(var, 1e-9) ** 1.5)
        fill = float(mass / (w * h))
        bbox = ((cx - w / 2) / W, (cy - h / 2) / H, (cx + w / 2) / W, (cy + h / 2) / H)
        shape = _classify(fill, skew, w / h) if color and w * h <= MAX_BOX_AREA * H * W else None
        error = float("nan")
        if shape is not None:     # the ideal shape with the object's area and centroid must explain its pixels
            mx = (cov.sum(0) * xs).sum() / mass
            bbox = _fit_box(shape, mass, mx, my, var, H, W)
            ideal = shape_coverage(shape, bbox, W, H)
            error = float(np.abs(cov - ideal).sum() / max(ideal.sum(), 1e-9))
            if error > TEMPLATE_BASE + TEMPLATE_EDGE / mass ** 0.5:
                shape = None
        out.append(ShapeObject(shape, color, tuple(float(v) for v in bbox), float(mass / (H * W)), fill, skew, error))
    return sorted(out, key=lambda o: -o.area)


def detections(objects: list[ShapeObject]) -> dict[str, list[Detection]]:
    """Recognised objects as GenEval detections per class (confidence 1.0, largest first)."""
    det: dict[str, list[Detection]] = {}
    for o in objects:
        if o.shape is not None:
            det.setdefault(o.shape, []).append(Detection(o.bbox, 1.0, o.color))
    return det


def evaluate_image(image, metadata: dict) -> dict:
    """GenEval-style verdict for one image: {"tag", "prompt", "correct", "reason", "objects"}."""
    objects = find_objects(image)
    correct, reason = check_image(keep_detections(detections(objects), metadata["tag"]), metadata)
    return {"tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct), "reason": reason,
            "objects": [{"shape": o.shape, "color": o.color, "bbox": [round(v, 4) for v in o.bbox]} for o in objects]}


def score_images(images, metadatas) -> tuple[dict, list[dict]]:
    """(summary in GenEval's report shape, per-image results) for parallel lists of images and prompts."""
    results = [evaluate_image(im, md) for im, md in zip(images, metadatas)]
    return summarize(results), results
