"""Model files: our folder format (safetensors + config.json) and the release's plain `.pt` state dicts."""
import json

import pytest
import torch

from microdit.checkpoint import RELEASE_TEXT_ENCODER, infer_pos_interp_scale, load_model, save_model
from microdit.edm import EDMConfig
from microdit.encoders import MissingWeightsError
from microdit.model import create_model, sincos_pos_embed_2d


def small_model(**kw):
    args = dict(latent_res=16, in_channels=12, caption_channels=64)
    args.update(kw)
    model = create_model("MicroDiT_Nano_2", **args)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def sample_inputs(model):
    g = torch.Generator().manual_seed(0)
    c = model.config
    return (torch.randn(2, c.in_channels, c.latent_res, c.latent_res, generator=g), torch.randn(2, generator=g),
            torch.randn(2, 7, c.caption_channels, generator=g))


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = small_model(pos_interp_scale=0.5)
    edm = EDMConfig(P_mean=0.0, P_std=0.6)
    folder = save_model(tmp_path / "ckpt", model, preset="MicroDiT_Nano_2", image_autoencoder="pixel:2",
                        text_encoder="tiny-clip:16", resolution=32, edm=edm, extra={"step": 7})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded, meta = load_model(str(folder))
    assert meta["preset"] == "MicroDiT_Nano_2" and meta["image_autoencoder"] == "pixel:2"
    assert meta["text_encoder"] == "tiny-clip:16" and meta["resolution"] == 32 and meta["extra"] == {"step": 7}
    assert meta["edm"] == edm.to_dict() and loaded.config == model.config
    x, t, y = sample_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert not loaded.training and all(p.device.type == "cpu" for p in loaded.parameters())
    # the weights file path works too, and encoder names can be overridden
    again, meta2 = load_model(str(folder / "model.safetensors"), text_encoder="tiny-clip:8")
    assert meta2["text_encoder"] == "tiny-clip:8"
    bf16, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():   # float32 inputs are cast to the model's dtype
        torch.testing.assert_close(bf16(x, t, y).float(), model(x, t, y), atol=0.1, rtol=0.1)


def test_release_style_pt_loads_strictly(tmp_path):
    """The real 4.6 GB files take this same path; here a small preset saved with torch.save stands in."""
    model = small_model(in_channels=4, caption_channels=1024, latent_res=16, pos_interp_scale=0.5)
    torch.save(model.state_dict(), tmp_path / "dit_stand_in.pt")
    loaded, meta = load_model(str(tmp_path / "dit_stand_in.pt"), preset="MicroDiT_Nano_2")
    x, t, y = sample_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert meta["format"] == "release-pt" and meta["model"]["pos_interp_scale"] == 0.5
    assert meta["image_autoencoder"] == "sdxl" and meta["text_encoder"] == RELEASE_TEXT_ENCODER
    assert meta["resolution"] == 128
    # a trainer-wrapped file ("state_dict" with a "dit." prefix) loads the same way
    torch.save({"state_dict": {f"dit.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "wrapped.pt")
    wrapped, _ = load_model(str(tmp_path / "wrapped.pt"), preset="MicroDiT_Nano_2")
    with torch.no_grad():
        assert torch.equal(model(x, t, y), wrapped(x, t, y))


def test_release_pt_preset_is_inferred_from_width(tmp_path):
    with torch.device("meta"):
        tiny = create_model("MicroDiT_Tiny_2", latent_res=8, caption_channels=16)
    sd = {k: torch.zeros(1).expand(v.shape) for k, v in tiny.state_dict().items()}   # one stored number each
    sd["pos_embed"] = sincos_pos_embed_2d(512, 4, 1.0)[None]
    torch.save(sd, tmp_path / "tiny.pt")
    loaded, meta = load_model(str(tmp_path / "tiny.pt"))
    assert meta["preset"] == "MicroDiT_Tiny_2" and loaded.config.latent_res == 8


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_pos_interp_scale_is_read_from_the_stored_table(scale):
    assert infer_pos_interp_scale(sincos_pos_embed_2d(256, 8, scale)[None]) == scale
    with pytest.raises(ValueError, match="sin-cos table"):
        infer_pos_interp_scale(torch.randn(1, 64, 256))


def test_checkpoints_of_another_architecture_are_refused_clearly(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a MicroDiT state dict"):
        load_model(str(tmp_path / "other.pt"))
    model = small_model(in_channels=4, caption_channels=1024)
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    sd.pop("final_layer.linear.bias")
    torch.save(sd, tmp_path / "bent.pt")
    with pytest.raises(ValueError, match=r"1 missing.*final_layer.linear.bias.*1 of another shape.*blocks.0.attn.qkv"):
        load_model(str(tmp_path / "bent.pt"), preset="MicroDiT_Nano_2")
    with pytest.raises(ValueError, match="matches no preset"):
        load_model(str(tmp_path / "bent.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent.pt"))
    # our folder: config of one size, weights of another
    folder = save_model(tmp_path / "f", model, preset="MicroDiT_Nano_2", image_autoencoder="sdxl",
                        text_encoder="tiny-clip", resolution=128)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["depth"] = 5
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the MicroDiT architecture"):
        load_model(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(str(tmp_path / "empty"))


def test_absent_hub_model_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="someone/no-such-microdit"):
        load_model("someone/no-such-microdit")


def test_release_xl_shaped_file_loads_as_512px_xl(tmp_path):
    """Every tensor of the TSV layout (one stored number each, the real sin-cos table) through the release path."""
    _xl_stand_in(tmp_path / "dit_4_channel_stand_in.pt")
    model, meta = load_model(str(tmp_path / "dit_4_channel_stand_in.pt"))
    assert meta["preset"] == "MicroDiT_XL_2" and meta["resolution"] == 512 and meta["image_autoencoder"] == "sdxl"
    assert model.config.latent_res == 64 and model.config.pos_interp_scale == 2.0
    assert model.num_params() == 1_165_442_320


def _xl_stand_in(path):
    with torch.device("meta"):
        xl = create_model("MicroDiT_XL_2", latent_res=64, pos_interp_scale=2)
    sd = {k: torch.zeros(1).expand(v.shape) for k, v in xl.state_dict().items()}
    sd["pos_embed"] = sincos_pos_embed_2d(1024, 32, 2.0)[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def test_released_file_loads_by_hub_repo_id_and_file_name(tmp_path, monkeypatch):
    """`VSehwag24/MicroDiT/ckpts/<file>.pt` through huggingface_hub, offline, from a Hugging Face cache laid out
    as a download leaves it (refs/main -> snapshots/<commit>/<file>) with an XL-shaped stand-in file."""
    import huggingface_hub.constants as hub_constants

    from microdit.checkpoint import RELEASE_FILES, RELEASE_REPO
    name = "ckpts/dit_4_channel_37M_real_and_synthetic_data.pt"
    assert name in RELEASE_FILES and RELEASE_REPO == "VSehwag24/MicroDiT"
    repo_dir = tmp_path / "hub" / "models--VSehwag24--MicroDiT"
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    _xl_stand_in(repo_dir / "snapshots" / commit / name)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, meta = load_model(f"{RELEASE_REPO}/{name}")
    assert meta["preset"] == "MicroDiT_XL_2" and meta["resolution"] == 512 and meta["image_autoencoder"] == "sdxl"
    assert meta["extra"]["source"] == f"{RELEASE_REPO}/{name}" and model.num_params() == 1_165_442_320
    with pytest.raises(MissingWeightsError, match="dit_16_channel_37M_real_and_synthetic_data.pt.*VSehwag24/MicroDiT"):
        load_model(f"{RELEASE_REPO}/ckpts/dit_16_channel_37M_real_and_synthetic_data.pt")


@pytest.mark.parametrize("edm", [{"data_mean": "abc"}, {"sigma_data": float("nan")}, {"shift": 1.0}, [1, 2]])
def test_damaged_edm_settings_are_refused_when_the_model_loads(tmp_path, edm):
    """Every sampler of a model uses its `edm` entry: a bad one fails at load time, naming the file."""
    from microdit.cli import UserError
    folder = save_model(tmp_path / "ckpt", small_model(), preset="MicroDiT_Nano_2", image_autoencoder="pixel:2",
                        text_encoder="tiny-clip:16", resolution=32, edm=EDMConfig(data_mean=0.8))
    meta = json.loads((folder / "config.json").read_text())
    assert load_model(str(folder))[1]["edm"]["data_mean"] == 0.8
    meta["edm"] = edm
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="config.json.*edm"):
        load_model(str(folder))
