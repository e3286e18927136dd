"""COCO-2014 val for FID-30K and CLIP score: captions, reference images, cached reference statistics.

Protocol (fixed): `num_samples` distinct val images are drawn with `numpy.random.default_rng(seed)`
(seed 0), and one of each image's captions with the same generator; the model draws one image per
caption. The reference set is those same val images, centre-cropped to a square and resized (PIL
bicubic) to the generation resolution; both sets then pass the one FID resize (clean-fid style float
bicubic to 299) and the TF-ported Inception. Reference statistics are cached in
`<cache>/coco-ref-<key>.npz`, keyed by the caption file, sample count, seed, resolution and extractor.

COCO layout: `--coco-root DIR` holding `annotations/captions_val2014.json` and `val2014/*.jpg` (the
official archives unpacked; both are also found deeper under DIR, as `dataprep.download coco2014-val`
leaves them), or explicit `--coco-captions FILE --coco-images DIR`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from microdit.manifest import config_hash

DEFAULT_CACHE = Path(os.environ.get("MICRODIT_EVAL_CACHE", Path.home() / ".cache" / "micro-budget" / "eval"))


def coco_paths(root: str | None = None, captions: str | None = None, images: str | None = None) -> tuple[Path, Path]:
    """(captions json, image folder): explicit paths, the official layout under root, or found under root
    (e.g. `dataprep.download coco2014-val`: `_input/.../annotations/captions_val2014.json`, `images/val2014/val2014/`)."""
    base = Path(root or "")
    cap = Path(captions) if captions else base / "annotations" / "captions_val2014.json"
    img = Path(images) if images else base / "val2014"
    if root and not captions and not cap.is_file():
        cap = next(iter(sorted(base.rglob("captions_val2014.json"))), cap)
    if root and not images and not any(img.glob("*.jpg")):
        img = next((d for d in sorted(base.rglob("val2014"), key=lambda d: len(d.parts))
                    if d.is_dir() and any(d.glob("*.jpg"))), img)
    if not cap.is_file():
        raise FileNotFoundError(f"COCO captions file {cap} does not exist: pass --coco-root (holding annotations/"
                                "captions_val2014.json and val2014/) or --coco-captions FILE --coco-images DIR")
    if not img.is_dir():
        raise FileNotFoundError(f"COCO image folder {img} does not exist: pass --coco-images DIR")
    return cap, img


def sample_captions(captions_json: Path, images_dir: Path, num_samples: int, seed: int = 0) -> list[dict]:
    """[{"image_id", "file", "caption"}]: num_samples distinct images, one caption each, fixed by the seed."""
    data = json.loads(Path(captions_json).read_text())
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        by_image: dict[int, list[str]] = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    except (KeyError, TypeError) as e:
        raise ValueError(f"{captions_json} is not a COCO captions file (missing {e}): it needs 'images' "
                         "[{id, file_name}] and 'annotations' [{image_id, caption}]") from e
    ids = sorted(i for i in by_image if i in files)
    if num_samples > len(ids):
        raise ValueError(f"{captions_json} has {len(ids)} captioned images, fewer than the {num_samples} asked for")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=num_samples, replace=False)
    out = []
    for k in chosen:
        iid = ids[int(k)]
        caps = sorted(by_image[iid])
        out.append({"image_id": iid, "file": str(Path(images_dir) / files[iid]), "caption": caps[int(rng.integers(len(caps)))]})
    return out


def fid_protocol(num_images: int, resolution: int, extractor_name: str, seed: int, reference_statistics) -> dict:
    """The COCO FID protocol a number was computed under: written beside every FID we report and print."""
    features = ("TF-Inception pool3 (inception-2015-12-05)" if extractor_name.startswith("inception")
                else f"{extractor_name} (a stand-in feature network: not comparable with published FID)")
    return {"benchmark": f"COCO-2014 val FID-{num_images // 1000}K" if num_images % 1000 == 0 else
                         f"COCO-2014 val FID ({num_images} images)",
            "mode": "clean (clean-fid): float32 PIL bicubic resize to 299 per channel, " + features,
            "resolution": int(resolution),
            "captions": f"{num_images} distinct val images drawn with numpy default_rng({seed}), one of each image's "
                        "captions drawn with the same generator; one generated image per caption",
            "reference": f"the same {num_images} val images, centre-cropped square, PIL bicubic to {resolution} px",
            "num_images": int(num_images), "reference_statistics": str(reference_statistics)}


def protocol_line(p: dict) -> str:
    """One line naming the protocol of an FID (printed after the number)."""
    return (f"{p['benchmark']}, {p['num_images']} images at {p['resolution']} px, mode {p['mode']}; captions: "
            f"{p['captions']}; reference: {p['reference']}; reference statistics: {p['reference_statistics']}")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)


def _reference_images(entries: list[dict], resolution: int):
    for e in entries:
        with Image.open(e["file"]) as im:
            yield center_crop_resize(im, resolution)


def reference_stats(entries: list[dict], resolution: int, extractor, captions_json: Path, seed: int,
                    cache_dir: Path | None = None, batch_size: int = 64, device="cpu") -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, cache file) of the reference images; computed once, then read from the cache."""
    from .frechet import extract_features, feature_stats
    key = config_hash({"captions": str(Path(captions_json).resolve()), "n": len(entries), "seed": seed,
                       "resolution": resolution, "extractor": extractor.name})
    cache = Path(cache_dir or DEFAULT_CACHE) / f"coco-ref-{resolution}px-{len(entries)}-{extractor.name}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return z["mu"], z["sigma"], cache
    feats = extract_features(_reference_images(entries, resolution), extractor, batch_size, device,
                             progress="coco reference features")
    mu, sigma = feature_stats(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, n=len(feats))
    os.replace(tmp, cache)
    return mu, sigma, cache
