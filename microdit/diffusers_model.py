"""MicroDiT as a diffusers model: `MicroDiTTransformer2DModel` (ModelMixin + ConfigMixin).

The same layers, parameter names and forward as `microdit.model.MicroDiT` (it is a subclass), so the
released state dicts and our checkpoints load into it unchanged; what diffusers adds is its folder format
and API: `save_pretrained` writes `config.json` (the MicroDiTConfig fields) + `diffusion_pytorch_model.safetensors`,
`from_pretrained(folder or hub id, subfolder="transformer")` reads them back.

    from microdit.diffusers_model import MicroDiTTransformer2DModel
    transformer = MicroDiTTransformer2DModel.from_pretrained("runs/local/diffusers", subfolder="transformer")
    transformer = MicroDiTTransformer2DModel.from_microdit(model)      # a MicroDiT we already hold (no copy)

`transformer.config` stays the `MicroDiTConfig` dataclass every other part of the project reads
(`config.in_channels`, `config.to_dict()`, ...); diffusers keeps its own copy of the fields for saving.
"""
from __future__ import annotations

from dataclasses import fields

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .model import MicroDiT, MicroDiTConfig

_DEFAULTS = MicroDiTConfig()


class MicroDiTTransformer2DModel(MicroDiT, ModelMixin, ConfigMixin):
    config_name = "config.json"
    # diffusers decides whether to assign the file's tensors from the first state-dict entry, our float32
    # position table: it would keep float32 weights under torch_dtype=bfloat16. Copy into the built model.
    _supports_param_buffer_assignment = False

    @register_to_config
    def __init__(self, latent_res: int = _DEFAULTS.latent_res, patch_size: int = _DEFAULTS.patch_size,
                 in_channels: int = _DEFAULTS.in_channels, caption_channels: int = _DEFAULTS.caption_channels,
                 pos_interp_scale: float = _DEFAULTS.pos_interp_scale, dim: int = _DEFAULTS.dim,
                 depth: int = _DEFAULTS.depth, head_dim: int = _DEFAULTS.head_dim,
                 multiple_of: int = _DEFAULTS.multiple_of, attn_ratio: tuple = _DEFAULTS.attn_ratio,
                 ffn_ratio: tuple = _DEFAULTS.ffn_ratio, patch_mixer: bool = _DEFAULTS.patch_mixer,
                 mixer_depth: int = _DEFAULTS.mixer_depth, mixer_dim: int = _DEFAULTS.mixer_dim,
                 mixer_ffn_ratio: float = _DEFAULTS.mixer_ffn_ratio, num_experts: int = _DEFAULTS.num_experts,
                 expert_capacity: float = _DEFAULTS.expert_capacity, experts_every_n: int = _DEFAULTS.experts_every_n,
                 caption_mlp_ratio: float = _DEFAULTS.caption_mlp_ratio, norm_eps: float = _DEFAULTS.norm_eps,
                 patch_skip: bool = _DEFAULTS.patch_skip):
        args = dict(locals())
        MicroDiT.__init__(self, MicroDiTConfig.from_dict({f.name: args[f.name] for f in fields(MicroDiTConfig)}))

    def __getattr__(self, name: str):
        # Submodules before config fields: `patch_mixer` is both (the blocks, and the flag that builds them).
        return torch.nn.Module.__getattr__(self, name)

    # MicroDiT's layout config (a dataclass) under the name every caller uses; diffusers saves `_internal_dict`.
    @property
    def config(self) -> MicroDiTConfig:
        return self.__dict__["_layout"]

    @config.setter
    def config(self, cfg: MicroDiTConfig) -> None:
        self.__dict__["_layout"] = cfg

    def set_resolution(self, latent_res: int, pos_interp_scale: float) -> None:
        super().set_resolution(latent_res, pos_interp_scale)
        self.register_to_config(latent_res=latent_res, pos_interp_scale=pos_interp_scale)

    @classmethod
    def from_microdit(cls, model: MicroDiT) -> "MicroDiTTransformer2DModel":
        """The same model as a diffusers model; it takes over `model`'s tensors (no copy)."""
        if isinstance(model, cls):
            return model
        with torch.device("meta"):
            out = cls(**model.config.to_dict())
        out.load_state_dict(model.state_dict(), strict=True, assign=True)
        return out.train(model.training)
