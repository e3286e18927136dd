"""The masking ablation and the validation helpers, on a tiny real shapes latent set."""
import json

import pytest
import torch

from microdit.ablation import format_table, run_ablation
from microdit.data import LatentSet
from microdit.model import create_model
from dataprep.synthetic import shapes_latent_set
from microdit.training.validate import validation_loss


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return (shapes_latent_set(d / "train", 96, resolutions=(16,), seed=0, progress=False),
            shapes_latent_set(d / "val", 32, resolutions=(16,), seed=7, progress=False))


def test_validation_loss_is_repeatable_and_tells_models_apart(shapes):
    val = LatentSet(shapes[1], 16)
    assert val.schema.text_encoder == "tiny-clip:16" and val[0]["latents"].shape == (12, 8, 8)
    m1 = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    a, b = validation_loss(m1, val, num_samples=32), validation_loss(m1, val, num_samples=32)
    assert a == b and set(a) == {"sigma=0.05", "sigma=0.2", "sigma=0.5", "sigma=1", "sigma=2", "sigma=5", "mean"}
    torch.manual_seed(1)
    m2 = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    with torch.no_grad():
        m2.final_layer.linear.weight.normal_(0, 0.05)
    assert validation_loss(m2, val, num_samples=32)["mean"] != a["mean"]


def test_ablation_trains_three_variants_and_prints_the_table(shapes, tmp_path):
    rows = run_ablation([str(shapes[0])], str(shapes[1]), tmp_path / "abl", steps=3, batch_size=16,
                        n_per_task=1, progress=False, sample_steps=3, finetune_steps=2)
    assert [r["variant"] for r in rows] == ["a_no_mask", "b_naive_mask75", "c_deferred_mask75"]
    a, b, c = rows
    assert (a["mask_ratio"], b["mask_ratio"], c["mask_ratio"]) == (0.0, 0.75, 0.75)
    assert b["patch_mixer"] is False and c["patch_mixer"] is True
    assert b["flops_per_step"] < c["flops_per_step"] < a["flops_per_step"]
    assert all(r["val_loss"] > 0 for r in rows) and all(0 <= r["shapes_overall"] <= 1 for r in rows)
    cfg = json.loads((tmp_path / "abl" / "b_naive_mask75_unmasked" / "final" / "config.json").read_text())
    assert cfg["model"]["patch_mixer"] is False
    ft = json.loads((tmp_path / "abl" / "c_deferred_mask75_unmasked" / "final" / "train_config.json").read_text())
    assert ft["mask_ratio"] == 0 and ft["steps"] == 2 and ft["init_from"].endswith("c_deferred_mask75/final")
    table = format_table(rows)
    assert table.count("\n") == 4 and "c_deferred_mask75" in table
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text()) == rows
