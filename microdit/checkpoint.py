"""Model files: our own format (a folder with `model.safetensors` + `config.json`) and the release's `.pt`.

Our folder (local, or a Hugging Face hub repo with the same two files):

    config.json        {"format": "microdit", "version": 1, "preset": ..., "model": MicroDiTConfig,
                        "image_autoencoder": name, "text_encoder": name, "resolution": pixels,
                        "edm": EDMConfig, "extra": {...}}
    model.safetensors  the DiT state dict (EMA weights when the trainer keeps an EMA)

The released checkpoints are plain `torch.save` state dicts of the DiT (MicroDiT_XL_2, 512 px,
SDXL VAE or Ostris VAE, DFN5B CLIP captions); `load_model` recognises them by the `.pt` suffix, as a local
path or as `<hub repo id>/<file in the repo>`, e.g. `VSehwag24/MicroDiT/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt`
(the release's hub repository; read from the Hugging Face cache, downloaded when missing and online).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .cli import UserError
from .edm import EDMConfig
from .encoders import is_hub_id
from .model import MicroDiT, MicroDiTConfig, create_model

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT, VERSION = "microdit", 1

# What the released checkpoints were trained with (README of the release; SPEC "Headline results").
RELEASE_TEXT_ENCODER = "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"
RELEASE_VAE = {4: "sdxl", 16: "ostris"}
# Where they are published (Apache-2.0): the hub repository and its four files, with the release's figures.
RELEASE_REPO = "VSehwag24/MicroDiT"
RELEASE_FILES = {
    "ckpts/dit_4_channel_22M_real_only_data.pt": "22M real images, SDXL VAE: FID-30K 12.72, GenEval 0.46",
    "ckpts/dit_4_channel_37M_real_and_synthetic_data.pt": "37M images, SDXL VAE: FID-30K 12.66, GenEval 0.46",
    "ckpts/dit_16_channel_37M_real_and_synthetic_data.pt": "37M images, Ostris VAE: FID-30K 13.04, GenEval 0.40",
    "ckpts/dit_4_channel_0.5B_synthetic_data.pt": "490M synthetic images, SDXL VAE: FID-30K 13.26, GenEval 0.52",
}
RELEASE_SUFFIXES = (".pt", ".pth", ".bin")


def hub_file_spec(path: str) -> tuple[str, str] | None:
    """'owner/repo/dir/file.pt' -> ('owner/repo', 'dir/file.pt') when it names no local file; else None."""
    parts = str(path).split("/")
    if Path(path).exists() or str(path).startswith((".", "/", "~")) or len(parts) < 3 or not all(parts):
        return None
    return ("/".join(parts[:2]), "/".join(parts[2:])) if Path(path).suffix in RELEASE_SUFFIXES else None


def save_model(folder, model: MicroDiT, *, preset: str, image_autoencoder: str, text_encoder: str,
               resolution: int, edm: EDMConfig | None = None, extra: dict | None = None,
               state_dict: dict | None = None) -> Path:
    """Write `folder/model.safetensors` and `folder/config.json` atomically (temporary names, then rename)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT, "version": VERSION, "preset": preset, "model": model.config.to_dict(),
            "image_autoencoder": image_autoencoder, "text_encoder": text_encoder, "resolution": int(resolution),
            "edm": (edm or EDMConfig()).to_dict(), "extra": extra or {}}
    tmp = folder / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    save_file(sd, str(tmp))
    os.replace(tmp, folder / WEIGHTS_NAME)
    from .manifest import write_json_atomic
    write_json_atomic(folder / CONFIG_NAME, meta)
    return folder


def read_meta(folder) -> tuple[dict, MicroDiTConfig]:
    """A model folder's config.json, checked (it may come from anywhere): (meta, the model's layout).
    Its `edm` entry is checked too: it is what every sampler of the model uses."""
    cfg_file = Path(folder) / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} is missing: a MicroDiT model folder holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} (written by microdit.checkpoint.save_model)")
    damaged = "the folder is damaged: export or download it again"
    try:
        meta = json.loads(cfg_file.read_text())
        fmt = meta.get("format")
        config = MicroDiTConfig.from_dict(meta["model"]) if fmt == FORMAT else None
        if config is not None:
            EDMConfig.from_dict(meta.get("edm") or {})
    except (ValueError, AttributeError, KeyError, TypeError) as e:        # JSON, unknown fields, wrong types
        raise UserError(f"{cfg_file} is not a valid MicroDiT config ({type(e).__name__}: {e}): {damaged}") from None
    if config is None:
        raise UserError(f"{cfg_file}: 'format' is {fmt!r}, expected {FORMAT!r}: not a MicroDiT model folder")
    return meta, config


def load_model(path: str, *, preset: str | None = None, device="cpu", dtype=torch.float32,
               image_autoencoder: str | None = None, text_encoder: str | None = None) -> tuple[MicroDiT, dict]:
    """Load a DiT from our folder, a hub repo id, or a released `.pt` state dict; returns (model, meta).

    meta has the keys of config.json; for a `.pt` file they are inferred (and can be overridden).
    """
    p = Path(path)
    hub_file = hub_file_spec(path)
    if hub_file is not None:
        from .encoders import hub_file_or_fail
        local = Path(hub_file_or_fail(*hub_file, what="MicroDiT checkpoint"))
        return _load_release(local, preset, device, dtype, image_autoencoder, text_encoder, source=str(path))
    if p.suffix in RELEASE_SUFFIXES or (p.is_file() and p.suffix != ".safetensors"):
        return _load_release(p, preset, device, dtype, image_autoencoder, text_encoder)
    if p.exists():
        folder = p.parent if p.is_file() else p
    elif is_hub_id(path):
        folder = _hub_snapshot(path)
    else:
        raise FileNotFoundError(f"checkpoint {path}: no such folder or file (a MicroDiT folder holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME}; a released checkpoint is a .pt file; a hub id is owner/name)")
    meta, config = read_meta(folder)
    damaged = "the folder is damaged: export or download it again"
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights} is missing: a MicroDiT model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}): {damaged}") from None
    with torch.device("meta"):                  # no time spent initialising weights about to be replaced
        model = MicroDiT(config)
    load_strict(model, state, str(weights))
    if image_autoencoder:
        meta["image_autoencoder"] = image_autoencoder
    if text_encoder:
        meta["text_encoder"] = text_encoder
    return model.to(device=device, dtype=dtype).eval(), meta


def release_state_dict(obj) -> dict:
    """The DiT state dict inside a released file (plain, or wrapped by a trainer under 'state_dict'/'dit.')."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    for prefix in ("model.dit.", "dit.", "module."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_release(file: Path, preset, device, dtype, image_autoencoder, text_encoder, source: str | None = None):
    if not file.exists():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    try:
        sd = release_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as e:          # corrupt, truncated, or a pickle that needs code to load (refused)
        raise UserError(f"{file} cannot be read as a tensor state dict ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): download it again") from None
    try:
        dim, in_channels = sd["x_embedder.proj.weight"].shape[:2]
        caption_channels = sd["y_embedder.y_proj.fc1.weight"].shape[1]
        tokens = sd["pos_embed"].shape[1]
    except KeyError as e:
        raise UserError(f"{file} is not a MicroDiT state dict (no {e.args[0]!r})") from None
    preset = preset or {1024: "MicroDiT_XL_2", 512: "MicroDiT_Tiny_2"}.get(int(dim))
    if preset is None:
        raise UserError(f"{file}: backbone width {dim} matches no preset; pass --preset")
    patch = int(sd["x_embedder.proj.weight"].shape[-1])
    latent_res = int(round(tokens ** 0.5)) * patch
    pos_interp_scale = infer_pos_interp_scale(sd["pos_embed"])   # 1 at 256 px (latent 32), 2 at 512 px
    with torch.device("meta"):
        model = create_model(preset, latent_res=latent_res, in_channels=int(in_channels),
                             caption_channels=int(caption_channels), pos_interp_scale=pos_interp_scale,
                             patch_size=patch)
    load_strict(model, sd, f"{file} (as {preset})")
    meta = {"format": "release-pt", "preset": preset, "model": model.config.to_dict(),
            "image_autoencoder": image_autoencoder or RELEASE_VAE.get(int(in_channels), "sdxl"),
            "text_encoder": text_encoder or RELEASE_TEXT_ENCODER, "resolution": latent_res * 8,
            "edm": EDMConfig(P_mean=0.0 if latent_res >= 64 else -0.6, P_std=0.6 if latent_res >= 64 else 1.2).to_dict(),
            "extra": {"source": source or str(file)}}
    return model.to(device=device, dtype=dtype).eval(), meta


def infer_pos_interp_scale(pos_embed: torch.Tensor) -> float:
    """The interpolation scale a stored sin-cos table was made with (its first channel is sin(column / scale))."""
    from .model import sincos_pos_embed_2d
    pe = pos_embed.reshape(-1, pos_embed.shape[-1]).float()
    dim, grid = pe.shape[1], int(round(pe.shape[0] ** 0.5))
    angle = torch.atan2(pe[1, 0], pe[1, dim // 4]).item()      # column 1: sin and cos of 1 / scale
    scale = round(1.0 / angle, 4) if angle > 0 else 1.0
    if not torch.allclose(sincos_pos_embed_2d(dim, grid, scale), pe, atol=1e-3):
        raise ValueError(f"pos_embed ({tuple(pos_embed.shape)}) is not a 2-D sin-cos table of any interpolation scale")
    return scale


def load_strict(model: MicroDiT, sd: dict, what: str) -> None:
    """load_state_dict(strict=True) with an error that names the file and the first differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"{what} does not match the MicroDiT architecture: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(wrong)} of another shape (e.g. {wrong[:3]}); pass the right preset or config")
    model.load_state_dict(sd, strict=True, assign=True)     # takes the file's tensors (model may be on meta)


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the cache) a hub repo holding our two files; fail fast when offline."""
    from .encoders import hub_download_or_fail
    return Path(hub_download_or_fail(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                                     what="MicroDiT model"))
