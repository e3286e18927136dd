"""Evaluation configuration: one dataclass, saved in report.json and manifest.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from microdit.cli import UserError

SUITES = ("shapes", "fid30k", "geneval", "clip")


@dataclass
class EvalConfig:
    checkpoint: str                          # our model folder, a diffusers folder, a hub id, or a release .pt (path or <repo id>/<file>)
    suites: tuple = ("shapes",)              # any of shapes | fid30k | geneval | clip
    out_dir: str | None = None               # default: <checkpoint folder>/eval (or <file stem>-eval beside a .pt)
    steps: int = 30                          # EDM Heun steps
    guidance: float = 5.0                    # classifier-free guidance scale
    seed: int = 0                            # base seed: prompt draws and per-image noise
    batch_size: int = 32                     # images per generation / feature batch
    device: str = "cpu"                      # torch device for generation and scoring
    image_autoencoder: str | None = None     # override the checkpoint's image autoencoder name
    text_encoder: str | None = None          # override the checkpoint's text encoder name
    # --- shapes (exact evaluator + Fréchet distance in a weight-free feature space) ---
    shapes_prompts_per_task: int = 25        # prompts per task, drawn by microdit.shapes.shapes_prompts(seed)
    images_per_prompt: int = 4               # images per prompt (shapes and GenEval; the benchmark uses 4)
    shapes_real_images: int = 1000           # real shapes images for the Fréchet distance
    shapes_real_seed: int = 10_000           # seed of the real set (distinct from training seeds)
    fd_features: str = "randconv"            # feature space of the shapes FD (randconv[:dim[:size[:seed]]])
    # --- FID on COCO-2014 val ---
    num_samples: int = 30_000                # captions / images (30K = FID-30K; 5000 for FID-5K)
    coco_root: str | None = None             # folder with annotations/captions_val2014.json and val2014/
    coco_captions: str | None = None         # or: the captions json ...
    coco_images: str | None = None           # ... and the image folder
    inception: str = "inception"             # feature extractor: inception[:path or url] | randconv[...] (tests)
    cache_dir: str | None = None             # reference statistics cache (default ~/.cache/micro-budget/eval)
    # --- GenEval ---
    geneval_prompts: str | None = None       # metadata jsonl (default: the packaged 553 prompts)
    geneval_limit: int | None = None         # only the first N prompts (quick checks; the benchmark uses all)
    detector: str = "facebook/mask2former-swin-small-coco-instance"   # transformers Mask2Former, hub id or folder
    color_clip: str = "ViT-L-14:openai"      # open_clip model of the colour check (the benchmark's)
    # --- CLIP score (on the generated COCO images) ---
    clip_model: str = "hf:openai/clip-vit-large-patch14"   # CLIP score model (torchmetrics CLIPScore's default)

    def __post_init__(self):
        self.suites = tuple(self.suites)
        bad = [s for s in self.suites if s not in SUITES]
        if bad or not self.suites:
            raise UserError(f"unknown evaluation suites {bad or '(none)'}: choose from {SUITES}")
        for name in ("steps", "batch_size", "shapes_prompts_per_task", "images_per_prompt", "shapes_real_images",
                     "num_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: give a positive number")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["suites"] = list(self.suites)
        return d
