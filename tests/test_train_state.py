"""Training state read back safely: a planted pickle is refused unopened, a corrupt checkpoint is skipped."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microdit.training.stages import train
from microdit.training.config import TrainConfig
from microdit.training.state import UnsafeCheckpoint, checkpoint_dirs
from dataprep.synthetic import random_latent_set


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return random_latent_set(tmp_path_factory.mktemp("latents") / "train", n=48, resolutions=(16,), seed=0)


def tiny(data, out, **kw) -> TrainConfig:
    base = dict(name="t", data=[str(data)], out_dir=str(out), steps=8, batch_size=4, lr=2e-3, mask_ratio=0.5,
                checkpoint_every=3, keep_checkpoints=2, num_samples=0, progress=False, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def _losses(folder) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


class _WritesMarker:
    """What an attacker plants: unpickling it calls open(marker, "w")."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory):
    """A run folder with one good checkpoint (stopped at step 3)."""
    cfg = tiny(data, tmp_path_factory.mktemp("stopped") / "run")
    train(cfg, should_stop=lambda step, state: step == 3)
    return Path(cfg.out_dir)


def _plant_train_state(step: Path, marker) -> None:
    for f in step.iterdir():
        if f.name.startswith("train_state"):
            f.unlink()
    (step / "train_state.pt").write_bytes(pickle.dumps({"step": _WritesMarker(marker)}))


def _plant_metadata(step: Path, marker) -> None:
    (step / "shards" / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))


def _plant_bytes_entry(step: Path, marker) -> None:
    import torch.distributed.checkpoint as dcp
    shutil.rmtree(step / "shards")
    dcp.save({"model": {"evil": _WritesMarker(marker)}}, checkpoint_id=str(step / "shards"), no_dist=True)


@pytest.mark.parametrize("plant", [_plant_train_state, _plant_metadata, _plant_bytes_entry])
def test_a_planted_pickle_in_a_run_folder_is_refused_unopened(data, stopped_run, tmp_path, plant):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "pwned"
    plant(out / "checkpoints" / "step_00000003", marker)
    with pytest.raises(UnsafeCheckpoint) as e:
        train(tiny(data, out))
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "step_00000003" in msg and "refused" in msg


@pytest.mark.slow                  # a fresh interpreter importing torch: ~20 s here
def test_the_command_line_refuses_a_planted_pickle_in_one_line(data, stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "pwned"
    _plant_metadata(out / "checkpoints" / "step_00000003", marker)
    (tmp_path / "stage.json").write_text(json.dumps(tiny(data, out).to_dict()))
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "microdit.training", "--config", str(tmp_path / "stage.json")],
                       cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)})
    assert r.returncode == 2 and not marker.exists()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and ".metadata" in errors[0] and "refused" in errors[0]
    assert "Traceback" not in r.stderr


def test_a_corrupt_latest_checkpoint_is_named_and_resume_uses_the_previous(data, tmp_path):
    train(tiny(data, tmp_path / "ref"))
    cfg = tiny(data, tmp_path / "part")
    stopped = train(cfg, should_stop=lambda step, state: step == 7)
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)] == ["step_00000006", "step_00000007"]
    victim = max(stopped.rglob("*.distcp"), key=lambda p: p.stat().st_size)         # the weights' shard
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])         # a truncated write
    with pytest.warns(UserWarning, match=r"step_00000007 cannot be read.*previous checkpoint"):
        train(cfg)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")
