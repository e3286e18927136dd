"""MicroDiT through diffusers: the ModelMixin/ConfigMixin model keeps the released names and loads through
diffusers' own from_pretrained / save_pretrained."""
import json
import os

import numpy as np
import pytest
import torch

from microdit.diffusers_model import MicroDiTTransformer2DModel
from microdit.cli import UserError
from microdit.encoders import MissingWeightsError
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


# --------------------------------------------------------------------------------------------
#                          The DiffusionPipeline: loading, conversion, same images
# --------------------------------------------------------------------------------------------

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]


@pytest.fixture(scope="module")
def cpu_recipe_checkpoint(tmp_path_factory):
    """A checkpoint trained by the CPU recipe: its four stages, 2 steps each, on a small shapes latent set."""
    from microdit.training.stages import run_stages
    from microdit.training.config import stage_configs
    from dataprep.synthetic import shapes_latent_set
    root = tmp_path_factory.mktemp("recipe")
    data = shapes_latent_set(root / "shapes", n=32, resolutions=(16, 32), progress=False)
    stages = stage_configs("cpu", [str(data)], str(root / "run"), steps=2, batch_size=8, checkpoint_every=0,
                           num_samples=2, sample_steps=2, progress=False)
    return run_stages(stages)[-1]


def _pixels(images):
    return [np.asarray(im) for im in images]


def test_cpu_recipe_checkpoint_gives_the_same_images_through_diffusers(cpu_recipe_checkpoint, tmp_path):
    from diffusers import DiffusionPipeline

    from microdit.to_diffusers import main as convert_main
    from microdit.pipeline import MicroDiTPipeline
    ours = MicroDiTPipeline.from_pretrained(str(cpu_recipe_checkpoint))       # our folder, through our loader
    assert ours.resolution == 32 and ours.image_autoencoder.name == "pixel:2"
    expected = ours.generate(PROMPTS, num_inference_steps=4, seed=3, images_per_prompt=2, progress=False)
    convert_main([str(cpu_recipe_checkpoint), str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "model_index.json").read_text())["_class_name"] == "MicroDiTPipeline"
    pipe = MicroDiTPipeline.from_pretrained(tmp_path / "hf")                   # diffusers' loader
    assert isinstance(pipe, DiffusionPipeline) and pipe.config.text_encoder_name == "tiny-clip:16"
    assert pipe.edm == ours.edm and pipe.transformer.config == ours.transformer.config
    assert ours.edm.data_mean != 0            # the recipe's data_mean="auto" travels with the model
    out = pipe(PROMPTS, num_inference_steps=4, seed=3, num_images_per_prompt=2, progress=False)
    assert len(out.images) == 4
    for a, b in zip(_pixels(out.images), _pixels(expected)):
        assert np.array_equal(a, b)
    arrays = pipe(PROMPTS[:1], num_inference_steps=4, seed=3, output_type="np", progress=False).images
    assert arrays.shape == (1, 32, 32, 3) and np.array_equal(np.round(arrays[0] * 255).astype(np.uint8),
                                                             _pixels(expected)[0])
    other = pipe(PROMPTS[:1], num_inference_steps=4, seed=4, progress=False).images[0]
    assert not np.array_equal(np.asarray(other), _pixels(expected)[0])
    # save_pretrained of a loaded pipeline writes the same folder again; the transformer alone loads too
    pipe.save_pretrained(tmp_path / "again")
    again = MicroDiTTransformer2DModel.from_pretrained(tmp_path / "again", subfolder="transformer",
                                                       low_cpu_mem_usage=False)
    for k, v in ours.transformer.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    index["edm"]["data_mean"] = "centre"      # a damaged (or hostile) folder: refused with a message
    (tmp_path / "again" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="edm.data_mean"):
        MicroDiTPipeline.from_pretrained(tmp_path / "again")


def test_release_pt_converts_and_vae_can_be_embedded(tmp_path):
    """A release-style .pt (small preset standing in) -> a diffusers folder; --embed-vae stores the AutoencoderKL."""
    from diffusers import AutoencoderKL

    from microdit.to_diffusers import main as convert_main
    from microdit.pipeline import MicroDiTPipeline
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=12, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    torch.save(small_model().state_dict(), tmp_path / "dit_stand_in.pt")
    args = [str(tmp_path / "dit_stand_in.pt"), "--preset", "MicroDiT_Nano_2",
            "--image-autoencoder", f"diffusers:{tmp_path / 'vae'}", "--text-encoder", "tiny-clip:8"]
    convert_main(args[:1] + [str(tmp_path / "named")] + args[1:])
    convert_main(args[:1] + [str(tmp_path / "embedded")] + args[1:] + ["--embed-vae"])
    assert not (tmp_path / "named" / "vae").exists() and (tmp_path / "embedded" / "vae" / "config.json").is_file()
    named = MicroDiTPipeline.from_pretrained(tmp_path / "named")
    embedded = MicroDiTPipeline.from_pretrained(tmp_path / "embedded")
    assert named.vae is None and isinstance(embedded.vae, AutoencoderKL) and embedded.resolution == 16
    a = named.generate(PROMPTS, num_inference_steps=2, seed=0, progress=False)
    b = embedded.generate(PROMPTS, num_inference_steps=2, seed=0, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))


def test_convert_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from microdit.to_diffusers import cli
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model_index.json").write_text("{}")
    for args, words in (([str(tmp_path / "absent.pt"), str(tmp_path / "o")], "does not exist"),
                        ([str(tmp_path / "absent.pt"), str(tmp_path / "taken")], "already holds"),
                        (["VSehwag24/MicroDiT/ckpts/dit_4_channel_0.5B_synthetic_data.pt", str(tmp_path / "o")],
                         "huggingface-cli download VSehwag24/MicroDiT")):
        with pytest.raises(SystemExit) as stop:
            cli(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_pipeline_loads_by_hub_id_offline_from_the_cache(tmp_path, monkeypatch):
    """`MicroDiTPipeline.from_pretrained("<owner>/<name>")` with HF_HUB_OFFLINE=1 and a Hugging Face cache holding
    the converted folder as a download leaves it (refs/main -> snapshots/<commit>/): diffusers' hub path."""
    import shutil

    import huggingface_hub.constants as hub_constants

    from microdit.checkpoint import save_model
    from microdit.to_diffusers import convert
    from microdit.pipeline import MicroDiTPipeline
    save_model(tmp_path / "ours", small_model(), preset="MicroDiT_Nano_2", image_autoencoder="pixel:2",
               text_encoder="tiny-clip:8", resolution=16)
    convert(str(tmp_path / "ours"), tmp_path / "hf")
    repo = tmp_path / "hub" / "models--someone--microdit-demo"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tmp_path / "hf", repo / "snapshots" / commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = MicroDiTPipeline.from_pretrained("someone/microdit-demo")
    assert by_id.config.image_autoencoder_name == "pixel:2" and by_id.vae is None
    local = MicroDiTPipeline.from_pretrained(str(tmp_path / "ours"))
    a = by_id.generate(PROMPTS, num_inference_steps=2, seed=5, progress=False)
    b = local.generate(PROMPTS, num_inference_steps=2, seed=5, progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    with pytest.raises(MissingWeightsError, match="someone/not-cached"):
        MicroDiTPipeline.from_pretrained("someone/not-cached")


def test_evaluation_generates_from_a_diffusers_folder(tmp_path):
    from microdit.checkpoint import save_model
    from microdit.evaluate.config import EvalConfig
    from microdit.evaluate.images import ImageGenerator
    from microdit.evaluate.run import generation_settings
    from microdit.to_diffusers import convert
    save_model(tmp_path / "ours", small_model(), preset="MicroDiT_Nano_2", image_autoencoder="pixel:2",
               text_encoder="tiny-clip:8", resolution=16)
    convert(str(tmp_path / "ours"), tmp_path / "hf")
    a = ImageGenerator(str(tmp_path / "ours"), steps=2)(PROMPTS, [11, 12])
    b = ImageGenerator(str(tmp_path / "hf"), steps=2)(PROMPTS, [11, 12])
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    stamp = generation_settings(EvalConfig(checkpoint=str(tmp_path / "hf")))["weights"]
    assert stamp[0] == (tmp_path / "hf" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
