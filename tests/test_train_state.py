"""Training state read back safely: a planted pickle is refused unopened, a corrupt checkpoint is skipped."""
import json
import pickle

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
                checkpoint_every=2, keep_checkpoints=2, num_samples=0, progress=False, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def _losses(folder) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


class _WritesMarker:
    """What an attacker plants: unpickling it calls open(marker, "w")."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_a_run_folder_is_refused_unopened(data, tmp_path):
    cfg = tiny(data, tmp_path / "run")
    marker = tmp_path / "pwned"
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "train_state.pt").write_bytes(pickle.dumps({"step": _WritesMarker(marker)}))
    with pytest.raises(UnsafeCheckpoint) as e:
        train(cfg)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "train_state.pt" in msg and "refused" in msg


def test_a_corrupt_latest_checkpoint_is_named_and_resume_uses_the_previous(data, tmp_path):
    train(tiny(data, tmp_path / "ref"))
    cfg = tiny(data, tmp_path / "part")
    stopped = train(cfg, should_stop=lambda step, state: step == 6)
    assert [p.name for p in checkpoint_dirs(cfg.out_dir)] == ["step_00000004", "step_00000006"]
    victim = max(stopped.glob("train_state.*"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])         # a truncated write
    with pytest.warns(UserWarning, match=r"step_00000006 cannot be read.*previous checkpoint"):
        train(cfg)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "ref")
