"""MicroDiT through diffusers: the ModelMixin/ConfigMixin model keeps the released names and loads through
diffusers' own from_pretrained / save_pretrained."""
import os

import pytest
import torch

from microdit.diffusers_model import MicroDiTTransformer2DModel
from microdit.model import MicroDiTConfig, create_model

TSV = os.path.join(os.path.dirname(__file__), "data", "microdit_xl2_state_dict.tsv")


def small_model():
    torch.manual_seed(0)
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)      # adaLN and output layers start at zero
    return model.eval()


def test_xl_diffusers_model_has_the_released_names_and_shapes():
    with torch.device("meta"):
        xl = MicroDiTTransformer2DModel(latent_res=64, pos_interp_scale=2.0)
    ref = [line.split("\t") for line in open(TSV).read().splitlines() if line and not line.startswith("#")]
    ours = [(k, "x".join(str(d) for d in v.shape)) for k, v in xl.state_dict().items()]
    assert ours == [(name, shape) for name, shape in ref]
    assert xl.num_params() == 1_165_442_320 and isinstance(xl.config, MicroDiTConfig)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    model = small_model()
    transformer = MicroDiTTransformer2DModel.from_microdit(model)
    assert transformer.x_embedder.proj.weight.data_ptr() == model.x_embedder.proj.weight.data_ptr()   # no copy
    assert transformer.config.to_dict() == model.config.to_dict()
    transformer.save_pretrained(tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = MicroDiTTransformer2DModel.from_pretrained(tmp_path / "t", low_cpu_mem_usage=False)
    assert loaded.config == model.config and not loaded.training
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 12, 8, 8, generator=g), torch.tensor([0.3, -0.5]), torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    half = MicroDiTTransformer2DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16, low_cpu_mem_usage=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.x_embedder.proj.weight, model.x_embedder.proj.weight.bfloat16())


def test_config_fields_and_submodules_do_not_collide(tmp_path):
    """`patch_mixer` is a config flag and the mixer blocks: the blocks win attribute access, the flag is saved."""
    model = MicroDiTTransformer2DModel.from_microdit(small_model())
    assert isinstance(model.patch_mixer, torch.nn.ModuleList) and model.config.patch_mixer is True
    model.set_resolution(16, 2.0)                    # a stage change re-registers the diffusers config too
    model.save_pretrained(tmp_path / "t")
    again = MicroDiTTransformer2DModel.from_pretrained(tmp_path / "t", low_cpu_mem_usage=False)
    assert again.config.latent_res == 16 and again.config.pos_interp_scale == 2.0
    assert torch.equal(again.pos_embed, model.pos_embed)
