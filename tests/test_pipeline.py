"""Generation pipeline and CLI on a tiny checkpoint with the offline pixel / tiny-clip encoders."""
import json

import pytest
import torch
from PIL import Image

from microdit.checkpoint import save_model
from microdit.model import create_model
from microdit.pipeline import MicroDiTPipeline, image_noise
from microdit.sampling import to_pil

PROMPTS = ["a red cube", "two blue spheres", "a green cone above a yellow star"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_model(folder, model, preset="MicroDiT_Nano_2", image_autoencoder="pixel:2", text_encoder="tiny-clip:8",
               resolution=16)
    return folder


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return MicroDiTPipeline.from_pretrained(str(checkpoint))


def test_from_pretrained_uses_the_checkpoint_encoders_and_generates_images(pipe):
    assert pipe.image_autoencoder.name == "pixel:2" and pipe.text_encoder.name == "tiny-clip:8"
    assert pipe.resolution == 16
    images = pipe.generate(PROMPTS[:2], num_inference_steps=3, seed=1, images_per_prompt=2, progress=True)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    assert all(im.mode == "RGB" for im in images)


def test_same_seed_same_images_other_seed_other_images(pipe):
    a = pipe.generate_latents(PROMPTS, num_inference_steps=3, seed=7, progress=False)
    b = pipe.generate_latents(PROMPTS, num_inference_steps=3, seed=7, progress=False)
    c = pipe.generate_latents(PROMPTS, num_inference_steps=3, seed=8, progress=False)
    assert a.shape == (3, 12, 8, 8) and torch.equal(a, b) and not torch.allclose(a, c)
    assert pipe.last_seed == 8
    pipe.generate_latents(PROMPTS[:1], num_inference_steps=1, seed=None, progress=False)
    assert isinstance(pipe.last_seed, int)          # a drawn seed is recorded so the result can be repeated


def test_batching_does_not_change_results_and_prompt_index_fixes_the_noise(checkpoint):
    # float64 weights: what is left is the sampler's float32 rounding, not batch-dependent matmul blocking
    # (in float32 a 3-step sampler with guidance 5 amplifies 1e-6 differences to ~1e-3)
    pipe = MicroDiTPipeline.from_pretrained(str(checkpoint), dtype=torch.float64)
    pipe.text_encoder.tower.double()
    one = pipe.generate_latents(PROMPTS, num_inference_steps=3, seed=3, images_per_prompt=2, batch_size=1,
                                progress=False)
    many = pipe.generate_latents(PROMPTS, num_inference_steps=3, seed=3, images_per_prompt=2, batch_size=4,
                                 progress=False)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    # the second prompt's images come out the same whatever the first prompt is
    other = pipe.generate_latents(["something else entirely", PROMPTS[1]], num_inference_steps=3, seed=3,
                                  images_per_prompt=2, progress=False)
    torch.testing.assert_close(other[2:4], one[2:4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[0], one[0])
    # images of one prompt differ from each other (different noise), prompt-major order
    assert not torch.allclose(one[0], one[1])


def test_explicit_noise_seeds_match_a_hand_run_sampler(pipe):
    from microdit.edm import heun_sampler
    lat = pipe.generate_latents(PROMPTS[:2], num_inference_steps=2, guidance_scale=4.0, noise_seeds=[5, 9],
                                progress=False)
    noise = torch.stack([torch.randn(12, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 9)])
    with torch.no_grad():
        ref = heun_sampler(pipe.model, noise, pipe.text_encoder.encode(PROMPTS[:2]), 2, 4.0, pipe.edm)
    torch.testing.assert_close(lat, ref)
    with pytest.raises(ValueError, match="one per image"):
        pipe.generate_latents(PROMPTS[:2], noise_seeds=[1], progress=False)


def test_noise_is_unit_gaussian_per_image_index():
    n = image_noise(5, 0, (12, 8, 8))
    assert torch.equal(n, image_noise(5, 0, (12, 8, 8))) and not torch.equal(n, image_noise(5, 1, (12, 8, 8)))
    big = torch.stack([image_noise(0, i, (3, 32, 32)) for i in range(16)])
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def test_guidance_changes_the_result_and_decode_matches_the_autoencoder(pipe):
    g1 = pipe.generate_latents(PROMPTS[:1], num_inference_steps=3, guidance_scale=1.0, seed=0, progress=False)
    g5 = pipe.generate_latents(PROMPTS[:1], num_inference_steps=3, guidance_scale=5.0, seed=0, progress=False)
    assert not torch.allclose(g1, g5)
    img = pipe.decode(g5)[0]
    ref = to_pil(torch.nn.functional.pixel_shuffle(g5, 2))[0]
    assert list(img.getdata()) == list(ref.getdata())


def test_encoder_overrides_and_mismatches(pipe, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="caption_channels=64"):
        MicroDiTPipeline(pipe.model, image_autoencoder=pipe.image_autoencoder, text_encoder=_FakeWidth(32))
    with pytest.raises(ValueError, match="in_channels=12"):
        MicroDiTPipeline.from_pretrained(str(checkpoint), image_autoencoder="pixel:4")
    # a release-style .pt with the encoders named explicitly
    from microdit.checkpoint import load_model
    model, _ = load_model(str(checkpoint))
    torch.save(model.state_dict(), tmp_path / "release_like.pt")
    pipe = MicroDiTPipeline.from_pretrained(str(tmp_path / "release_like.pt"), preset="MicroDiT_Nano_2",
                                            image_autoencoder="pixel:2", text_encoder="tiny-clip:8")
    assert len(pipe.generate("a red cube", num_inference_steps=2, seed=0, progress=False)) == 1


class _FakeWidth:
    """Stands for a text encoder of another width (only its metadata is read before the error)."""

    def __init__(self, dim):
        self.dim, self.name = dim, f"width-{dim}"


def test_generate_cli_writes_pngs_grid_and_settings(checkpoint, tmp_path):
    from microdit.generate import main
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a green cone\n\n# a comment line\ntwo red cubes\n")
    out = tmp_path / "out"
    main(["--checkpoint", str(checkpoint), "--prompt", "a red cube", "--prompt-file", str(prompt_file),
          "--images-per-prompt", "2", "--steps", "2", "--guidance", "3", "--seed", "11", "--out", str(out),
          "--grid", "--no-progress"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "grid.png" in pngs and len(pngs) == 3 * 2 + 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a red cube", "a green cone", "two red cubes"]
    assert settings["seed"] == 11 and settings["steps"] == 2 and settings["guidance"] == 3.0
    assert settings["images_per_prompt"] == 2 and len(settings["images"]) == 6
    assert settings["text_encoder"] == "tiny-clip:8" and settings["image_autoencoder"] == "pixel:2"
    assert Image.open(out / "grid.png").size == (2 * 16, 3 * 16)
    # same settings, same pictures
    out2 = tmp_path / "out2"
    main(["--checkpoint", str(checkpoint), "--prompt", "a red cube", "--steps", "2", "--guidance", "3",
          "--seed", "11", "--out", str(out2), "--no-progress"])
    first = settings["images"][0]
    assert list(Image.open(out / first).getdata()) == list(Image.open(out2 / first).getdata())
    assert not (out2 / "grid.png").exists()


def test_generate_cli_needs_a_prompt(checkpoint, tmp_path, capsys):
    from microdit.generate import main
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")])
    assert "prompt" in capsys.readouterr().err
