"""MicroDiT model core: released-checkpoint layout, parameter counts, SPEC's exact layout, MoE dispatch, masking."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from microdit.model import (DiTBlock, ExpertChoiceMoE, MicroDiT, SelfAttention, TimestepEmbedder, create_model,
                            estimate_flops, grow_patches, random_keep_ids, sincos_pos_embed_2d)

TSV = os.path.join(os.path.dirname(__file__), "data", "microdit_xl2_state_dict.tsv")


def tiny_model(**overrides) -> MicroDiT:
    """A few-layer MicroDiT (mixer, MoE, layer-wise scaling) with every weight random (none left at zero)."""
    kw = dict(latent_res=8, in_channels=4, caption_channels=32)
    kw.update(overrides)
    model = create_model("MicroDiT_Nano_2", **kw)
    randomize(model)
    return model.eval()


def randomize(model: nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def inputs(model, n=2, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n, c.in_channels, c.latent_res, c.latent_res, generator=g)
    return x, torch.randn(n, generator=g), torch.randn(n, L, c.caption_channels, generator=g)


# --------------------------------------------------------------------------------------------
#                      Released checkpoints: names, shapes, parameter counts
# --------------------------------------------------------------------------------------------

def read_tsv(path):
    rows = []
    for line in open(path):
        line = line.rstrip("\n")
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            rows.append((name, tuple(int(s) for s in shape.split("x"))))
    return rows


def test_xl_state_dict_equals_reference_tsv_line_for_line():
    with torch.device("meta"):
        model = create_model("MicroDiT_XL_2", latent_res=64, in_channels=4, caption_channels=1024, pos_interp_scale=2)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    ref = read_tsv(TSV)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f"line {i}: ours {a}, reference {b}"


@pytest.mark.parametrize("preset,expected", [("MicroDiT_XL_2", 1_165_442_320), ("MicroDiT_Tiny_2", 200_692_752)])
def test_exact_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = create_model(preset, latent_res=64, in_channels=4, caption_channels=1024, pos_interp_scale=2)
    assert model.num_params() == expected
    # buffers (position table, mask token) are not parameters
    assert {n for n, _ in model.named_buffers()} == {"pos_embed", "mask_token"}


def test_layerwise_widths_follow_spec_formulas():
    with torch.device("meta"):
        model = create_model("MicroDiT_XL_2", latent_res=32)
    D, depth = 1024, 28
    ra, rf = np.linspace(0.5, 1, depth), np.linspace(0.5, 4, depth)

    def up(v, m):
        return m * math.ceil(v / m)

    for i, blk in enumerate(model.blocks):
        aw = D if ra[i] == 1 else up(math.floor(D * ra[i]), 128)
        assert blk.attn.qkv.weight.shape == (3 * aw, D), i
        assert blk.attn.heads == aw // 64
        assert blk.cross_attn.q_linear.weight.shape == (D, D)
        moe = i % 2 == 1 and i != depth - 1
        assert isinstance(blk.mlp, ExpertChoiceMoE) == moe, i
        if moe:
            assert blk.mlp.w1.shape == (8, D, up(math.floor(D * rf[i]), 256)), i
            assert blk.mlp.gate.weight.shape == (8, D)
        else:
            assert blk.mlp.w1.weight.shape == (up(math.floor(2 * math.floor(D * rf[i]) / 3), 256), D), i
    for i, blk in enumerate(model.patch_mixer):
        assert blk.attn.qkv.weight.shape == (3 * 768, 768)
        assert isinstance(blk.mlp, ExpertChoiceMoE) == (i in (1, 3, 5))
        hidden = blk.mlp.w1.shape[2] if i in (1, 3, 5) else blk.mlp.w1.weight.shape[0]
        assert hidden == (3072 if i in (1, 3, 5) else 2048)
        assert blk.adaLN_modulation[1].weight.shape == (6 * 768, D)     # adaLN input width is always D


def test_moe_parameter_names_cover_experts_and_routers():
    model = tiny_model()
    names = model.moe_parameter_names()
    sd = dict(model.named_parameters())
    assert names and all(n in sd for n in names)
    n_moe = sum(isinstance(m, ExpertChoiceMoE) for m in model.modules())
    assert len(names) == 3 * n_moe
    assert any(n.endswith("gate.weight") for n in names) and any(n.endswith(".w1") for n in names)


# --------------------------------------------------------------------------------------------
#                      MoE: gather/scatter equals the one-hot einsum formulation
# --------------------------------------------------------------------------------------------

def onehot_moe(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """Expert choice written with one-hot dispatch and combine matrices (the plain formulation)."""
    n, t, d = x.shape
    k = int(moe.expert_capacity * t / moe.num_experts)
    probs = torch.softmax(x @ moe.gate.weight.t(), dim=-1)              # (n, t, e)
    g, idx = torch.topk(probs.permute(0, 2, 1), k, dim=-1)            # (n, e, k)
    P = F.one_hot(idx, t).to(x.dtype)                                   # (n, e, k, t)
    xin = torch.einsum("nekt,ntd->nekd", P, x)
    h = F.gelu(torch.einsum("nekd,edf->nekf", xin, moe.w1))
    h = torch.einsum("nekf,efd->nekd", h, moe.w2)
    return torch.einsum("nekt,nekd->ntd", P, g.unsqueeze(-1) * h)


@pytest.mark.parametrize("tokens", [16, 37])
def test_moe_gather_scatter_equals_onehot_outputs_and_gradients(tokens):
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(24, 40, num_experts=4, expert_capacity=2.0).double()
    for p in moe.parameters():
        nn.init.normal_(p, std=0.3)
    x1 = torch.randn(3, tokens, 24, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out1, out2 = moe(x1), onehot_moe(moe, x2)
    torch.testing.assert_close(out1, out2)
    w = torch.randn_like(out1)
    g1 = torch.autograd.grad((out1 * w).sum(), [x1, moe.w1, moe.w2, moe.gate.weight])
    g2 = torch.autograd.grad((out2 * w).sum(), [x2, moe.w1, moe.w2, moe.gate.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
#                               SPEC's exact layout, checkably
# --------------------------------------------------------------------------------------------

def spec_sincos(D, gh, gw, scale):
    """SPEC: coordinates = patch index / scale; channels [0, D/2) the column, [D/2, D) the row; each half
    is [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-4i/D), i < D/4. Token order is row-major."""
    out = np.zeros((gh * gw, D))
    for r in range(gh):
        for c in range(gw):
            for half, pos in ((0, c / scale), (1, r / scale)):
                for i in range(D // 4):
                    w = 10000 ** (-4 * i / D)
                    out[r * gw + c, half * D // 2 + i] = math.sin(pos * w)
                    out[r * gw + c, half * D // 2 + D // 4 + i] = math.cos(pos * w)
    return torch.from_numpy(out).float()


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sincos_table_matches_spec_formula(scale):
    torch.testing.assert_close(sincos_pos_embed_2d(32, 5, scale), spec_sincos(32, 5, 5, scale), atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_pos_embed_2d(16, (3, 4), scale), spec_sincos(16, 3, 4, scale), atol=1e-6, rtol=0)
    model = create_model("MicroDiT_Nano_2", latent_res=8, caption_channels=32, pos_interp_scale=scale)
    torch.testing.assert_close(model.pos_embed[0], spec_sincos(128, 4, 4, scale), atol=1e-6, rtol=0)
    model.set_resolution(12, scale * 2)
    torch.testing.assert_close(model.pos_embed[0], spec_sincos(128, 6, 6, scale * 2), atol=1e-6, rtol=0)


def test_timestep_features_are_cos_half_then_sin_half():
    t = torch.tensor([0.0, -1.3, 0.25, 7.0])
    feats = TimestepEmbedder.sinusoidal(t, 512)
    j = torch.arange(256, dtype=torch.float64)
    args = t.double()[:, None] * 10000 ** (-j / 256)[None]
    torch.testing.assert_close(feats.double(), torch.cat([args.cos(), args.sin()], 1), atol=1e-5, rtol=0)


def test_layernorms_have_weight_and_no_bias_and_qk_norms_neither():
    model = tiny_model()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert norms
    for name, m in norms.items():
        assert m.bias is None, name
        assert m.eps == 1e-6
        if name.endswith(("ln_q", "ln_k")):
            assert m.weight is None, name
        else:
            assert m.weight is not None, name


def test_self_attention_normalises_q_and_k_over_the_whole_width_before_heads():
    torch.manual_seed(0)
    attn = SelfAttention(48, 64, head_dim=16, eps=1e-6)
    x = torch.randn(2, 7, 48)
    q, k, v = (x @ attn.qkv.weight.t()).split(64, dim=-1)
    q, k = F.layer_norm(q, (64,), eps=1e-6), F.layer_norm(k, (64,), eps=1e-6)
    heads = lambda z: z.view(2, 7, 4, 16).transpose(1, 2)                  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 4.0, dim=-1)
    ref = (w @ heads(v)).transpose(1, 2).reshape(2, 7, 64) @ attn.proj.weight.t()
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_block_applies_adaln_vectors_in_spec_order():
    """Six vectors shift1, scale1, gate1, shift2, scale2, gate2; cross-attention ungated."""
    model = tiny_model()
    blk: DiTBlock = model.blocks[1]
    W = blk.norm1.weight.shape[0]
    b = torch.randn(6 * W)
    with torch.no_grad():
        blk.adaLN_modulation[1].weight.zero_()
        blk.adaLN_modulation[1].bias.copy_(b)
    x, y, c = torch.randn(2, 9, W), torch.randn(2, 5, W), torch.randn(2, model.config.dim)
    shift1, scale1, gate1, shift2, scale2, gate2 = b.chunk(6)
    h = x + gate1 * blk.attn(blk.norm1(x) * (1 + scale1) + shift1)
    h = h + blk.cross_attn(blk.norm2(h), y)
    h = h + gate2 * blk.mlp(blk.norm3(h) * (1 + scale2) + shift2)
    torch.testing.assert_close(blk(x, y, c), h, atol=1e-5, rtol=1e-5)


def test_unpatchify_orders_row_column_channel():
    model = tiny_model(in_channels=3)
    gh = gw = 4
    p, C = 2, 3
    tok = torch.zeros(1, gh * gw, p * p * C)
    for t in range(gh * gw):
        for pi in range(p):
            for pj in range(p):
                for c in range(C):
                    tok[0, t, (pi * p + pj) * C + c] = 1000 * t + 100 * pi + 10 * pj + c
    img = model.unpatchify(tok, gh, gw)
    for r in range(gh):
        for col in range(gw):
            for pi in range(p):
                for pj in range(p):
                    for c in range(C):
                        assert img[0, c, r * p + pi, col * p + pj] == 1000 * (r * gw + col) + 100 * pi + 10 * pj + c


def patch_mask(keep_ids, grid, p):
    """(N, 1, H, W) bool: True on pixels of kept patches."""
    n = keep_ids.shape[0]
    m = torch.zeros(n, grid * grid, dtype=torch.bool)
    m[torch.arange(n)[:, None], keep_ids] = True
    return m.view(n, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3)


def test_dropped_positions_are_zero_filled_and_kept_ones_not():
    model = tiny_model()
    x, t, y = inputs(model)
    keep = random_keep_ids(2, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert keep.shape == (2, 4)
    out = model(x, t, y, keep_ids=keep)
    kept = patch_mask(keep, 4, 2).expand_as(out)
    assert (out[~kept] == 0).all()
    assert (out[kept] != 0).all()
    out_r = model(x, t, y, mask_ratio=0.5)                                # random draw inside the model
    assert ((out_r == 0).flatten(1).float().mean(1) == 0.5).all()


def test_naive_masking_kept_outputs_do_not_depend_on_dropped_inputs():
    keep = random_keep_ids(2, 16, 0.5, generator=torch.Generator().manual_seed(5))
    x, t, y = inputs(tiny_model())
    x2 = x.clone()
    dropped = ~patch_mask(keep, 4, 2).expand_as(x)
    x2[dropped] = torch.randn(int(dropped.sum()))
    for mixer in (False, True):
        model = tiny_model(patch_mixer=mixer)
        a, b = model(x, t, y, keep_ids=keep), model(x2, t, y, keep_ids=keep)
        same = torch.allclose(a, b, atol=1e-6)
        # without the mixer, masking happens right after patch embedding; with it, kept tokens saw all tokens
        assert same == (not mixer)
    assert not hasattr(tiny_model(patch_mixer=False), "patch_mixer")


def test_mask_ratio_zero_equals_keeping_all_tokens_in_any_order():
    model = tiny_model()
    x, t, y = inputs(model)
    full = model(x, t, y, mask_ratio=0.0)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    torch.testing.assert_close(model(x, t, y, keep_ids=perm), full, atol=1e-5, rtol=1e-5)
    # a scalar t and a 4-D caption (N, 1, L, D) like the release's are accepted
    torch.testing.assert_close(model(x, t[:1].expand(2), y.unsqueeze(1)), model(x, t[0], y), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
#                   Hand-over to larger patches (grow_patches) and the patch skip
# --------------------------------------------------------------------------------------------

def up2(a: torch.Tensor) -> torch.Tensor:
    return a.repeat_interleave(2, -1).repeat_interleave(2, -2)


@pytest.mark.parametrize("pixel_factor", [1, 2])
def test_grown_model_draws_the_old_models_output_upsampled(pixel_factor):
    """Patch 2 -> 4 for images twice as large: on a nearest-upsampled image the grown model's output is the
    old output upsampled, in pixel space for a pixel:2 autoencoder, in latent space otherwise."""
    C = 12 if pixel_factor == 2 else 4
    old = tiny_model(in_channels=C, latent_res=8)
    new = tiny_model(in_channels=C, latent_res=16, patch_size=4)
    grown = {k: v for k, v in grow_patches(old.state_dict(), 2, 4, pixel_factor).items() if k != "pos_embed"}
    assert new.load_state_dict(grown, strict=False).missing_keys == ["pos_embed"]
    assert torch.equal(new.pos_embed, old.pos_embed)                      # the same 4 x 4 token grid

    def to_image(z):
        return F.pixel_shuffle(z, pixel_factor) if pixel_factor > 1 else z

    def to_latent(im):
        return F.pixel_unshuffle(im, pixel_factor) if pixel_factor > 1 else im
    x, t, y = inputs(old)
    keep = random_keep_ids(2, 16, 0.75, generator=torch.Generator().manual_seed(2))
    for kw in ({}, {"keep_ids": keep}):
        with torch.no_grad():
            small = to_image(old(x, t, y, **kw))
            large = to_image(new(to_latent(up2(to_image(x))), t, y, **kw))
        torch.testing.assert_close(large, up2(small), atol=1e-5, rtol=1e-5)
    assert (large - up2(small)).abs().max() < 1e-5 < small.abs().mean()
    # an ungrown copy (weights loaded as they are, by shape where they fit) is not the same function
    with pytest.raises(ValueError, match="multiple"):
        grow_patches(old.state_dict(), 2, 3)


def test_patch_skip_starts_at_zero_and_is_a_per_patch_linear_map():
    base = tiny_model(in_channels=12, latent_res=16, patch_size=4)
    skip = create_model("MicroDiT_Nano_2", latent_res=16, in_channels=12, caption_channels=32, patch_size=4,
                        patch_skip=True).eval()
    missing = skip.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["patch_skip.gate.bias", "patch_skip.gate.weight", "patch_skip.linear.weight"]
    x, t, y = inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(skip(x, t, y), base(x, t, y), atol=0, rtol=0)     # a fresh skip adds nothing
        skip.patch_skip.linear.weight.copy_(torch.eye(192))
        x2 = x.clone()
        x2[:, :, :4, :4] += 1.0                                                        # the first patch only
        d = skip(x2, t, y) - base(x2, t, y) - (skip(x, t, y) - base(x, t, y))
    assert torch.allclose(d[:, :, :4, :4], torch.ones_like(d[:, :, :4, :4]), atol=1e-5)
    assert d[:, :, 4:, :].abs().max() < 1e-6 and d[:, :, :, 4:].abs().max() < 1e-6
    assert torch.equal(skip.unpatchify(skip.patchify(x), 4, 4), x)


def test_random_keep_ids_are_distinct_reproducible_and_sized():
    a = random_keep_ids(3, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_keep_ids(3, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert all(len(set(r.tolist())) == 16 for r in a)
    assert int(a.max()) < 64


def test_bad_inputs_fail_before_work_with_clear_messages():
    model = tiny_model()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match=r"latents: expected \(N, 4, H, W\).*got \(2, 3, 8, 8\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[:, :, :7, :7], t, y)
    with pytest.raises(ValueError, match=r"captions: expected.*32.*got \(2, 5, 16\)"):
        model(x, t, y[..., :16])
    for r in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must be in"):
            model(x, t, y, mask_ratio=r)
    with pytest.raises(ValueError, match="keep_ids"):
        model(x, t, y, keep_ids=torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset"):
        create_model("MicroDiT_Huge_2")


def test_masked_training_step_runs_and_reaches_all_parameters_of_the_backbone():
    model = tiny_model().train()
    x, t, y = inputs(model)
    model(x, t, y, mask_ratio=0.5).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


# --------------------------------------------------------------------------------------------
#                                        FLOP accounting
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_ratio,mixer,skip", [(0.0, True, False), (0.75, True, False), (0.5, False, False),
                                                   (0.75, True, True)])
def test_estimate_flops_equals_counted_matmul_flops(mask_ratio, mixer, skip, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    def math_attention(q, k, v, **kw):       # the CPU counter does not see fused SDPA: spell it out as matmuls
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    monkeypatch.setattr(F, "scaled_dot_product_attention", math_attention)
    model = create_model("MicroDiT_Nano_2", latent_res=16, in_channels=4, caption_channels=32,
                         patch_mixer=mixer, mixer_dim=96, patch_skip=skip)
    x, t, y = inputs(model, n=2, L=6)
    keep = random_keep_ids(2, 64, mask_ratio) if mask_ratio > 0 else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, keep_ids=keep)
    counted = counter.get_total_flops()
    predicted = estimate_flops(model.config, batch=2, mask_ratio=mask_ratio, caption_len=6)
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


def test_xl_flop_ratio_at_256px_mask_075_is_about_040():
    with torch.device("meta"):
        cfg = create_model("MicroDiT_XL_2", latent_res=32).config
    ratio = estimate_flops(cfg, 1, 0.75) / estimate_flops(cfg, 1, 0.0)
    assert 0.35 < ratio < 0.45


# --------------------------------------------------------------------------------------------
#                          Benchmark module: arithmetic and code paths
# --------------------------------------------------------------------------------------------

def test_bench_mfu_arithmetic_and_gpu_peaks():
    from microdit.bench import PEAK_BF16_FLOPS, mfu, peak_bf16_flops, train_step_flops
    with torch.device("meta"):
        cfg = create_model("MicroDiT_XL_2", latent_res=32).config
    f = train_step_flops(cfg, 256, 0.75, 77)
    assert f == 3 * estimate_flops(cfg, 256, 0.75, 77)
    assert peak_bf16_flops("NVIDIA H200") == 989e12 == PEAK_BF16_FLOPS["H100"]
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None
    # 40% MFU on an H200 means this many seconds per step
    assert math.isclose(mfu(f, f / (0.4 * 989e12), 989e12), 0.4)
    # sanity: between 6 x parameters x kept tokens and 6 x parameters x all tokens per sample
    n = 1_165_442_320
    assert 6 * n * 64 * 0.5 < f / 256 < 6 * n * 256


def test_bench_release_style_moe_matches_ours_and_cpu_sections_run():
    from microdit.bench import BenchConfig, OneHotMoE, masking_section, moe_section, with_onehot_moe
    model = tiny_model()
    other = with_onehot_moe(model)
    assert any(isinstance(m, OneHotMoE) for m in other.modules())
    x, t, y = inputs(model)
    torch.testing.assert_close(other(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)
    cfg = BenchConfig(preset="MicroDiT_Nano_2", latent_res=8, batch=2, rounds=1, steps=1, caption_len=4)
    rows = masking_section(cfg)
    assert [r["mask_ratio"] for r in rows] == [0.0, 0.5, 0.75] and rows[0]["time_ratio"] == 1.0
    assert rows[2]["flop_ratio"] < rows[1]["flop_ratio"] < 1
    moe = moe_section(tokens=(16,), dim=32, hidden=64, batch=1, rounds=1, steps=1)
    assert moe[0]["tokens"] == 16 and moe[0]["speedup"] > 0
