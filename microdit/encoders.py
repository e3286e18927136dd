"""Image autoencoders and text encoders behind one interface, used by precompute and by generation.

Names (a string is all a config or checkpoint stores):

  image autoencoders
    sdxl                     SDXL VAE (4 ch, f8): stabilityai/stable-diffusion-xl-base-1.0, subfolder vae
    ostris                   Ostris 16-channel VAE (f8): ostris/vae-kl-f8-d16
    diffusers:<id or path>   any diffusers AutoencoderKL (append #subfolder when it lives in one)
    pixel, pixel:<f>         offline, parameter-free: space-to-depth by f (exact inverse); pixels in [-1, 1]
    tiny-kl                  offline: a small randomly initialised (seeded) AutoencoderKL, f4, 4 ch

  text encoders
    openclip:hf-hub:<repo>   OpenCLIP text tower (default: hf-hub:apple/DFN5B-CLIP-ViT-H-14-378), per-token
                             output after the final LayerNorm, causal mask kept, no projection; 77 tokens
    openclip:local-dir:<dir> the same from a local folder (open_clip_config.json + weights)
    t5:<id or path>          T5 encoder (transformers), last hidden state, 120 tokens
    tiny-clip[:<len>]        offline: the real OpenCLIP BPE tokenizer + a small seeded random text tower

Every encoder is a callable-free plain object with `encode(...)`; loading fails at once, naming the model
and what to do, when weights are absent (never a long hang on hub retries).
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import UserError

DEFAULT_TEXT_ENCODER = "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
DEFAULT_IMAGE_AUTOENCODER = "sdxl"
VAE_ALIASES = {
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "vae"),
    "ostris": ("ostris/vae-kl-f8-d16", None),
}


class MissingWeightsError(UserError, RuntimeError):
    """A model's weights are not on disk and cannot be downloaded now (the message says how to get them)."""


# --------------------------------------------------------------------------------------------
#                                     Finding weights
# --------------------------------------------------------------------------------------------

def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_or_download(fetch, label: str, hint: str) -> str:
    """fetch(local_files_only=True) from the Hugging Face cache, else downloaded; fail fast when offline."""
    try:
        return fetch(local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or not _hub_reachable():
        raise MissingWeightsError(f"{label} is not in the local Hugging Face cache and the hub cannot be "
                                  f"reached: {hint}")
    try:
        return fetch(local_files_only=False)
    except Exception as e:
        raise MissingWeightsError(f"{label} could not be downloaded ({e}): {hint}") from e


def hub_download_or_fail(repo_id: str, allow_patterns=None, what: str = "model") -> str:
    """Local snapshot of a hub repo: from the cache if there, else downloaded; fail fast when offline."""
    from huggingface_hub import snapshot_download
    hint = (f"download it on a connected machine (`huggingface-cli download {repo_id}`) and copy the "
            f"Hugging Face cache here, or pass a local path instead of the hub name")
    return _cached_or_download(lambda **kw: snapshot_download(repo_id, allow_patterns=allow_patterns, **kw),
                               f"{what} {repo_id!r}", hint)


def hub_file_or_fail(repo_id: str, filename: str, what: str = "model file") -> str:
    """Local path of one file of a hub repo: from the cache if there, else downloaded; fail fast when offline."""
    from huggingface_hub import hf_hub_download
    hint = (f"download it on a connected machine (`huggingface-cli download {repo_id} {filename}`) and copy the "
            f"Hugging Face cache here, or pass the local path of the file")
    return _cached_or_download(lambda **kw: hf_hub_download(repo_id, filename, **kw),
                               f"{what} {filename!r} of {repo_id!r}", hint)


_HUB_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face repo id ("owner/name") rather than a local path: one slash, both
    parts plain names, no file suffix, and no local folder named like its owner part."""
    parts = name.split("/")
    return (len(parts) == 2 and all(_HUB_PART.fullmatch(x) and ".." not in x for x in parts)
            and Path(name).suffix.lower() not in (".pt", ".pth", ".bin", ".safetensors", ".json", ".ckpt")
            and not os.path.isdir(parts[0]))


def _local_or_hub(name: str, allow_patterns, what: str) -> str:
    if os.path.exists(name):
        return name
    if not is_hub_id(name):
        raise MissingWeightsError(f"{what} {name!r}: no such file or folder (and not a hub id owner/name): "
                                  "check the path")
    return hub_download_or_fail(name, allow_patterns, what)


# --------------------------------------------------------------------------------------------
#                                    Image autoencoders
# --------------------------------------------------------------------------------------------

class PixelAutoencoder:
    """Parameter-free: latents are the pixels (in [-1, 1]) rearranged space-to-depth by `factor`."""

    def __init__(self, factor: int = 1):
        self.name = "pixel" if factor == 1 else f"pixel:{factor}"
        self.factor, self.downsample, self.latent_channels = factor, factor, 3 * factor * factor

    def to(self, device):
        return self

    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return F.pixel_unshuffle(images.float(), self.factor) if self.factor > 1 else images.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents.float(), self.factor) if self.factor > 1 else latents.float()


class DiffusersAutoencoder:
    """A diffusers AutoencoderKL; latents = (posterior sample - shift) * scaling_factor.

    A VAE whose config sets `force_upcast` (the SDXL and Ostris VAEs do: their fp16 decodes overflow into
    NaN images) runs in float32 whatever `dtype` asks for; the latents and images it hands over are float32.
    """

    def __init__(self, vae, name: str, device="cpu", dtype=torch.float32):
        cfg = vae.config
        self.force_upcast = bool(getattr(cfg, "force_upcast", False))
        if self.force_upcast:
            dtype = torch.float32
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.name, self.dtype = name, dtype
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def to(self, device):
        self.vae.to(device)
        return self

    @property
    def device(self):
        return next(self.vae.parameters()).device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        z = dist.sample(generator=generator)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float()


def tiny_kl_vae(seed: int = 0):
    """A small AutoencoderKL (f4, 4 latent channels) with seeded random weights: the offline stand-in."""
    from diffusers import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0)


def load_image_autoencoder(name: str, device="cpu", dtype=torch.float32):
    if name == "pixel" or name.startswith("pixel:"):
        factor = name.split(":", 1)[1] if ":" in name else "1"
        if not factor.isdigit() or int(factor) < 1:
            raise UserError(f"image autoencoder {name!r}: pixel:<f> takes a positive whole factor, e.g. pixel:2")
        return PixelAutoencoder(int(factor))
    if name == "tiny-kl":
        return DiffusersAutoencoder(tiny_kl_vae(), name, device, dtype)
    from diffusers import AutoencoderKL
    if name in VAE_ALIASES:
        repo, subfolder = VAE_ALIASES[name]
    elif name.startswith("diffusers:"):
        repo, _, subfolder = name[len("diffusers:"):].partition("#")
        subfolder = subfolder or None
    else:
        raise UserError(f"unknown image autoencoder {name!r}: use sdxl, ostris, diffusers:<id or path>, "
                         "pixel[:f] or tiny-kl")
    patterns = [f"{subfolder}/*" if subfolder else "*"]
    path = _local_or_hub(repo, patterns, "image autoencoder")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True)
    except (OSError, EnvironmentError) as e:
        raise MissingWeightsError(f"image autoencoder {name!r}: no AutoencoderKL weights under {path} "
                                  f"(subfolder {subfolder!r}): {e}") from e
    return DiffusersAutoencoder(vae, name, device, dtype)


# --------------------------------------------------------------------------------------------
#                                       Text encoders
# --------------------------------------------------------------------------------------------

def _clip_tokens(tower, ids: torch.Tensor) -> torch.Tensor:
    """Per-token output of an OpenCLIP text tower after its final LayerNorm (causal mask, no projection)."""
    L = ids.shape[1]
    cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else torch.float32
    x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:L].to(cast)
    mask = tower.attn_mask
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:L, :L])
    return tower.ln_final(x)


class OpenCLIPTextEncoder:
    def __init__(self, tower, tokenizer, name: str, max_length: int, device="cpu", dtype=torch.float32):
        self.tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.name, self.max_length, self.dtype = tokenizer, name, max_length, dtype
        self.dim = int(tower.ln_final.weight.shape[0])

    def to(self, device):
        self.tower.to(device)
        return self

    @property
    def device(self):
        return next(self.tower.parameters()).device

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), context_length=self.max_length)

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, max_length, dim) float32 per-token embeddings."""
        return _clip_tokens(self.tower, self.tokenize(captions).to(self.device)).float()


class T5TextEncoder:
    def __init__(self, model, tokenizer, name: str, max_length: int = 120, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.name, self.max_length = tokenizer, name, max_length
        self.dim = int(model.config.d_model)

    def to(self, device):
        self.model.to(device)
        return self

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev))
        return out.last_hidden_state.float()


def tiny_clip_tower(context_length: int, width: int = 64, layers: int = 2, heads: int = 2, seed: int = 0):
    from open_clip.transformer import TextTransformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextTransformer(context_length=context_length, vocab_size=49408, width=width, heads=heads,
                               layers=layers, output_dim=None)


def load_text_encoder(name: str, device="cpu", dtype=torch.float32):
    import open_clip
    if name == "tiny-clip" or name.startswith("tiny-clip:"):
        length = int(name.split(":", 1)[1]) if ":" in name else 77
        tok = open_clip.get_tokenizer("ViT-B-32")
        return OpenCLIPTextEncoder(tiny_clip_tower(length), tok, name, length, device, dtype)
    if name.startswith("openclip:"):
        ref = name[len("openclip:"):]
        if ref.startswith("hf-hub:"):
            repo = ref[len("hf-hub:"):]
            path = hub_download_or_fail(repo, ["open_clip_config.json", "*.safetensors", "*.bin", "*.json", "*.txt"],
                                        "OpenCLIP text encoder")
            ref = "local-dir:" + path
        if ref.startswith("local-dir:"):
            folder = Path(ref[len("local-dir:"):])
            has_weights = any(any(folder.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth"))
            if not (folder / "open_clip_config.json").is_file() or not has_weights:
                # open_clip itself would only warn and go on with random weights
                raise MissingWeightsError(f"OpenCLIP text encoder {name!r}: {folder} needs open_clip_config.json and "
                                          "a weights file (*.safetensors, *.bin or *.pth); download the model "
                                          "on a connected machine and copy the folder here")
        model = open_clip.create_model(ref)          # local-dir: loads config and weights from the folder
        if hasattr(model, "visual"):
            model.visual = torch.nn.Identity()       # only the text tower is used
        tok = open_clip.get_tokenizer(ref)
        length = int(getattr(tok, "context_length", 77) or 77)
        tower = model.text if hasattr(model, "text") else model
        return OpenCLIPTextEncoder(_TowerView(tower), tok, name, length, device, dtype)
    if name.startswith("t5:"):
        from transformers import AutoTokenizer, T5EncoderModel
        path = _local_or_hub(name[3:], ["*.json", "*.safetensors", "*.model", "*.txt"], "T5 text encoder")
        try:
            model = T5EncoderModel.from_pretrained(path, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, EnvironmentError) as e:
            raise MissingWeightsError(f"T5 text encoder {name!r}: no weights or tokenizer under {path}: {e}") from e
        return T5TextEncoder(model, tok, name, 120, device, dtype)
    raise UserError(f"unknown text encoder {name!r}: use openclip:hf-hub:<repo>, openclip:local-dir:<dir>, "
                     "t5:<id or path> or tiny-clip[:<len>]")


class _TowerView(torch.nn.Module):
    """The text half of a full CLIP model, exposing the attributes `_clip_tokens` reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for attr in ("token_embedding", "transformer", "ln_final"):
            setattr(self, attr, getattr(model, attr))

    @property
    def positional_embedding(self):
        return self.model.positional_embedding

    @property
    def attn_mask(self):
        return self.model.attn_mask


def encoder_signature(image_autoencoder, text_encoder) -> dict:
    """What a latent set or checkpoint records about the encoders it was made with."""
    return {"image_autoencoder": image_autoencoder.name, "latent_channels": image_autoencoder.latent_channels,
            "downsample": image_autoencoder.downsample, "text_encoder": text_encoder.name,
            "caption_len": text_encoder.max_length, "caption_dim": text_encoder.dim}
