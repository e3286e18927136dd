"""Encoders behind one interface: offline stand-ins, a T5 loaded from a local folder, fast failures."""
import json
import time

import pytest
import torch

from microdit.encoders import (MissingWeightsError, PixelAutoencoder, encoder_signature, load_image_autoencoder,
                               load_text_encoder)

PROMPTS = ["a photo of a red cube", "two green spheres left of a blue cone", ""]


@pytest.mark.parametrize("name,factor", [("pixel", 1), ("pixel:2", 2), ("pixel:4", 4)])
def test_pixel_autoencoder_is_an_exact_inverse(name, factor):
    ae = load_image_autoencoder(name)
    assert isinstance(ae, PixelAutoencoder) and ae.name == name
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    z = ae.encode(img)
    assert z.shape == (2, 3 * factor ** 2, 16 // factor, 16 // factor)
    assert ae.latent_channels == z.shape[1] and ae.downsample == factor
    assert torch.equal(ae.decode(z), img)
    if factor == 2:   # space-to-depth: a latent channel is one sub-pixel of one colour
        assert torch.equal(z[:, 0], img[:, 0, 0::2, 0::2]) and torch.equal(z[:, 3], img[:, 0, 1::2, 1::2])


def test_tiny_kl_shapes_and_seeded_weights():
    a, b = load_image_autoencoder("tiny-kl"), load_image_autoencoder("tiny-kl")
    assert a.latent_channels == 4 and a.downsample == 4 and a.name == "tiny-kl"
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    z = a.encode(img, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, b.encode(img, generator=torch.Generator().manual_seed(0)))
    assert a.decode(z).shape == (2, 3, 32, 32)


def test_tiny_clip_same_seed_same_embeddings():
    a, b = load_text_encoder("tiny-clip:16"), load_text_encoder("tiny-clip:16")
    ea, eb = a.encode(PROMPTS), b.encode(PROMPTS)
    assert ea.shape == (3, 16, 64) and a.dim == 64 and a.max_length == 16 and ea.dtype == torch.float32
    assert torch.equal(ea, eb)
    assert not torch.allclose(ea[0], ea[1])
    # per-token output after the final LayerNorm (unit scale, zero mean per token; LN weight starts at 1)
    torch.testing.assert_close(ea.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    # causal mask kept: a token's embedding does not depend on later tokens
    ec = a.encode(["a photo of a red cube", "a photo of a red sphere"])
    torch.testing.assert_close(ec[0, :5], ec[1, :5])
    assert not torch.allclose(ec[0, 6], ec[1, 6])
    sig = encoder_signature(load_image_autoencoder("pixel:2"), a)
    assert sig == {"image_autoencoder": "pixel:2", "latent_channels": 12, "downsample": 2,
                   "text_encoder": "tiny-clip:16", "caption_len": 16, "caption_dim": 64}


def test_openclip_local_dir_loads_text_tower(tmp_path):
    import open_clip
    from safetensors.torch import save_file
    cfg = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                         "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2}}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    name = f"openclip:local-dir:{tmp_path}"
    with pytest.raises(MissingWeightsError, match="weights file"):            # config alone: refuse random weights
        load_text_encoder(name)
    torch.manual_seed(3)
    ref = open_clip.create_model(f"local-dir:{tmp_path}")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    te = load_text_encoder(name)
    assert te.max_length == 20 and te.dim == 48
    emb = te.encode(PROMPTS[:2])
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path}")(PROMPTS[:2])
    with torch.no_grad():
        x = ref.token_embedding(ids) + ref.positional_embedding
        manual = ref.ln_final(ref.transformer(x, attn_mask=ref.attn_mask))
    torch.testing.assert_close(emb, manual, atol=1e-5, rtol=1e-5)


def make_t5_folder(folder):
    """A tiny T5 encoder + a SentencePiece model trained here (no package ships one)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(["a photo of a red cube on a blue sphere", "two green circles and one yellow square",
                                 "a cat sitting next to a dog", "three purple triangles below an orange star"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    out = folder / "t5"
    T5Tokenizer(vocab_file=str(folder / "spiece.model"), extra_ids=0, legacy=False).save_pretrained(out)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16))
    model.save_pretrained(out)
    return out, model


def test_t5_encoder_from_local_folder(tmp_path):
    folder, model = make_t5_folder(tmp_path)
    te = load_text_encoder(f"t5:{folder}")
    assert te.dim == 32 and te.max_length == 120 and te.name == f"t5:{folder}"
    emb = te.encode(PROMPTS)
    assert emb.shape == (3, 120, 32) and emb.dtype == torch.float32
    tok = te.tokenizer(PROMPTS, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    with torch.no_grad():
        manual = model.eval()(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    torch.testing.assert_close(emb, manual)
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("kind,name,needle", [
    ("image", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("image", "ostris", "ostris/vae-kl-f8-d16"),
    ("image", "diffusers:/no/such/vae", "/no/such/vae"),
    ("text", "openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378", "apple/DFN5B-CLIP-ViT-H-14-378"),
    ("text", "openclip:local-dir:/no/such/clip", "/no/such/clip"),
    ("text", "t5:google/t5-v1_1-xxl", "google/t5-v1_1-xxl"),
    ("text", "t5:/no/such/t5", "/no/such/t5"),
])
def test_missing_weights_fail_fast_naming_the_model(kind, name, needle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load = load_image_autoencoder if kind == "image" else load_text_encoder
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError) as err:
        load(name)
    assert time.monotonic() - t0 < 20
    assert needle in str(err.value)


def test_unknown_encoder_names_are_rejected():
    with pytest.raises(ValueError, match="unknown image autoencoder"):
        load_image_autoencoder("vqgan")
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("bert:base")


def _tiny_vae_folder(folder, force_upcast: bool):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16, force_upcast=force_upcast).save_pretrained(folder)
    return f"diffusers:{folder}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_force_upcast_decodes_in_float32(tmp_path, dtype):
    """A VAE config with force_upcast (SDXL's, Ostris') decodes in fp32 even under a half-precision pipeline."""
    name = _tiny_vae_folder(tmp_path / "upcast", force_upcast=True)
    half, full = load_image_autoencoder(name, dtype=dtype), load_image_autoencoder(name, dtype=torch.float32)
    seen = []
    half.vae.decoder.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    z = torch.randn(2, 4, 8, 8)
    images = half.decode(z)
    assert seen == [(torch.float32, torch.float32)] and half.force_upcast
    assert torch.equal(images, full.decode(z))                     # exactly the fp32 decode
    assert half.encode(images).dtype == torch.float32


def test_no_force_upcast_keeps_the_pipeline_dtype(tmp_path):
    name = _tiny_vae_folder(tmp_path / "plain", force_upcast=False)
    half = load_image_autoencoder(name, dtype=torch.bfloat16)
    seen = []
    half.vae.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    images = half.decode(torch.randn(1, 4, 8, 8))
    assert seen == [torch.bfloat16] and not half.force_upcast and images.dtype == torch.float32
