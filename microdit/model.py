"""MicroDiT: a sparse diffusion transformer with a patch mixer, deferred masking and expert-choice MoE.

Reads top to bottom: configuration, layers (attention, feed-forward, MoE), embedders, the adaLN block,
the model, position embeddings, FLOP accounting, presets. The layout follows the released
MicroDiT checkpoints exactly (parameter names and shapes), so their state dicts load with strict=True.

    import microdit
    model = microdit.create_model("MicroDiT_XL_2", latent_res=32, caption_channels=1024)
    out = model(latents, c_noise, caption_embeddings, mask_ratio=0.75)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .configs import check_fields


# --------------------------------------------------------------------------------------------
#                                       Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class MicroDiTConfig:
    latent_res: int = 32               # latent height = width (32 for 256 px with an f8 VAE)
    patch_size: int = 2                # conv patch embedding kernel = stride
    in_channels: int = 4               # latent channels (4 for SDXL VAE, 16 for Ostris, 3 for pixels)
    caption_channels: int = 1024       # width of the text encoder's per-token embeddings
    pos_interp_scale: float = 1.0      # position coordinates are divided by this (1 at 256 px, 2 at 512)
    dim: int = 1024                    # backbone width D
    depth: int = 28                    # backbone blocks
    head_dim: int = 64                 # attention head width everywhere
    multiple_of: int = 256             # feed-forward hidden widths round up to this
    attn_ratio: tuple = (0.5, 1.0)     # layer-wise scaling: attention width ratio, first -> last block
    ffn_ratio: tuple = (0.5, 4.0)      # layer-wise scaling: feed-forward ratio, first -> last block
    patch_mixer: bool = True           # False = the paper's naive-masking baseline (mask right after patchify)
    mixer_depth: int = 6               # patch mixer blocks (run on all tokens, before masking)
    mixer_dim: int = 768               # patch mixer width Dm
    mixer_ffn_ratio: float = 4.0       # patch mixer feed-forward ratio (attention ratio is 1)
    num_experts: int = 8               # experts per MoE feed-forward
    expert_capacity: float = 2.0       # capacity factor: each expert takes floor(capacity * T / E) tokens
    experts_every_n: int = 2           # MoE in blocks i with (i + 1) % n == 0 (never the last backbone block)
    caption_mlp_ratio: float = 4.0     # feed-forward ratio of the caption refinement block
    norm_eps: float = 1e-6
    patch_skip: bool = False           # a learned linear map from each input patch to its output (not released)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attn_ratio"], d["ffn_ratio"] = list(self.attn_ratio), list(self.ffn_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MicroDiTConfig":
        check_fields(cls, d, "MicroDiT config")
        d = dict(d)
        for k in ("attn_ratio", "ffn_ratio"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    # ---- derived layout (one place, used by the model and by FLOP accounting) ----
    @property
    def grid(self) -> int:
        return self.latent_res // self.patch_size

    def attn_width(self, ratio: float, width: int) -> int:
        if ratio == 1:
            return width
        m = 2 * self.head_dim
        return m * math.ceil(int(width * ratio) / m)

    def dense_hidden(self, ratio: float, width: int) -> int:
        h = int(2 * int(width * ratio) / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)

    def moe_hidden(self, ratio: float, width: int) -> int:
        return self.multiple_of * math.ceil(int(width * ratio) / self.multiple_of)

    def backbone_ratios(self) -> list[tuple[float, float]]:
        a = np.linspace(self.attn_ratio[0], self.attn_ratio[1], self.depth)
        f = np.linspace(self.ffn_ratio[0], self.ffn_ratio[1], self.depth)
        return [(float(a[i]), float(f[i])) for i in range(self.depth)]

    def is_moe(self, i: int, depth: int, last_allowed: bool) -> bool:
        if self.num_experts <= 1 or (i == depth - 1 and not last_allowed):
            return False
        return (i + 1) % self.experts_every_n == 0


# --------------------------------------------------------------------------------------------
#                                 Attention and feed-forward
# --------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(width: int, eps: float, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with a weight and no bias (affine) or with neither (for q/k normalisation)."""
    return nn.LayerNorm(width, eps=eps, elementwise_affine=affine, bias=False)


def _attend(q, k, v, heads: int) -> torch.Tensor:
    n, tq, w = q.shape
    q = q.view(n, tq, heads, -1).transpose(1, 2)
    k = k.view(n, k.shape[1], heads, -1).transpose(1, 2)
    v = v.view(n, v.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, tq, w)


class SelfAttention(nn.Module):
    """Fused qkv projection to `width`, LayerNorm (no weight) on q and k over the whole width, SDPA."""

    def __init__(self, dim: int, width: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = width // head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.proj = nn.Linear(width, dim, bias=False)
        self.ln_q = layer_norm(width, eps, affine=False)
        self.ln_k = layer_norm(width, eps, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(self.ln_q(q), self.ln_k(k), v, self.heads))


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from caption tokens; no mask over caption padding."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.heads = dim // head_dim
        self.q_linear = nn.Linear(dim, dim, bias=False)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ln_q = layer_norm(dim, eps, affine=False)
        self.ln_k = layer_norm(dim, eps, affine=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        return self.proj(_attend(self.ln_q(self.q_linear(x)), self.ln_k(k), v, self.heads))


class FeedForward(nn.Module):
    """Gated feed-forward w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice mixture of experts: each expert picks its top-k tokens by router probability.

    k = floor(expert_capacity * T / E). Tokens are moved with gather / index_add (O(k*D) memory
    traffic per expert) rather than one-hot einsums (O(k*T*D) FLOPs). A token's output is the
    probability-weighted sum over the experts that chose it; a token no expert chose gets zero.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, expert_capacity: float):
        super().__init__()
        self.num_experts, self.expert_capacity = num_experts, expert_capacity
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def tokens_per_expert(self, t: int) -> int:
        return int(self.expert_capacity * t / self.num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities and the choice of each expert: (N, E, k) weights and token indices."""
        probs = F.softmax(self.gate(x), dim=-1)                             # (N, T, E)
        return torch.topk(probs.transpose(1, 2), self.tokens_per_expert(x.shape[1]), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        g, idx = self.route(x)                                              # (N, E, k)
        e, k = idx.shape[1], idx.shape[2]
        flat = (idx + torch.arange(n, device=x.device).view(n, 1, 1) * t)   # index into N*T rows
        flat = flat.transpose(0, 1).reshape(-1)                            # (E*N*k,), expert-major
        xin = x.reshape(n * t, d).index_select(0, flat).view(e, n * k, d)   # gather (backward: index_add)
        h = F.gelu(torch.bmm(xin, self.w1))                                 # (E, N*k, H)
        h = torch.bmm(h, self.w2)                                           # (E, N*k, D)
        h = h * g.transpose(0, 1).reshape(e, n * k, 1).to(h.dtype)
        # Under CUDA autocast x is fp32 (it comes from layer_norm) and h bf16 (from the matmuls): the
        # experts' outputs are summed in x's dtype, as index_add needs one dtype.
        out = x.new_zeros(n * t, d).index_add(0, flat, h.reshape(-1, d).to(x.dtype))  # scatter-add back
        return out.view(n, t, d)


# --------------------------------------------------------------------------------------------
#                                         Embedders
# --------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)                      # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of c_noise (cos half, then sin half) -> Linear -> GELU-tanh -> Linear."""

    def __init__(self, dim: int, frequency_dim: int = 512):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """fc1 -> GELU-tanh -> LayerNorm -> fc2 (caption projection and pooled-caption path)."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.norm = layer_norm(dim, eps)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class CaptionProjection(nn.Module):
    def __init__(self, caption_channels: int, dim: int, eps: float):
        super().__init__()
        self.y_proj = Mlp(caption_channels, dim, eps)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class CaptionRefiner(nn.Module):
    """One pre-norm transformer block over the caption tokens (self-attention + gated FFN)."""

    def __init__(self, cfg: MicroDiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = layer_norm(d, cfg.norm_eps)
        self.attn = SelfAttention(d, d, cfg.head_dim, cfg.norm_eps)
        self.norm2 = layer_norm(d, cfg.norm_eps)
        self.mlp = FeedForward(d, cfg.dense_hidden(cfg.caption_mlp_ratio, d))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))


# --------------------------------------------------------------------------------------------
#                                        adaLN block
# --------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to the caption (ungated), modulated FFN."""

    def __init__(self, width: int, cond_dim: int, attn_width: int, ffn: nn.Module, cfg: MicroDiTConfig):
        super().__init__()
        eps = cfg.norm_eps
        self.norm1 = layer_norm(width, eps)
        self.attn = SelfAttention(width, attn_width, cfg.head_dim, eps)
        self.cross_attn = CrossAttention(width, cfg.head_dim, eps)
        self.norm2 = layer_norm(width, eps)
        self.norm3 = layer_norm(width, eps)
        self.mlp = ffn
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cond_dim, 6 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), y)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift2, scale2))


def make_block(cfg: MicroDiTConfig, width: int, attn_ratio: float, ffn_ratio: float, moe: bool) -> DiTBlock:
    if moe:
        ffn = ExpertChoiceMoE(width, cfg.moe_hidden(ffn_ratio, width), cfg.num_experts, cfg.expert_capacity)
    else:
        ffn = FeedForward(width, cfg.dense_hidden(ffn_ratio, width))
    return DiTBlock(width, cfg.dim, cfg.attn_width(attn_ratio, width), ffn, cfg)


class PatchSkip(nn.Module):
    """out = W patch * (1 + g(c)): a linear map from a token's input patch to its output patch, gated by the
    conditioning. It lets a model whose tokens cover many pixels remove per-pixel noise without carrying every
    pixel through the transformer (zero at the start, so adding it changes nothing)."""
    def __init__(self, dim: int, per_token: int):
        super().__init__()
        self.linear = nn.Linear(per_token, per_token, bias=False)
        self.gate = nn.Linear(dim, per_token)

    def forward(self, patches: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(patches) * (1 + self.gate(c)[:, None])


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_per_token: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(dim, out_per_token)
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(dim, 2 * dim))
        self.norm_final = layer_norm(dim, eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
#                                           Model
# --------------------------------------------------------------------------------------------

def random_keep_ids(n: int, t: int, mask_ratio: float, device=None, generator=None) -> torch.Tensor:
    """Indices of the tokens each image keeps: a uniformly random (1 - mask_ratio) fraction, (N, T_keep)."""
    keep = max(1, int(t * (1 - mask_ratio)))
    noise = torch.rand(n, t, device=device, generator=generator)
    return torch.argsort(noise, dim=1)[:, :keep]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MicroDiT(nn.Module):
    def __init__(self, cfg: MicroDiTConfig):
        super().__init__()
        self.config = cfg
        D, C, p = cfg.dim, cfg.in_channels, cfg.patch_size
        self.in_channels = self.out_channels = C
        self.patch_size = p
        self.x_embedder = PatchEmbed(p, C, D)
        self.t_embedder = TimestepEmbedder(D)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid, cfg.pos_interp_scale).unsqueeze(0))
        self.y_embedder = CaptionProjection(cfg.caption_channels, D, cfg.norm_eps)
        self.y_emb_preprocess = CaptionRefiner(cfg)
        self.pooled_y_emb_process = Mlp(D, D, cfg.norm_eps)

        if cfg.patch_mixer:
            Dm = cfg.mixer_dim
            self.patch_mixer = nn.ModuleList([
                make_block(cfg, Dm, 1.0, cfg.mixer_ffn_ratio, cfg.is_moe(i, cfg.mixer_depth, last_allowed=True))
                for i in range(cfg.mixer_depth)])
            # Width maps exist only when the mixer is narrower than the backbone (identity otherwise).
            def width_map(a: int, b: int) -> nn.Module:
                return nn.Sequential(layer_norm(a, cfg.norm_eps), nn.Linear(a, b, bias=False)) if a != b else nn.Identity()
            self.patch_mixer_map_xin = width_map(D, Dm)
            self.patch_mixer_map_xout = width_map(Dm, D)
            self.patch_mixer_map_y = width_map(D, Dm)

        self.blocks = nn.ModuleList([
            make_block(cfg, D, ra, rf, cfg.is_moe(i, cfg.depth, last_allowed=False))
            for i, (ra, rf) in enumerate(cfg.backbone_ratios())])
        # Filled into dropped token positions of the output; a buffer (not learned), zero as released.
        self.register_buffer("mask_token", torch.zeros(1, 1, p * p * C))
        self.final_layer = FinalLayer(D, p * p * C, cfg.norm_eps)
        if cfg.patch_skip:
            self.patch_skip = PatchSkip(D, p * p * C)
        # Activation checkpointing: keep only each block's inputs for backward and recompute the rest
        # (a training option, not part of the model's layout; set by the training loop).
        self.activation_checkpointing = False
        self.initialize_weights()

    # ---- conditioning ----
    def embed_caption(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption tokens (N, L, Dc) or (N, 1, L, Dc) -> refined tokens (N, L, D) and pooled vector (N, D)."""
        if y.dim() == 4:
            y = y.squeeze(1)
        y = self.y_emb_preprocess(self.y_embedder(y))
        return y, self.pooled_y_emb_process(y.mean(dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask_ratio: float = 0.0,
                keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Latents x (N, C, H, W), noise conditioning t = c_noise (N,) or scalar, captions y.

        With mask_ratio > 0 (or explicit keep_ids (N, T_keep)) only the kept tokens pass the backbone;
        dropped positions of the output hold mask_token. Returns (N, C, H, W).
        """
        self.check_inputs(x, t, y, mask_ratio, keep_ids)
        n, _, h, w = x.shape
        x_in = x
        x = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype))
        x = x + self._pos_embed(h // self.patch_size, w // self.patch_size, x)
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)
        y, y_pooled = self.embed_caption(y.to(x.dtype))
        c = self.t_embedder(t) + y_pooled

        T = x.shape[1]
        if keep_ids is None and mask_ratio > 0:
            keep_ids = random_keep_ids(n, T, mask_ratio, device=x.device)
        if self.config.patch_mixer:
            x = self.patch_mixer_map_xin(x)
            y_mixer = self.patch_mixer_map_y(y)
            for block in self.patch_mixer:
                x = self._block(block, x, y_mixer, c)
        if keep_ids is not None:
            x = gather_tokens(x, keep_ids)       # deferred masking: backbone sees only kept tokens
        if self.config.patch_mixer:
            x = self.patch_mixer_map_xout(x)
        for block in self.blocks:
            x = self._block(block, x, y, c)
        x = self.final_layer(x, c)
        if self.config.patch_skip:
            patches = self.patchify(x_in.to(x.dtype))
            x = x + self.patch_skip(patches if keep_ids is None else gather_tokens(patches, keep_ids), c)
        if keep_ids is not None:
            full = self.mask_token.to(x.dtype).expand(n, T, x.shape[-1]).clone()
            x = full.scatter(1, keep_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        return self.unpatchify(x, h // self.patch_size, w // self.patch_size)

    def _block(self, block: DiTBlock, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, y, c, use_reentrant=False)
        return block(x, y, c)

    def check_inputs(self, x, t, y, mask_ratio: float, keep_ids) -> None:
        """Fail before any work, naming what was expected and what was given."""
        cfg, p = self.config, self.patch_size
        if x.dim() != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"latents: expected (N, {cfg.in_channels}, H, W) with H and W multiples of {p}, "
                             f"got {tuple(x.shape)}")
        n = x.shape[0]
        if y.dim() not in (3, 4) or y.shape[0] != n or y.shape[-1] != cfg.caption_channels:
            raise ValueError(f"captions: expected ({n}, L, {cfg.caption_channels}) or ({n}, 1, L, "
                             f"{cfg.caption_channels}), got {tuple(y.shape)} (does the text encoder match the model?)")
        if torch.is_tensor(t) and t.numel() not in (1, n):
            raise ValueError(f"noise conditioning t: expected a scalar or {n} values, got shape {tuple(t.shape)}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if keep_ids is not None:
            T = (x.shape[2] // p) * (x.shape[3] // p)
            if keep_ids.dim() != 2 or keep_ids.shape[0] != n or not 0 < keep_ids.shape[1] <= T:
                raise ValueError(f"keep_ids: expected ({n}, T_keep) with 0 < T_keep <= {T}, got {tuple(keep_ids.shape)}")

    def _pos_embed(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        if gh * gw == self.pos_embed.shape[1] and gh == gw:
            return self.pos_embed.to(like.dtype)
        return sincos_pos_embed_2d(self.config.dim, (gh, gw), self.config.pos_interp_scale).to(like)[None]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, p*p*C) in unpatchify's order."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """(N, T, p*p*C) with per-token order (row in patch, column in patch, channel) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    # ---- resolution change between stages ----
    def set_resolution(self, latent_res: int, pos_interp_scale: float) -> None:
        """Re-make the position table for a new latent size (e.g. 32 -> 64 between stage 2 and 3)."""
        self.config.latent_res, self.config.pos_interp_scale = latent_res, pos_interp_scale
        pe = sincos_pos_embed_2d(self.config.dim, self.config.grid, pos_interp_scale)[None]
        self.pos_embed = pe.to(self.pos_embed.device, self.pos_embed.dtype)

    # ---- parameters ----
    def moe_parameter_names(self) -> list[str]:
        """Names of the expert and router parameters (trained at half the learning rate)."""
        return [n for n, m in self.named_modules() if isinstance(m, ExpertChoiceMoE)
                for n in (f"{n}.w1", f"{n}.w2", f"{n}.gate.weight")]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initialize_weights(self) -> None:
        """Xavier linears, zero biases, small normal embedders; adaLN and output layers start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.pooled_y_emb_process.fc1,
                    self.pooled_y_emb_process.fc2, self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        n_blocks = len(self.blocks)
        for i, blk in enumerate(list(self.blocks) + list(getattr(self, "patch_mixer", []))):
            std_out = 0.02 / math.sqrt(2 * (i + 1)) if i < n_blocks else 0.02 / math.sqrt(2 * n_blocks)
            nn.init.trunc_normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.trunc_normal_(blk.attn.proj.weight, std=std_out)
            nn.init.trunc_normal_(blk.cross_attn.q_linear.weight, std=0.02)
            nn.init.trunc_normal_(blk.cross_attn.kv_linear.weight, std=0.02)
            nn.init.trunc_normal_(blk.cross_attn.proj.weight, std=std_out)
            if isinstance(blk.mlp, ExpertChoiceMoE):
                nn.init.trunc_normal_(blk.mlp.gate.weight, std=0.02)
                nn.init.trunc_normal_(blk.mlp.w1, std=0.02)
                nn.init.trunc_normal_(blk.mlp.w2, std=std_out)
            else:
                nn.init.trunc_normal_(blk.mlp.w1.weight, std=0.02)
                nn.init.trunc_normal_(blk.mlp.w2.weight, std=std_out)
                nn.init.trunc_normal_(blk.mlp.w3.weight, std=std_out)
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.y_emb_preprocess.attn.proj.weight)
        nn.init.zeros_(self.y_emb_preprocess.mlp.w3.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)
        if self.config.patch_skip:
            nn.init.zeros_(self.patch_skip.linear.weight)
            nn.init.zeros_(self.patch_skip.gate.weight)

    # ---- compute accounting ----
    def flops(self, batch: int = 1, mask_ratio: float = 0.0, caption_len: int = 77) -> int:
        return estimate_flops(self.config, batch, mask_ratio, caption_len)


# --------------------------------------------------------------------------------------------
#                        Hand-over to a higher resolution with larger patches
# --------------------------------------------------------------------------------------------

def grow_patches(state_dict: dict, old_patch: int, new_patch: int, pixel_factor: int = 1) -> dict:
    """Weights of a model with patch size `old_patch` carried to `new_patch` = k * old_patch for images k times
    larger: each token then covers the same part of the image as before (the same token grid, so the same
    position table), and the converted model draws, from an image upsampled k times (nearest), exactly the
    old model's output upsampled k times.

    The patch embedding sees each k x k block of pixels as their mean; the output layer repeats each pixel
    k x k. `pixel_factor` is the space-to-depth factor of a pixel:<f> autoencoder (its latent channels are
    sub-pixels, converted in pixel space); 1 for autoencoders whose latent cells are spatial (upsampled as
    latents). Other weights are unchanged.
    """
    if new_patch % old_patch:
        raise ValueError(f"patch size {old_patch} -> {new_patch}: the new size must be a multiple of the old")
    k, f = new_patch // old_patch, pixel_factor
    if k == 1:
        return dict(state_dict)
    if any(n.startswith("patch_skip.") for n in state_dict):
        raise ValueError("a model with a patch skip cannot change its patch size (the skip maps whole patches): "
                         "give patch_skip only to the stages with the larger patches")

    def as_pixels(w):          # (D, C, p, p) latent kernel -> (D, C / f^2, p f, p f) pixel kernel
        return F.pixel_shuffle(w, f) if f > 1 else w

    def as_latents(w):
        return F.pixel_unshuffle(w, f) if f > 1 else w

    def grow(w, scale):        # (D, C, p, p) -> (D, C, k p, k p)
        w = as_pixels(w.float()).repeat_interleave(k, -1).repeat_interleave(k, -2) * scale
        return as_latents(w)

    def grow_tokens(w):        # per-token outputs (p*p*C, ...) in (row, column, channel) order
        p = old_patch
        c = w.shape[0] // (p * p)
        cols = w.reshape(p, p, c, -1).permute(3, 2, 0, 1)                  # (D, C, p, p)
        out = grow(cols, 1.0)                                                # (D, C, kp, kp)
        return out.permute(2, 3, 1, 0).reshape(new_patch * new_patch * c, *w.shape[1:])

    out = dict(state_dict)
    out["x_embedder.proj.weight"] = grow(state_dict["x_embedder.proj.weight"], 1.0 / (k * k))
    out["final_layer.linear.weight"] = grow_tokens(state_dict["final_layer.linear.weight"])
    out["final_layer.linear.bias"] = grow_tokens(state_dict["final_layer.linear.bias"][:, None])[:, 0]
    if "mask_token" in state_dict:
        out["mask_token"] = grow_tokens(state_dict["mask_token"].reshape(-1, 1)).reshape(1, 1, -1)
    return {n: v.to(state_dict[n].dtype) for n, v in out.items()}


# --------------------------------------------------------------------------------------------
#                                  Sin-cos position embeddings
# --------------------------------------------------------------------------------------------

def sincos_pos_embed_2d(dim: int, grid, interp_scale: float = 1.0) -> torch.Tensor:
    """(T, dim) table; first half of the channels encodes the column, second half the row.

    Coordinates are patch indices / interp_scale; each half is [sin(pos w), cos(pos w)],
    w_i = 10000^(-4i/dim), i < dim/4.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(pos):
        out = np.outer(pos.reshape(-1) / interp_scale, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([half(cols), half(rows)], axis=1)).float()


# --------------------------------------------------------------------------------------------
#                                       FLOP accounting
# --------------------------------------------------------------------------------------------

def estimate_flops(cfg: MicroDiTConfig, batch: int = 1, mask_ratio: float = 0.0, caption_len: int = 77) -> int:
    """Forward-pass matmul FLOPs (2 per multiply-add) of one batch; a training step is about 3x this."""
    T = cfg.grid ** 2
    Tk = max(1, int(T * (1 - mask_ratio))) if mask_ratio > 0 else T
    L, D = caption_len, cfg.dim

    def block(width: int, tokens: int, attn_w: int, ffn_ratio: float, moe: bool) -> int:
        f = 2 * tokens * width * 3 * attn_w + 2 * tokens * attn_w * width      # qkv + out proj
        f += 2 * 2 * tokens * tokens * attn_w                                  # scores + weighted sum
        f += 2 * tokens * width * width * 2 + 2 * L * width * 2 * width         # cross q, proj; kv
        f += 2 * 2 * tokens * L * width
        if moe:
            k = int(cfg.expert_capacity * tokens / cfg.num_experts) * cfg.num_experts
            f += 2 * k * width * cfg.moe_hidden(ffn_ratio, width) * 2 + 2 * tokens * width * cfg.num_experts
        else:
            f += 2 * tokens * width * cfg.dense_hidden(ffn_ratio, width) * 3
        return f

    total = 2 * T * cfg.in_channels * cfg.patch_size ** 2 * D                # patch embed
    total += 2 * (512 * D + D * D) + 2 * 2 * D * D + 2 * D * 2 * D            # timestep, pooled caption, final adaLN
    mixer_widths = [cfg.mixer_dim] * cfg.mixer_depth if cfg.patch_mixer else []
    total += sum(2 * D * 6 * w for w in mixer_widths + [D] * cfg.depth)       # per-block adaLN vectors
    total += 2 * L * (cfg.caption_channels * D + D * D)                        # caption projection
    total += 2 * L * D * 4 * D + 2 * 2 * L * L * D + 2 * L * D * cfg.dense_hidden(cfg.caption_mlp_ratio, D) * 3
    tokens_backbone = Tk
    if cfg.patch_mixer:
        Dm = cfg.mixer_dim
        if Dm != D:
            total += 2 * T * D * Dm + 2 * L * D * Dm + 2 * Tk * Dm * D
        for i in range(cfg.mixer_depth):
            total += block(Dm, T, Dm, cfg.mixer_ffn_ratio, cfg.is_moe(i, cfg.mixer_depth, True))
    for i, (ra, rf) in enumerate(cfg.backbone_ratios()):
        total += block(D, tokens_backbone, cfg.attn_width(ra, D), rf, cfg.is_moe(i, cfg.depth, False))
    total += 2 * Tk * D * cfg.patch_size ** 2 * cfg.in_channels
    if cfg.patch_skip:
        per_token = cfg.patch_size ** 2 * cfg.in_channels
        total += 2 * Tk * per_token * per_token + 2 * D * per_token                # skip map, its gate
    return int(total * batch)


# --------------------------------------------------------------------------------------------
#                                          Presets
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # The paper's model: 1,165,442,320 parameters with 1024-wide captions and 4 latent channels.
    "MicroDiT_XL_2": dict(dim=1024, depth=28, head_dim=64, mixer_depth=6, mixer_dim=768),
    # Same design at D=512: 200,692,752 parameters with 1024-wide captions.
    "MicroDiT_Tiny_2": dict(dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512),
    # CPU presets: same design (mixer, masking, MoE, layer-wise scaling) at widths a 2-core CPU trains in minutes.
    "MicroDiT_Micro_2": dict(dim=192, depth=6, head_dim=32, mixer_depth=2, mixer_dim=192, multiple_of=64,
                             num_experts=4),
    "MicroDiT_Nano_2": dict(dim=128, depth=4, head_dim=32, mixer_depth=2, mixer_dim=128, multiple_of=32,
                            num_experts=4),
    # The CPU recipe's model: Nano's depth at Micro's width (6.3M parameters with 64-wide captions, 12 channels).
    "MicroDiT_Mini_2": dict(dim=192, depth=4, head_dim=32, mixer_depth=2, mixer_dim=192, multiple_of=32,
                            num_experts=4),
}


def create_model(preset: str = "MicroDiT_XL_2", latent_res: int = 32, in_channels: int = 4,
                 caption_channels: int = 1024, pos_interp_scale: float = 1.0, **overrides) -> MicroDiT:
    """Build a MicroDiT from a preset name; any MicroDiTConfig field can be overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = MicroDiTConfig(**{**PRESETS[preset], "latent_res": latent_res, "in_channels": in_channels,
                            "caption_channels": caption_channels, "pos_interp_scale": pos_interp_scale,
                            **overrides})
    return MicroDiT(cfg)
