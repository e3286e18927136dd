"""Bring your own data: a step that keeps nothing, or a recipe the latent set cannot feed, fails at once and
names the flag to change; the quick recipe trains one unmasked 16 px stage (docs/your-data.md)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dataprep.synthetic import random_latent_set
from microdit.cli import UserError
from microdit.manifest import read_manifest
from microdit.training.config import STAGES, stage_configs
from microdit.training.stages import run_stages

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def small_images(folder: Path, n: int = 6, size: int = 32) -> Path:
    """A folder of captioned images (<name>.png + <name>.txt) smaller than convert's default --min-size."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (size, size), (40 * i, 200, 30)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a green square number {i}")
    return folder


def test_convert_keeping_nothing_exits_nonzero_and_names_min_size(tmp_path):
    raw, out = small_images(tmp_path / "mine"), tmp_path / "clean"
    r = subprocess.run([sys.executable, "-m", "dataprep.convert", "--input", str(raw), "--out", str(out),
                        "--engine", "local"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "kept 0" in err and "image_too_small" in err and "--min-size" in err and "32x32" in err
    assert "Traceback" not in r.stderr
    assert read_manifest(out) is None                   # nothing that a next step could take for a finished set
    r = subprocess.run([sys.executable, "-m", "dataprep.convert", "--input", str(raw), "--out", str(out),
                        "--engine", "local", "--min-size", "32"], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_manifest(out).samples == 6


def test_a_missing_resolution_fails_before_stage_one_trains(tmp_path):
    lat = random_latent_set(tmp_path / "lat16", n=16, resolutions=(16,), seed=0)
    stages = stage_configs("cpu", [str(lat)], str(tmp_path / "run"), steps=2, batch_size=8, progress=False)
    with pytest.raises(UserError) as e:
        run_stages(stages)
    msg = str(e.value)
    assert "stage3 trains at 32 px" in msg and "[16]" in msg and "--resolutions 16 32" in msg
    assert "stage1 stage2 (--stages)" in msg and "--recipe quick" in msg
    assert not (tmp_path / "run" / "stage1").exists()   # nothing trained

    r = subprocess.run([sys.executable, "-m", "microdit.training", "--recipe", "cpu", "--data", str(lat),
                        "--out", str(tmp_path / "run")], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: stage3 trains at 32 px"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "stage1").exists()


@pytest.mark.slow
def test_quick_recipe_is_one_unmasked_low_resolution_stage_and_trains(tmp_path):
    (quick,) = STAGES["quick"]
    assert quick.mask_ratio == 0 and quick.resolution == 16 and quick.steps >= 500
    lat = random_latent_set(tmp_path / "lat16", n=16, resolutions=(16,), seed=0)
    r = subprocess.run([sys.executable, "-m", "microdit.training", "--recipe", "quick", "--data", str(lat),
                        "--out", str(tmp_path / "run"), "--set", "steps=3", "batch_size=8", "num_samples=0",
                        "checkpoint_every=0", "progress=false"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    final = read_manifest(tmp_path / "run" / "quick" / "final")
    assert final is not None and final.metrics["steps"] == 3 and final.metrics["resolution"] == 16


def test_stages_out_of_the_recipe_are_a_usage_error(tmp_path):
    lat = random_latent_set(tmp_path / "lat16", n=8, resolutions=(16,), seed=0)
    r = subprocess.run([sys.executable, "-m", "microdit.training", "--recipe", "quick", "--stages", "2",
                        "--data", str(lat), "--out", str(tmp_path / "run")], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "recipe quick has stages 1-1" in r.stderr


def test_a_profile_can_train_the_quick_recipe_on_16_px_latents():
    from flows import steps
    from flows.profiles import get_profile
    quick = get_profile("local", {"recipe": "quick", "resolutions": [16]})
    steps.check_resolutions(quick)                                  # nothing at 32 px is asked for
    assert [c.name for c in steps.stage_configs(quick, [Path("/latents")], Path("/run"))] == ["quick"]
    with pytest.raises(ValueError, match="trains stage3 at 32 px"):
        steps.check_resolutions(get_profile("local", {"resolutions": [16]}))
