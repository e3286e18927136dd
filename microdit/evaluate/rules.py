"""GenEval's scoring rules, shared by the GenEval suite (detector + CLIP colours) and the exact shapes evaluator.

The rules follow the benchmark's `evaluate_images.py` and `summary_scores.py`:
- detections of a class are kept above a confidence threshold (0.3; 0.9 for the counting task), most
  confident first, at most 16 per class;
- an image is correct when every `include` rule holds: at least `count` objects of the class; if a
  colour is asked, at least `count` of the `count` most confident have that colour; if a position is
  asked, each of them stands in that relation to every object of the target group; and no `exclude`
  rule fires (at least `count` objects of its class);
- position from box centres, offsets shrunk by 0.1 x the two boxes' sizes, the relation read from the
  direction of the shrunk offset (components beyond +-0.5 of the unit offset);
- task score = mean over its images; overall = mean of the task scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

THRESHOLD = 0.3              # detector confidence to count an object
COUNTING_THRESHOLD = 0.9     # ... in the counting task
MAX_OBJECTS = 16             # per class
POSITION_THRESHOLD = 0.1     # offsets shrink by this x (size of A + size of B)
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class Detection:
    box: tuple               # (x0, y0, x1, y1), any consistent unit (pixels or fractions)
    score: float = 1.0       # detector confidence
    color: str | None = None  # filled in by a colour classifier when a rule asks
    mask: np.ndarray | None = field(default=None, repr=False)   # (H, W) bool, optional


def keep_detections(candidates: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """Apply the confidence threshold of the task and the per-class cap, most confident first."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, dets in candidates.items():
        dets = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if dets:
            kept[name] = dets
    return kept


def relative_position(box_a, box_b) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"; image y grows downwards)."""
    a, b = np.asarray(box_a[:4], float), np.asarray(box_b[:4], float)
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def check_image(detected: dict[str, list[Detection]], metadata: dict,
                colors_of: Callable[[list[Detection], str], list[str]] | None = None) -> tuple[bool, str]:
    """(correct, reason) for one image given kept detections (most confident first) and the prompt's rules.

    colors_of(detections, classname) -> one colour name per detection; default: each detection's `.color`.
    """
    colors_of = colors_of or (lambda dets, name: [d.color for d in dets])
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        name, count, matched = req["class"], req["count"], True
        found = detected.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(found, name)
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                    reasons.append(f"expected {req['color']} {name}>={count}, found {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for other in groups[target]:
                            rels = relative_position(obj.box, other.box)
                            if relation not in rels:
                                correct = matched = False
                                reasons.append(f"expected {name} {relation} target, found "
                                               f"{' and '.join(sorted(rels)) or 'no relation to'} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "; ".join(reasons)


def summarize(results: list[dict]) -> dict:
    """GenEval summary (the rules of the benchmark's `summary_scores.py`): per task the mean of `correct` over
    its images, overall the mean of the task scores; also the fraction of correct images and of prompts with
    at least one correct image (a prompt is its `metadata` record when present, else its text)."""
    tasks, prompts = {}, {}
    for r in results:
        key = r.get("metadata") or r["prompt"]
        t = tasks.setdefault(r["tag"], {"correct": 0, "images": 0, "prompts": set()})
        t["correct"] += bool(r["correct"])
        t["images"] += 1
        t["prompts"].add(key)
        prompts[key] = prompts.get(key, False) or bool(r["correct"])
    per_task = {tag: {"score": v["correct"] / v["images"], "images": v["images"], "prompts": len(v["prompts"])}
                for tag, v in sorted(tasks.items(), key=lambda kv: TASKS.index(kv[0]) if kv[0] in TASKS else 99)}
    overall = float(np.mean([v["score"] for v in per_task.values()])) if per_task else float("nan")
    correct_images = float(np.mean([bool(r["correct"]) for r in results])) if results else float("nan")
    correct_prompts = float(np.mean(list(prompts.values()))) if prompts else float("nan")
    return {"overall": overall, "tasks": per_task, "images": len(results), "prompts": len(prompts),
            "correct_images": correct_images, "correct_prompts": correct_prompts}


def summarize_file(path) -> dict:
    """`summarize` over a results JSON-lines file: ours (results_geneval.jsonl) or one written by the
    benchmark's own `evaluate_images.py` (records with at least tag, prompt or metadata, and correct)."""
    import json
    from pathlib import Path
    results = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        if "tag" not in r or "correct" not in r or not ("prompt" in r or "metadata" in r):
            raise ValueError(f"{path} line {i + 1}: a GenEval result needs 'tag', 'correct' and 'prompt' or 'metadata'")
        r.setdefault("prompt", json.loads(r["metadata"]).get("prompt") if isinstance(r.get("metadata"), str) else "")
        results.append(r)
    return summarize(results)

