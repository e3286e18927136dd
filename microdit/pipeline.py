"""Text-to-image generation with a trained MicroDiT, as a diffusers `DiffusionPipeline`.

    from microdit import MicroDiTPipeline
    pipe = MicroDiTPipeline.from_pretrained("runs/local/diffusers")       # a diffusers folder or hub id,
    pipe = MicroDiTPipeline.from_pretrained("runs/local/train/stage4-x/final")   # our checkpoint folder,
    pipe = MicroDiTPipeline.from_pretrained("VSehwag24/MicroDiT/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt")
    images = pipe(["a red cube left of a blue sphere"], num_inference_steps=30, guidance_scale=5.0, seed=0).images
    pipe.save_pretrained("out/")                                          # diffusers' folder layout

Components: `transformer` (MicroDiTTransformer2DModel) and, optionally, `vae` (an AutoencoderKL). The text
encoder (an OpenCLIP tower or T5) and, without a `vae` component, the image autoencoder are named in the
pipeline config (`text_encoder_name`, `image_autoencoder_name`: names of `microdit.encoders`) and loaded on
first use. Sampling goes through `microdit.sampling` (the path training grids and evaluation share): EDM Heun with
classifier-free guidance, the all-zero caption as the unconditional branch. Noise is drawn per image from
(seed, image index), so a result depends on the seed and the image's position, not on the batch size.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from .cli import UserError
from .diffusers_model import MicroDiTTransformer2DModel
from .edm import EDMConfig
from .encoders import (DEFAULT_IMAGE_AUTOENCODER, DEFAULT_TEXT_ENCODER, DiffusersAutoencoder, load_image_autoencoder,
                       load_text_encoder)
from .sampling import decode_images, sample_latents


def image_noise(seed: int, index: int, shape: tuple) -> torch.Tensor:
    """Unit Gaussian latents of image `index` under `seed` (drawn on the CPU: identical on every device)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return torch.randn(shape, generator=g)


def _edm_settings(edm) -> EDMConfig:
    """A pipeline's EDM settings, checked (a saved pipeline's model_index.json comes from anywhere)."""
    try:
        return EDMConfig.from_dict(edm or {})
    except ValueError as e:
        raise UserError(f"the pipeline's edm settings are not valid ({e}): the folder is damaged; export it "
                        "again (python -m microdit.to_diffusers)") from None


class MicroDiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, vae=None, image_autoencoder_name: str = DEFAULT_IMAGE_AUTOENCODER,
                 text_encoder_name: str = DEFAULT_TEXT_ENCODER, edm: dict | None = None, preset: str | None = None,
                 image_autoencoder=None, text_encoder=None):
        """transformer: a MicroDiT (taken over without a copy); image_autoencoder / text_encoder: already
        loaded `microdit.encoders` objects (their names are recorded), instead of loading by name on first use."""
        super().__init__()
        self.register_modules(transformer=MicroDiTTransformer2DModel.from_microdit(transformer).eval(), vae=vae)
        self.register_to_config(
            image_autoencoder_name=image_autoencoder.name if image_autoencoder is not None else image_autoencoder_name,
            text_encoder_name=text_encoder.name if text_encoder is not None else text_encoder_name,
            edm=_edm_settings(edm).to_dict(), preset=preset)
        self._image_autoencoder, self._text_encoder = image_autoencoder, text_encoder
        for enc in (image_autoencoder, text_encoder):
            if enc is not None:
                self._check(enc)
        self.last_seed: int | None = None

    # ---- loading: a diffusers folder / hub id through diffusers, our folders and released .pt through ours ----
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, image_autoencoder: str | None = None,
                        text_encoder: str | None = None, device=None, dtype=None, preset: str | None = None,
                        **kwargs) -> "MicroDiTPipeline":
        """A diffusers folder or hub id (diffusers' own loader), our checkpoint folder (or a hub id holding one),
        or a released `.pt` (a path or `<hub repo id>/<file>`). image_autoencoder / text_encoder override the
        recorded encoder names; dtype (or torch_dtype) is the transformer's dtype. The encoders are loaded here
        (the constructor loads them on first use)."""
        source = str(pretrained_model_name_or_path)
        dtype = kwargs.pop("torch_dtype", None) or dtype
        if _is_diffusers_pipeline(source):
            names = {k: v for k, v in (("image_autoencoder_name", image_autoencoder),
                                       ("text_encoder_name", text_encoder)) if v}
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                kwargs.setdefault("local_files_only", True)
            kwargs.setdefault("low_cpu_mem_usage", False)
            pipe = super().from_pretrained(source, torch_dtype=dtype, **names, **kwargs)
        else:
            from .checkpoint import load_model
            model, meta = load_model(source, preset=preset, dtype=dtype or torch.float32,
                                     image_autoencoder=image_autoencoder, text_encoder=text_encoder)
            pipe = cls(model, image_autoencoder_name=meta["image_autoencoder"], text_encoder_name=meta["text_encoder"],
                       edm=meta["edm"], preset=meta.get("preset"))
        if device is not None:
            pipe.to(device)
        pipe.image_autoencoder, pipe.text_encoder     # load the encoders now: missing weights fail here, at once
        return pipe

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        device = self.transformer.device
        for enc in (self._image_autoencoder, self._text_encoder):
            if enc is not None:
                enc.to(device)
        return self

    # ---- the encoders (a `vae` component, when present, is the image autoencoder) ----
    def _encoder_dtype(self) -> torch.dtype:
        return self.transformer.dtype if self.transformer.device.type == "cuda" else torch.float32

    @property
    def image_autoencoder(self):
        if self._image_autoencoder is None:
            name, device = self.config.image_autoencoder_name, self.transformer.device
            self._image_autoencoder = self._check(
                DiffusersAutoencoder(self.vae, name, device, self._encoder_dtype()) if self.vae is not None
                else load_image_autoencoder(name, device=device, dtype=self._encoder_dtype()))
        return self._image_autoencoder

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = self._check(load_text_encoder(self.config.text_encoder_name,
                                                               device=self.transformer.device,
                                                               dtype=self._encoder_dtype()))
        return self._text_encoder

    def _check(self, encoder):
        cfg = self.transformer.config
        if hasattr(encoder, "dim") and encoder.dim != cfg.caption_channels:
            raise UserError(f"text encoder {encoder.name!r} gives {encoder.dim}-wide embeddings but the model expects "
                             f"caption_channels={cfg.caption_channels}: pass the encoder it was trained with")
        if hasattr(encoder, "latent_channels") and encoder.latent_channels != cfg.in_channels:
            raise UserError(f"image autoencoder {encoder.name!r} has {encoder.latent_channels} latent channels but "
                             f"the model expects in_channels={cfg.in_channels}")
        return encoder

    # ---- what callers read ----
    @property
    def model(self) -> MicroDiTTransformer2DModel:
        return self.transformer

    @property
    def edm(self) -> EDMConfig:
        return _edm_settings(self.config.edm)

    @property
    def meta(self) -> dict:
        """The checkpoint description in the keys of our config.json."""
        return {"preset": self.config.preset, "model": self.transformer.config.to_dict(),
                "image_autoencoder": self.config.image_autoencoder_name, "text_encoder": self.config.text_encoder_name,
                "resolution": self.resolution, "edm": dict(self.config.edm)}

    @property
    def latent_shape(self) -> tuple:
        c = self.transformer.config
        return (c.in_channels, c.latent_res, c.latent_res)

    @property
    def resolution(self) -> int:
        return self.transformer.config.latent_res * self.image_autoencoder.downsample

    # ---- sampling ----
    @torch.inference_mode()
    def generate_latents(self, prompts: list[str] | str, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                         seed: int | None = None, images_per_prompt: int = 1, batch_size: int = 8,
                         progress: bool = True, noise_seeds: list[int] | None = None) -> torch.Tensor:
        """Sampled latents (len(prompts) * images_per_prompt, C, h, w), prompt-major, float32 on the CPU.

        noise_seeds (optional, one per image): image k's noise is torch.randn from
        torch.Generator().manual_seed(noise_seeds[k]) instead of from (seed, k) (evaluation uses this).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or images_per_prompt < 1 or batch_size < 1 or num_inference_steps < 1:
            raise UserError("need at least one prompt, images_per_prompt >= 1, batch_size >= 1 and steps >= 1")
        seed = random.SystemRandom().randrange(2 ** 31) if seed is None else int(seed)
        self.last_seed = seed
        texts = [p for p in prompts for _ in range(images_per_prompt)]
        if noise_seeds is not None and len(noise_seeds) != len(texts):
            raise UserError(f"noise_seeds: expected one per image ({len(texts)}), got {len(noise_seeds)}")

        def noise_of(i):
            if noise_seeds is None:
                return image_noise(seed, i, self.latent_shape)
            return torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(noise_seeds[i])))
        starts = range(0, len(texts), batch_size)
        bar = self.progress_bar(total=len(starts) * num_inference_steps) if progress else None
        out = []
        for k in starts:
            y = self.text_encoder.encode(texts[k:k + batch_size])
            noise = torch.stack([noise_of(i) for i in range(k, k + len(y))])
            step = (lambda it: _ticks(it, bar)) if bar is not None else None
            out.append(sample_latents(self.transformer, noise, y, num_inference_steps, guidance_scale, self.edm,
                                      step).cpu())
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        return decode_images(self.image_autoencoder, latents, batch_size)

    def generate(self, prompts: list[str] | str, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 seed: int | None = None, images_per_prompt: int = 1, batch_size: int = 8,
                 progress: bool = True, noise_seeds: list[int] | None = None) -> list[Image.Image]:
        """PIL images, prompt-major: [p0 img0, p0 img1, ..., p1 img0, ...]."""
        latents = self.generate_latents(prompts, num_inference_steps, guidance_scale, seed, images_per_prompt,
                                        batch_size, progress, noise_seeds)
        return self.decode(latents, batch_size)

    def __call__(self, prompt: list[str] | str, num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1, seed: int | None = None, output_type: str = "pil",
                 return_dict: bool = True, batch_size: int = 8, progress: bool = True):
        """diffusers' calling convention: `.images` holds PIL images (output_type "pil"), a float array in
        [0, 1] (N, H, W, 3) ("np") or the latents ("latent")."""
        if output_type not in ("pil", "np", "latent"):
            raise UserError(f"output_type {output_type!r}: use 'pil', 'np' or 'latent'")
        latents = self.generate_latents(prompt, num_inference_steps, guidance_scale, seed, num_images_per_prompt,
                                        batch_size, progress)
        if output_type == "latent":
            images = latents
        else:
            images = self.decode(latents, batch_size)
            if output_type == "np":
                images = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _ticks(it, bar):
    for i in it:
        yield i
        bar.update(1)


def _is_diffusers_pipeline(source: str) -> bool:
    """A local folder with model_index.json, or a hub repo holding one (cached, or on the hub when online)."""
    from .checkpoint import hub_file_spec
    path = Path(source)
    if path.exists():
        return path.is_dir() and (path / "model_index.json").is_file()
    if hub_file_spec(source) is not None or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return False
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(source, "model_index.json", local_files_only=True)
        return True
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import file_exists
        return bool(file_exists(source, "model_index.json"))
    except Exception:
        return False
