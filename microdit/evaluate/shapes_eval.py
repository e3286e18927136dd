"""Shapes evaluator for the synthetic shapes domain (`microdit.shapes`): GenEval's rules, a template detector.

The drawing rules are known (flat palette colours on a plain background, objects that never touch), so
objects are read off the pixels, and each one is recognised the way a detector would: as the class whose
ideal outline explains it best, if one explains it well enough. What a person still reads correctly
(mild blur, pixel noise, JPEG compression, a ragged 1-pixel edge) is accepted; a wrong outline is not.

1. colour model: every pixel p is explained as a blend bg + alpha * (c - bg) of the background and one
   palette colour c (the one with the smallest residual); alpha is the pixel's coverage;
2. objects: 4-connected components of pixels with coverage >= 0.5 (or far from the background in any
   colour), at least 1.2% of the image; the colour of an object is the palette colour with the smallest
   mean residual over its pixels, or None if no palette colour explains it (mean residual > 35% of the
   colour's distance from the background, or no pixel of it covered >= 85%: a tint is not an object);
3. an object's coverage map: its colour's coverage over its own pixels and the background pixels within
   2 px that are nearer to it than to any other object (its soft or ragged edge);
4. recognition: for each class (circle, square, triangle pointing up) the ideal shape with the object's
   covered area and centroid (a triangle's height from its vertical variance) is drawn like the source
   draws it; both maps are smoothed alike (Gaussian, 0.7 px) and the mismatch is sum |difference| / ideal
   area. The object is the class with the smallest mismatch if that is at most 2.4 / L (L = sqrt(covered
   area) in pixels: a ragged edge costs in proportion to the perimeter), its box is no more than half
   the image and its aspect ratio within [0.6, 1.67]; otherwise (merged or smeared blobs, noise, no
   palette colour) it is not a shape and counts as nothing;
5. every recognised object is a detection with confidence 1.0 (largest first), and the GenEval rules
   (`rules.check_image`) decide the image, with the colours above in place of CLIP's.

Measured on the source's own images (`python -m microdit.evaluate.shapes_check`): mismatch x L of the right
class <= 0.3 clean and <= 2.3 after blur (sigma 0.6 px), noise (sigma 12/255), JPEG (quality 70) or
1-pixel edge jitter at 32 px; the nearest wrong class >= 1.1 clean, >= 0.3-0.8 after corruption. Figures
of the whole evaluator (accepted images, wrong prompts rejected) are in docs/evaluation.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from microdit.shapes import BACKGROUND, COLORS, PALETTE, SHAPES, shape_coverage

from .rules import Detection, check_image, keep_detections, summarize

MIN_AREA = 0.012          # smallest object, fraction of the image area (a triangle of the source is >= 0.034)
COVERAGE = 0.5            # a pixel belongs to an object from this coverage on
COLOR_TOLERANCE = 0.35    # mean residual / |c - bg| above which an object has no palette colour
SOLID = 0.85              # an object has fully covered interior pixels (flat colour), not only a tint
GROW = 2                  # background pixels within this many pixels of an object belong to its edge
SMOOTH = 0.7              # Gaussian sigma (px) applied to the object and to each ideal shape before comparing
# mismatch allowed: sum |smooth(coverage) - smooth(fitted ideal)| / ideal area <= EDGE / L, L = sqrt(area) in
# pixels (a ragged edge costs in proportion to the perimeter; corrupted source objects at 32 px stay under 2.3 / L,
# a 12 px square with two 4 px corners cut away is 3.0 / L from a disc)
TEMPLATE_EDGE = 2.4
MAX_ASPECT = 1.67         # box aspect ratio beyond which a blob is not a shape (merged or smeared objects)
MAX_BOX_AREA = 0.5        # the source's largest object box is 0.36 of the image; bigger blobs are not shapes


@dataclass
class ShapeObject:
    shape: str | None     # circle | square | triangle | None (not a shape of the domain)
    color: str | None     # palette colour name, or None
    bbox: tuple           # (x0, y0, x1, y1) fractions of the image
    area: float           # covered area, fraction of the image
    template_error: float = float("nan")   # mismatch with the best-fitting ideal shape (see TEMPLATE_EDGE)
    errors: dict = field(default_factory=dict)   # mismatch with each class's ideal shape


_BG = np.array(BACKGROUND, np.float64)
_V = np.array([PALETTE[c] for c in COLORS], np.float64) - _BG       # (K, 3) background -> colour


def _coverage(image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel and palette colour: coverage alpha (H, W, K) and residual (H, W, K); distance from bg (H, W)."""
    p = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float64) - _BG
    alpha = np.clip(np.einsum("hwc,kc->hwk", p, _V) / (_V ** 2).sum(1), 0.0, 1.0)
    residual = np.linalg.norm(p[:, :, None, :] - alpha[..., None] * _V, axis=-1)
    return alpha, residual, np.linalg.norm(p, axis=-1)


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


def _regions(labels: np.ndarray, n: int, grow: int) -> np.ndarray:
    """Label of the nearest object for every pixel within `grow` pixels of an object (0 elsewhere): an
    object's blurred or jittered edge is counted with it, never with a neighbour."""
    from scipy import ndimage
    if n == 0:
        return labels
    dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(dist <= grow, labels[iy, ix], 0)


def _smooth(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return ndimage.gaussian_filter(a, SMOOTH, mode="constant")


def _fit_shapes(cov: np.ndarray) -> dict[str, tuple[float, tuple]]:
    """{shape: (mismatch, bbox)}: each class's ideal shape fitted to a coverage map by its moments, and the
    mismatch sum |smooth(cov) - smooth(ideal)| / ideal area (both smoothed alike, so that blur, noise,
    compression and jitter of an edge cost little while a wrong outline still costs its area)."""
    H, W = cov.shape
    ys, xs = np.arange(H) + 0.5, np.arange(W) + 0.5
    mass = cov.sum()
    mx = (cov.sum(0) * xs).sum() / mass
    row_mass = cov.sum(1)
    my = (row_mass * ys).sum() / mass
    var_y = (row_mass * (ys - my) ** 2).sum() / mass
    seen = _smooth(cov)
    out = {}
    for shape in SHAPES:
        bbox = _fit_box(shape, mass, mx, my, var_y, H, W)
        ideal = shape_coverage(shape, bbox, W, H)
        out[shape] = (float(np.abs(seen - _smooth(ideal)).sum() / max(ideal.sum(), 1e-9)), bbox)
    return out


def find_objects(image) -> list[ShapeObject]:
    """All objects of an image (PIL or HxWx3 uint8), largest first."""
    from scipy import ndimage
    alpha, residual, dist = _coverage(image)
    H, W, _ = alpha.shape
    k_best = residual.argmin(-1)
    a_best = np.take_along_axis(alpha, k_best[..., None], -1)[..., 0]
    fg = (a_best >= COVERAGE) | (dist > COVERAGE * np.linalg.norm(_V, axis=1).min())
    labels, n = ndimage.label(fg)
    regions = _regions(labels, n, GROW)
    out = []
    for i in range(1, n + 1):
        core = labels == i
        if core.sum() < MIN_AREA * H * W:
            continue
        mean_res = residual[core].mean(0)
        k = int(mean_res.argmin())
        solid = alpha[..., k][core].max() >= SOLID
        color = COLORS[k] if solid and mean_res[k] <= COLOR_TOLERANCE * np.linalg.norm(_V[k]) else None
        cov = np.where(regions == i, alpha[..., k] if color else np.minimum(dist / np.linalg.norm(_V[k]), 1), 0.0)
        cols, rows = cov.max(0), cov.max(1)
        w, h, mass = cols.sum(), rows.sum(), cov.sum()
        cx, cy = (cols * (np.arange(W) + 0.5)).sum() / w, (rows * (np.arange(H) + 0.5)).sum() / h
        bbox = ((cx - w / 2) / W, (cy - h / 2) / H, (cx + w / 2) / W, (cy + h / 2) / H)
        fits = _fit_shapes(cov)
        best = min(fits, key=lambda s: fits[s][0])
        error = fits[best][0]
        shape = None
        if color and w * h <= MAX_BOX_AREA * H * W and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT \
                and error <= TEMPLATE_EDGE / mass ** 0.5:
            shape, bbox = best, fits[best][1]
        out.append(ShapeObject(shape, color, tuple(float(v) for v in bbox), float(mass / (H * W)), error,
                               {s: round(e, 4) for s, (e, _) in fits.items()}))
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
