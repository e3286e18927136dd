"""Fréchet distance and the feature extractors it runs on.

- `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017),
  with the usual guard (a small diagonal offset when the product is singular, imaginary rounding dropped).
- `clean_resize`: the ONE resize of the FID protocol, clean-fid style: each channel as a float32 image,
  PIL bicubic (with PIL's antialiasing) to the extractor's input size, clipped to [0, 255].
- `InceptionFeatures`: the TF-ported Inception-v3 TorchScript (`inception-2015-12-05.pt`, the network of
  the original TF FID code, as used by clean-fid and StyleGAN2/3 metrics), 2048-d pool features of
  299 x 299 float images in [0, 255]. Loaded from a local file or URL (cached in torch's hub folder); a
  download is loaded only when its sha256 equals the pin ($MICRODIT_INCEPTION_SHA256), checked again
  before every load of the cached file; `MissingWeightsError` when it is neither on disk nor downloadable.
- `RandomConvFeatures`: a fixed, seeded random conv network (no downloaded weights): the feature space of
  the shapes Fréchet distance, and the Inception stand-in in tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from microdit.cli import UserError
from microdit.encoders import MissingWeightsError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "MICRODIT_INCEPTION"       # a local path (or URL) that overrides the default
# A downloaded network is loaded only when its sha256 equals the pin. The pin of the NVIDIA file is taken
# from INCEPTION_SHA256_ENV (64 hex digits, e.g. `sha256sum inception-2015-12-05.pt` on a machine you
# trust); without one, a download is refused. An explicit local path (--inception PATH) is the user's own file.
INCEPTION_SHA256_ENV = "MICRODIT_INCEPTION_SHA256"


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for statistics, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def clean_resize(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 255]: per-channel float PIL bicubic resize (clean-fid's 'clean' mode)."""
    arr = np.asarray(image.convert("RGB"), np.float32)
    if arr.shape[:2] == (size, size):
        return arr
    chans = [np.asarray(Image.fromarray(arr[:, :, c], mode="F").resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 255)


class RandomConvFeatures(torch.nn.Module):
    """Seeded random conv net: input (N, 3, S, S) float in [0, 255] -> (N, dim) features, no weights to download.

    Four 3x3 convolutions (stride 2 from the second on, widths dim/4, dim/4, dim/2, dim) with
    Kaiming-normal weights from `torch.manual_seed(seed)`, ReLU between, then the global mean of the
    last layer. The same seed gives the same network on every machine (torch's CPU generator).
    """

    def __init__(self, dim: int = 64, input_size: int = 32, seed: int = 0):
        super().__init__()
        self.dim, self.input_size, self.seed = dim, input_size, seed
        self.name = f"randconv-d{dim}-s{input_size}-seed{seed}"
        widths = [3, dim // 4, dim // 4, dim // 2, dim]
        gen = torch.Generator().manual_seed(seed)
        layers = []
        for i in range(4):
            conv = torch.nn.Conv2d(widths[i], widths[i + 1], 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0, (2.0 / (widths[i] * 9)) ** 0.5, generator=gen)
                conv.bias.zero_()
            layers += [conv, torch.nn.ReLU()] if i < 3 else [conv]
        self.net = torch.nn.Sequential(*layers).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 127.5 - 1.0).mean((2, 3))


class InceptionFeatures(torch.nn.Module):
    """The TF-ported Inception-v3 (TorchScript) as FID feature extractor: 2048-d pool3 features."""

    input_size = 299
    dim = 2048

    def __init__(self, path_or_url: str | None = None, device="cpu"):
        super().__init__()
        source = path_or_url or os.environ.get(INCEPTION_ENV) or INCEPTION_URL
        self.name = "inception-2015-12-05"
        self.model = torch.jit.load(str(_fetch_inception(source)), map_location=device).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, return_features=True).reshape(len(x), -1)


def sha256_file(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> Path:
    """`path` when its sha256 is `expected`; anything else is refused before it is loaded."""
    got = sha256_file(path)
    if got != expected.lower():
        raise UserError(f"{what} {path} has sha256 {got}, not the pinned {expected}: refusing to load it; "
                        "delete the file and download it again from the official URL")
    return path


def _inception_pin(source: str) -> str:
    pin = os.environ.get(INCEPTION_SHA256_ENV, "").strip().lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise UserError(f"Inception weights from {source}: no sha256 pin to check the download against: set "
                        f"${INCEPTION_SHA256_ENV} to the file's sha256 (64 hex digits) from a source you trust, "
                        "or download the file yourself and pass its path with --inception")
    return pin


def _fetch_inception(source: str) -> Path:
    if not source.startswith(("http://", "https://")):
        if not Path(source).is_file():
            raise MissingWeightsError(f"Inception weights {source!r} do not exist: download {INCEPTION_URL} "
                                      f"and pass its path (--inception PATH or ${INCEPTION_ENV})")
        return Path(source)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / source.rsplit("/", 1)[-1]
    if cached.is_file():
        return check_sha256(cached, _inception_pin(source), "cached Inception weights")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("MICRODIT_OFFLINE") == "1":
        raise MissingWeightsError(f"Inception weights are not cached at {cached} and downloads are off "
                                  f"(offline): fetch {source} there, or pass a local path with --inception")
    pin = _inception_pin(source)
    part = cached.with_name(cached.name + ".part")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source, str(part), progress=True)
    except Exception as e:   # network errors come in many types; the message says what to do
        raise MissingWeightsError(f"could not download Inception weights from {source} ({e}); fetch the file "
                                  f"by hand and pass its path with --inception or ${INCEPTION_ENV}") from e
    try:
        check_sha256(part, pin, "downloaded Inception weights")
    except UserError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, cached)                  # only a checked file ever carries the cached name
    return cached


def load_feature_extractor(name: str, device="cpu"):
    """'inception' (default URL / $MICRODIT_INCEPTION), 'inception:<path or url>', or 'randconv[:dim[:size[:seed]]]'."""
    if name == "inception" or name.startswith("inception:"):
        return InceptionFeatures(name.split(":", 1)[1] if ":" in name else None, device).to(device)
    if name == "randconv" or name.startswith("randconv:"):
        parts = [int(v) for v in name.split(":")[1:]]
        return RandomConvFeatures(*parts).to(device)
    raise ValueError(f"unknown feature extractor {name!r}: use inception, inception:<path>, randconv[:dim[:size[:seed]]]")


def extract_features(images, extractor, batch_size: int = 64, device="cpu", progress: str | None = None) -> np.ndarray:
    """Features (N, D) of an iterable of PIL images, each clean-resized to the extractor's input size."""
    from tqdm import tqdm
    feats, batch = [], []
    images = images if progress is None else tqdm(images, desc=progress, unit="img", leave=False)

    def flush():
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
        feats.append(extractor(x).double().cpu().numpy())
        batch.clear()

    for im in images:
        batch.append(clean_resize(im, extractor.input_size))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError("no images to extract features from")
    return np.concatenate(feats)
