"""GenEval: 553 prompts, 4 images each, an object detector + CLIP colours, the benchmark's rules (`rules.py`).

The detector is Mask2Former COCO instance segmentation from transformers (hub name or local folder,
default `facebook/mask2former-swin-small-coco-instance`), where the original benchmark runs the
mmdetection Mask2Former Swin-S checkpoint (`mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`). Same
architecture family and training set, different port and weights: scores are close but not identical to
published GenEval numbers. Instances come from transformers' instance post-processing (query score x mask
score, per-instance binary masks); the box of an instance is its mask's extent.
"""
from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from microdit.encoders import MissingWeightsError

from .rules import GENEVAL_COLORS, THRESHOLD, Detection, check_image, keep_detections, summarize

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
IMAGES_PER_PROMPT = 4
# Hugging Face COCO label names -> the benchmark's object_names.txt
LABEL_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
                 "diningtable": "dining table", "pottedplant": "potted plant", "hair dryer": "hair drier"}


def data_file(name: str) -> Path:
    """A file of the packaged GenEval prompt data (microdit/evaluate/data/geneval/)."""
    return Path(str(resources.files("microdit.evaluate").joinpath("data", "geneval", name)))


def load_prompts(path: str | os.PathLike | None = None) -> list[dict]:
    path = Path(path) if path else data_file("evaluation_metadata.jsonl")
    prompts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, p in enumerate(prompts):
        if not {"tag", "include", "prompt"} <= set(p):
            raise ValueError(f"{path} line {i + 1}: a GenEval prompt needs 'tag', 'include' and 'prompt'")
    return prompts


def object_names(path: str | os.PathLike | None = None) -> list[str]:
    path = Path(path) if path else data_file("object_names.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _norm(name: str) -> str:
    name = re.sub(r"[-_]+", " ", name.strip().lower())
    return LABEL_ALIASES.get(name, name)


class Mask2FormerDetector:
    """transformers Mask2Former instance segmentation -> {classname: [Detection (pixel box, score, mask)]}."""

    def __init__(self, spec: str = DEFAULT_DETECTOR, device="cpu", classnames: list[str] | None = None):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
        local = os.path.isdir(spec)
        try:
            self.processor = AutoImageProcessor.from_pretrained(spec, local_files_only=local)
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(spec, local_files_only=local)
        except (OSError, ValueError) as e:
            raise MissingWeightsError(f"object detector {spec!r} could not be loaded ({e}); pass a local folder "
                                      f"(save_pretrained of {DEFAULT_DETECTOR}) with --detector") from e
        self.model.eval().to(device)
        self.device, self.name = device, spec
        wanted = set(classnames or object_names())
        self.labels = {int(i): _norm(n) for i, n in self.model.config.id2label.items()}
        unknown = wanted - set(self.labels.values())
        if unknown:
            raise ValueError(f"detector {spec!r} does not know classes {sorted(unknown)}: its labels are "
                             f"{sorted(set(self.labels.values()))[:10]}...; a COCO instance model is needed")

    @torch.no_grad()
    def __call__(self, image: Image.Image, min_score: float = THRESHOLD) -> dict[str, list[Detection]]:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=min_score, target_sizes=[image.size[::-1]], return_binary_maps=True)[0]
        masks = result["segmentation"]
        found: dict[str, list[Detection]] = {}
        for k, info in enumerate(result["segments_info"]):
            mask = (masks[k] if masks is not None and masks.ndim == 3 else masks == info["id"]).cpu().numpy().astype(bool)
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            found.setdefault(self.labels[int(info["label_id"])], []).append(Detection(box, float(info["score"]),
                                                                                     mask=mask))
        return found


def evaluate_image(image: Image.Image, metadata: dict, detector, colors, filename: str = "") -> dict:
    """One image: detections -> kept by the task's threshold -> GenEval rules with CLIP colours.

    The record has the fields of the benchmark's own results file (`evaluate_images.py`): filename, tag,
    prompt, correct, reason, metadata (the prompt's JSON) and details (kept boxes + scores per class, JSON),
    so its `summary_scores.py` reads our results file as it reads its own.
    """
    kept = keep_detections(detector(image), metadata["tag"])
    correct, reason = check_image(kept, metadata, lambda dets, name: colors(image, dets, name))
    details = {k: [[round(v, 1) for v in d.box] + [round(d.score, 3)] for d in ds] for k, ds in kept.items()}
    return {"filename": str(filename), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(metadata), "details": json.dumps(details)}


def score_images(images, metadatas, detector, colors, progress: bool = True,
                 filenames: list | None = None) -> tuple[dict, list[dict]]:
    from tqdm import tqdm
    filenames = filenames or [""] * len(metadatas)
    triples = list(zip(images, metadatas, filenames))
    results = [evaluate_image(im, md, detector, colors, fn)
               for im, md, fn in tqdm(triples, desc="geneval score", unit="img", disable=not progress, leave=False)]
    return summarize(results), results


def load_scorers(detector: str = DEFAULT_DETECTOR, clip: str | None = None, device="cpu"):
    """(detector, colour classifier) for `score_images`."""
    from .clip_models import GENEVAL_CLIP, ColorClassifier, load_clip
    return Mask2FormerDetector(detector, device), ColorClassifier(load_clip(clip or GENEVAL_CLIP, device), GENEVAL_COLORS)
