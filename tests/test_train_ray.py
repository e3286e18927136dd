"""Ray Train runs a stage on a local Ray (loopback, token auth) and writes where the caller asked."""
import json

import pytest

from microdit.training.config import TrainConfig
from dataprep.synthetic import random_latent_set

pytestmark = pytest.mark.slow


def test_ray_train_with_relative_folders_writes_under_the_callers_directory(tmp_path, monkeypatch):
    from microdit.ray_cluster import ray_session
    from microdit.training.stages import ray_train
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    random_latent_set(tmp_path / "data", n=32, resolutions=(16,), seed=0)
    cfg = TrainConfig(name="r", data=["data"], out_dir="runs/stage1", steps=3, batch_size=4, checkpoint_every=2,
                      num_samples=0, progress=False)
    with ray_session(num_cpus=2):
        ray_train(cfg.to_dict(), num_workers=1, use_gpu=False, storage_path=str(tmp_path / "ray_results"))
    manifest = tmp_path / "runs" / "stage1" / "final" / "manifest.json"
    assert manifest.exists()
    assert json.loads(manifest.read_text())["metrics"]["steps"] == 3
