"""CLIP through open_clip: loading by name or path, CLIP score, and GenEval's zero-shot colour classifier.

Model specs (`load_clip`):
    ViT-L-14:openai            architecture + open_clip pretrained tag (GenEval's colour model; downloads)
    ViT-B-32:/path/to/weights  architecture + a local weights file
    hf-hub:<repo>              a hub repo with open_clip_config.json
    local-dir:<dir>            a local folder with open_clip_config.json + weights
    hf:<hub id or dir>         a transformers CLIPModel + CLIPProcessor (e.g. hf:openai/clip-vit-large-patch14):
                               the model and preprocessing torchmetrics' CLIPScore uses
    tiny-clip                  offline seeded random CLIP (32-px images, width 64): tests and dry runs only

CLIP score (`clip_score`): 100 x the cosine between each image's and its caption's embedding, averaged over
the images, floored at 0 — torchmetrics' CLIPScore (`max(mean(100 cos), 0)`); with the default
`hf:openai/clip-vit-large-patch14` it is the number torchmetrics' CLIPScore gives on the same images.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from microdit.encoders import MissingWeightsError

GENEVAL_CLIP = "ViT-L-14:openai"     # the colour classifier of the original benchmark
CLIP_SCORE_MODEL = "hf:openai/clip-vit-large-patch14"     # torchmetrics CLIPScore's default model
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


class CLIP:
    """An open_clip model with its eval transform and tokenizer; features are L2-normalised."""

    def __init__(self, model, preprocess, tokenizer, name: str, device="cpu"):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.name, self.device = name, device

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1))
        return torch.cat(out)


class HFCLIP:
    """A transformers CLIPModel with its CLIPProcessor, used as torchmetrics' CLIPScore uses them; features are
    L2-normalised. Captions are cut to the model's context (77 tokens) keeping the end-of-text token."""

    def __init__(self, model, processor, name: str, device="cpu"):
        self.model, self.processor = model.eval().to(device), processor
        self.name, self.device = name, device
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor(images=[im.convert("RGB") for im in images[i:i + batch_size]],
                                    return_tensors="pt")["pixel_values"].to(self.device)
            out.append(torch.nn.functional.normalize(self.model.get_image_features(pixels).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.processor(text=list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length)
            feats = self.model.get_text_features(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
        return torch.cat(out)


def _hf_clip(ref: str, device) -> HFCLIP:
    from transformers import CLIPModel, CLIPProcessor

    from microdit.encoders import hub_download_or_fail
    if os.path.isdir(ref):
        path = ref
    elif ref.startswith(("/", "./", "../", "~")):
        raise MissingWeightsError(f"CLIP folder {ref!r} does not exist: check the path")
    else:
        path = hub_download_or_fail(ref, ["*.json", "*.txt", "*.safetensors"], "CLIP model")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MissingWeightsError(f"CLIP model 'hf:{ref}': no CLIPModel + CLIPProcessor under {path} ({e})") from e
    return HFCLIP(model, processor, f"hf:{ref}", device)


def _tiny_clip(device):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32,
                                                                           patch_size=8, image_size=32),
                                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2,
                                                          layers=2))
    preprocess = open_clip.image_transform(32, is_train=False)
    return CLIP(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), "tiny-clip", device)


def load_clip(spec: str, device="cpu") -> CLIP:
    import open_clip
    if spec == "tiny-clip":
        return _tiny_clip(device)
    if spec.startswith("hf:"):
        return _hf_clip(spec[len("hf:"):], device)
    if spec.startswith("local-dir:") and not os.path.isdir(spec[len("local-dir:"):]):
        raise MissingWeightsError(f"CLIP folder {spec[len('local-dir:'):]!r} does not exist")
    if spec.startswith(("hf-hub:", "local-dir:")):
        arch, pretrained = spec, None
    elif ":" in spec:
        arch, pretrained = spec.split(":", 1)
    else:
        raise ValueError(f"CLIP model {spec!r}: use ARCH:PRETRAINED (e.g. {GENEVAL_CLIP}), ARCH:/path/weights, "
                         "hf-hub:<repo>, local-dir:<dir> or tiny-clip")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
    except (OSError, RuntimeError, ValueError) as e:
        raise MissingWeightsError(f"CLIP model {spec!r} could not be loaded ({type(e).__name__}: {e}); give a "
                                  "local path (ARCH:/path/to/weights or local-dir:<dir>) or allow hub downloads") from e
    return CLIP(model, preprocess, open_clip.get_tokenizer(arch), spec, device)


def clip_scores(clip, images: list[Image.Image], captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """100 x cos(image, caption) per image (N,)."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"clip_score needs as many captions as images (got {len(images)} and {len(captions)})")
    return 100 * (clip.image_features(images, batch_size) * clip.text_features(captions, batch_size)).sum(-1)


def clip_score(clip, images: list[Image.Image], captions: list[str], batch_size: int = 64) -> float:
    """max(mean over images of 100 x cos(image, caption), 0): torchmetrics' CLIPScore."""
    return max(float(clip_scores(clip, images, captions, batch_size).double().mean()), 0.0)


class ColorClassifier:
    """GenEval's colour check: CLIP zero-shot over colour names (templates averaged) on each object's crop,
    with the pixels outside the object's mask replaced by grey (#999)."""

    def __init__(self, clip: CLIP, colors):
        self.clip, self.colors, self._heads = clip, tuple(colors), {}

    def _head(self, classname: str) -> torch.Tensor:
        if classname not in self._heads:
            rows = []
            for c in self.colors:
                f = self.clip.text_features([t.format(c=c, cls=classname) for t in COLOR_TEMPLATES]).mean(0)
                rows.append(torch.nn.functional.normalize(f, dim=-1))
            self._heads[classname] = torch.stack(rows)
        return self._heads[classname]

    def crops(self, image: Image.Image, detections) -> list[Image.Image]:
        image = image.convert("RGB")
        grey = Image.new("RGB", image.size, "#999")
        out = []
        for d in detections:
            im = image if d.mask is None else Image.composite(image, grey, Image.fromarray(np.asarray(d.mask, bool)))
            x0, y0, x1, y1 = (int(round(v)) for v in d.box[:4])
            out.append(im.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))))
        return out

    def __call__(self, image: Image.Image, detections, classname: str) -> list[str]:
        if not detections:
            return []
        feats = self.clip.image_features(self.crops(image, detections))
        return [self.colors[i] for i in (feats @ self._head(classname).T).argmax(1).tolist()]
