"""The trainer: stage presets, schedules, MoE learning rate, EMA, real short runs, checkpoints, resume."""
import ast
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

from microdit.model import create_model
from microdit.training.stages import run_stages
from microdit.training.config import batch_split
from microdit.training.loop import TrainingDiverged, build_model, train
from microdit.training import config as config_module
from microdit.training.config import CPU_STAGES, PAPER_STAGES, TrainConfig
from microdit.training.optim import EMA, lr_factor, make_optimizer
from microdit.training.state import checkpoint_dirs
from dataprep.synthetic import random_latent_set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("latents")
    return (random_latent_set(d / "train", n=64, resolutions=(16, 32), seed=0),
            random_latent_set(d / "val", n=16, resolutions=(16, 32), seed=9))


def tiny(data, out, **kw) -> TrainConfig:
    base = dict(name="t", data=[str(data[0])], val_data=str(data[1]), out_dir=str(out), steps=8, batch_size=8,
                lr=2e-3, mask_ratio=0.5, checkpoint_every=4, num_samples=4, sample_steps=2, progress=False,
                warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


# ---- configuration ------------------------------------------------------------------------------

def test_paper_stages_hold_the_spec_table():
    s1, s2, s3, s4 = PAPER_STAGES
    assert [s.resolution for s in PAPER_STAGES] == [256, 256, 512, 512]
    assert [s.mask_ratio for s in PAPER_STAGES] == [0.75, 0, 0.75, 0]
    assert [s.steps for s in PAPER_STAGES] == [250_000, 30_000, 50_000, 5_000]     # 280K at 256, 55K at 512
    assert (s1.lr, s1.warmup_steps, s1.schedule, s1.final_lr_fraction) == (2.4e-4, 2500, "cosine", 0.33)
    assert (s2.lr, s2.schedule) == (8e-5, "constant") and (s3.lr, s3.warmup_steps) == (8e-5, 500)
    assert [s.grad_clip for s in PAPER_STAGES] == [0.25, 0.25, 0.5, 0.5]
    assert [s.ema_decay for s in PAPER_STAGES] == [0, 0, 0.99975, 0.9975]
    assert {(s.P_mean, s.P_std) for s in (s1, s2)} == {(-0.6, 1.2)} and {(s.P_mean, s.P_std) for s in (s3, s4)} == {(0.0, 0.6)}
    for s in PAPER_STAGES:
        assert (s.batch_size, s.betas, s.weight_decay, s.precision, s.preset) == (2048, (0.9, 0.999), 0.1, "bf16",
                                                                                 "MicroDiT_XL_2")
        assert s.moe_lr_scale == 0.5 and s.caption_dropout == 0.1
    assert [s.pos_interp_scale for s in PAPER_STAGES] == [1, 1, 2, 2]


def test_cpu_stages_mirror_the_paper_at_16_and_32_px():
    assert [s.resolution for s in CPU_STAGES] == [16, 16, 32, 32]
    assert [s.mask_ratio for s in CPU_STAGES] == [0.75, 0, 0.75, 0]
    assert all(s.preset == "MicroDiT_Mini_2" and s.batch_size == 64 for s in CPU_STAGES)
    assert CPU_STAGES[0].steps > CPU_STAGES[1].steps
    # 32 px keeps the 16 px token grid: patches of 4 latent cells (not 2), positions as at 16 px, a patch skip
    assert [s.model_overrides for s in CPU_STAGES] == [{}, {}] + [{"patch_size": 4, "patch_skip": True}] * 2
    assert [s.pos_interp_scale for s in CPU_STAGES] == [1, 1, 1, 1]


def test_every_config_field_has_a_comment():
    src = inspect.getsource(TrainConfig).splitlines()
    tree = ast.parse(inspect.getsource(TrainConfig))
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign):
            line = src[node.lineno - 1]
            assert "#" in line, line


def test_config_round_trips_and_rejects_unknown_fields(tmp_path):
    cfg = CPU_STAGES[2]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.load(p) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 3})


# ---- optimisation -------------------------------------------------------------------------------

def test_schedules():
    c = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", final_lr_fraction=0.33)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(10, c) == pytest.approx(1.0) and lr_factor(100, c) == pytest.approx(0.33)
    assert lr_factor(55, c) == pytest.approx(0.33 + 0.67 * 0.5)
    k = TrainConfig(steps=100, warmup_steps=5, schedule="constant")
    assert lr_factor(2, k) == pytest.approx(0.6) and lr_factor(50, k) == 1.0 and lr_factor(99, k) == 1.0


def test_moe_parameters_really_move_at_half_the_learning_rate():
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=8)
    moe = set(model.moe_parameter_names())
    assert moe and all(n in dict(model.named_parameters()) for n in moe)
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0)
    opt = make_optimizer(model, cfg, moe)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"dense": 1e-3, "moe": 5e-4}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():                 # every weight gets a gradient: Adam's first step = lr * sign
        p.grad = torch.randn_like(p)
    opt.step()
    step = {n: (p.detach() - before[n]).abs().median().item() for n, p in model.named_parameters()}
    moe_step = max(step[n] for n in moe)
    dense_step = min(v for n, v in step.items() if n not in moe)
    assert moe_step == pytest.approx(5e-4, rel=0.05) and dense_step == pytest.approx(1e-3, rel=0.05)


def test_ema_follows_the_weights():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, 0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.shadow["weight"], w0 + 0.1)


def test_batch_split_reaches_the_global_batch():
    assert batch_split(TrainConfig(batch_size=2048, micro_batch_size=64), 8) == (64, 4)
    assert batch_split(TrainConfig(batch_size=64), 2) == (32, 1)
    assert batch_split(TrainConfig(batch_size=2048, micro_batch_size=128), 32) == (64, 1)   # more GPUs than planned
    with pytest.raises(ValueError, match="micro_batch_size"):
        batch_split(TrainConfig(batch_size=64, micro_batch_size=24), 1)


# ---- real runs ----------------------------------------------------------------------------------

def test_a_stage_trains_checkpoints_and_exports_a_loadable_model(data, tmp_path):
    cfg = tiny(data, tmp_path / "s", micro_batch_size=4, keep_checkpoints=1, steps=9)
    final = train(cfg)
    assert final == tmp_path / "s" / "final"
    m = json.loads((final / "manifest.json").read_text())
    assert m["kind"] == "checkpoint" and m["samples"] == 9 * 8 and m["wall_seconds"] > 0
    assert m["metrics"]["val_loss_end"] < m["metrics"]["val_loss_start"]
    assert math.isfinite(m["metrics"]["final_loss"]) and m["config"]["accumulation"] == 2
    assert json.loads((final / "train_config.json").read_text())["steps"] == 9
    assert TrainConfig.load(final / "train_config.json") == cfg      # a run's config file runs again as it is
    from microdit.checkpoint import load_model
    model, meta = load_model(str(final))
    assert (meta["image_autoencoder"], meta["text_encoder"], meta["resolution"]) == ("pixel:2", "tiny-clip:4", 16)
    assert meta["edm"]["P_mean"] == cfg.P_mean
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)] == ["step_00000008"]          # keep last 1
    assert (tmp_path / "s" / "samples" / "final.png").exists()
    lines = (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 10))
    assert list((tmp_path / "s" / "tensorboard").glob("events.out.tfevents.*"))
    assert train(cfg) == final                   # finished: skipped


def test_next_stage_starts_from_previous_weights_with_new_positions(data, tmp_path):
    finals = run_stages([tiny(data, tmp_path / "a", steps=3, name="a"),
                         tiny(data, tmp_path / "b", steps=2, name="b", resolution=32, pos_interp_scale=2.0,
                              mask_ratio=0.0, ema_decay=0.5)])
    assert [f.name for f in finals] == ["final", "final"]
    assert json.loads((finals[1] / "train_config.json").read_text())["init_from"] == str(finals[0])
    from microdit.data import open_latent_sets
    cfg_b = tiny(data, tmp_path / "x", resolution=32, pos_interp_scale=2.0, init_from=str(finals[0]))
    model = build_model(cfg_b, open_latent_sets([data[0]]))
    from safetensors.torch import load_file
    prev = load_file(str(finals[0] / "model.safetensors"))
    assert model.pos_embed.shape[1] == 64 and prev["pos_embed"].shape[1] == 16
    for k, v in model.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, prev[k]), k


def test_larger_patches_at_32px_start_from_stage_twos_images_upsampled(data, tmp_path):
    """The CPU recipe's hand-over: a 16 px stage with patch 2, then a 32 px stage with patch 4 and a patch skip
    (the same 4 x 4 token grid): the 32 px model built from the 16 px final draws, from an upsampled image,
    the 16 px model's output upsampled (pixel:2 latents are converted in pixel space)."""
    import torch.nn.functional as F
    from microdit.checkpoint import load_model
    from microdit.data import open_latent_sets
    grow = {"patch_size": 4, "patch_skip": True}
    finals = run_stages([tiny(data, tmp_path / "a", steps=3, name="a"),
                         tiny(data, tmp_path / "b", steps=2, name="b", resolution=32, mask_ratio=0.75,
                              model_overrides=grow)])
    small, _ = load_model(str(finals[0]))
    large = build_model(tiny(data, tmp_path / "x", resolution=32, model_overrides=grow, init_from=str(finals[0])),
                        open_latent_sets([data[0]])).eval()
    assert large.patch_size == 4 and large.pos_embed.shape[1] == small.pos_embed.shape[1] == 16
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 16, 16, generator=g)
    t, y = torch.randn(2, generator=g), torch.randn(2, 4, small.config.caption_channels, generator=g)

    def up(a):
        return a.repeat_interleave(2, -1).repeat_interleave(2, -2)
    with torch.no_grad():
        want = up(F.pixel_shuffle(small.eval()(F.pixel_unshuffle(image, 2), t, y), 2))
        got = F.pixel_shuffle(large(F.pixel_unshuffle(up(image), 2), t, y), 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    trained, meta = load_model(str(finals[1]))                  # the 32 px stage trained and saved its layout
    assert meta["model"]["patch_size"] == 4 and meta["model"]["patch_skip"] is True
    assert trained.patch_skip.linear.weight.abs().sum() > 0
    # a stage whose patches do not grow by a whole factor is refused, naming the folder
    with pytest.raises(ValueError, match=r"init_from .*a.final: patch size 2 -> 3"):
        build_model(tiny(data, tmp_path / "y", resolution=32, model_overrides={"patch_size": 3},
                         init_from=str(finals[0])), open_latent_sets([data[0]]))


def test_resume_after_a_stop_replays_the_same_losses(data, tmp_path):
    ref = tiny(data, tmp_path / "ref", steps=10, checkpoint_every=0, ema_decay=0.9)
    train(ref)
    part = ref.replace(out_dir=str(tmp_path / "part"))
    stopped = train(part, should_stop=lambda step, state: step == 6)
    assert stopped.name == "step_00000006" and json.loads((stopped / "manifest.json").read_text())["metrics"]["stopped_early"]
    assert not (tmp_path / "part" / "final").exists()
    train(part)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("ref", "part")]
    assert len(losses[1]) == 10 and losses[0] == losses[1]
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("ref", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_wall_seconds_stops_with_a_checkpoint(data, tmp_path):
    out = train(tiny(data, tmp_path / "w", steps=500, max_wall_seconds=0.5, num_samples=0))
    assert out.parent.name == "checkpoints" and (out / "model.safetensors").exists()
    assert 0 < json.loads((out / "manifest.json").read_text())["metrics"]["steps"] < 500


def test_nan_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
    bad = random_latent_set(tmp_path / "nan", n=48, resolutions=(16,), nan_from=36)
    cfg = TrainConfig(data=[str(bad)], out_dir=str(tmp_path / "n"), steps=20, batch_size=4, shuffle=False,
                      checkpoint_every=4, progress=False, num_samples=0)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 10.*step_00000008"):
        train(cfg)
    dirs = checkpoint_dirs(cfg.out_dir)
    assert dirs[-1].name == "step_00000008" and not (tmp_path / "n" / "final").exists()
    from safetensors.torch import load_file
    assert all(torch.isfinite(v).all() for v in load_file(str(dirs[-1] / "model.safetensors")).values())


def test_data_mean_auto_is_the_data_mean_at_stage_one_and_inherited_after(data, tmp_path):
    from microdit.checkpoint import load_model
    from microdit.data import LatentSet
    finals = run_stages([tiny(data, tmp_path / "a", steps=2, name="a", data_mean="auto"),
                         tiny(data, tmp_path / "b", steps=2, name="b", resolution=32, pos_interp_scale=2.0,
                              data_mean="auto")])
    ds = LatentSet(data[0], 16)
    expected = float(torch.stack([ds[i]["latents"].float() for i in range(len(ds))]).mean())
    got = [load_model(str(f))[1]["edm"]["data_mean"] for f in finals]
    assert got[0] == pytest.approx(expected, abs=1e-4) and got[1] == got[0]
    ds32 = LatentSet(data[0], 32)
    assert float(torch.stack([ds32[i]["latents"].float() for i in range(len(ds32))]).mean()) != pytest.approx(got[0], abs=1e-6)
    assert json.loads((finals[1] / "train_config.json").read_text())["data_mean"] == "auto"
    # a model saved before the setting existed was trained uncentred: "auto" continues it at 0, not the data's mean
    import shutil
    from microdit.training.config import resolve_data_mean
    old = shutil.copytree(finals[0], tmp_path / "old")
    meta = json.loads((old / "config.json").read_text())
    del meta["edm"]["data_mean"]
    (old / "config.json").write_text(json.dumps(meta))
    assert resolve_data_mean(tiny(data, tmp_path / "d", data_mean="auto", init_from=str(old))) == 0.0
    with pytest.raises(ValueError, match="data_mean"):
        tiny(data, tmp_path / "c", data_mean="middle").validate()
