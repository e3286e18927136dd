"""FSDP2 over gloo: two ranks train like one process; a sharded checkpoint of a run killed with -9
resumes on two ranks and on one with the uninterrupted run's losses, gradient norms and EMA."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from microdit.training.config import TrainConfig
from microdit.training.loop import train
from dataprep.synthetic import random_latent_set

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STEPS = 9


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _config(root: Path, out: str) -> TrainConfig:
    # micro-batch 1: rank r's micro-step k holds global sample k * world + r, so 2 ranks x 2 micro-steps
    # and 1 rank x 4 micro-steps see the same samples with the same random draws (state.rng_state)
    return TrainConfig(name="f", data=[str(root / "data")], out_dir=str(root / out), steps=STEPS, batch_size=4,
                       micro_batch_size=1, lr=2e-3, warmup_steps=2, mask_ratio=0.5, grad_clip=0.05,
                       ema_decay=0.9, strategy="fsdp", checkpoint_every=3, keep_checkpoints=2, num_samples=0,
                       progress=False)


def _torchrun(cfg: TrainConfig, **kw):
    path = Path(cfg.out_dir).with_suffix(".json")
    path.write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "microdit.training", "--config", str(path)]
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun starts each rank in a session of its own)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(ln.split(":\t", 1) for ln in status.read_text().splitlines() if ":\t" in ln)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return found


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _in_process(cfg: TrainConfig):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # the subprocesses' thread count: the same sums
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    random_latent_set(root / "data", n=64, resolutions=(16,), seed=0)
    _in_process(_config(root, "reference"))                      # one process, uninterrupted
    killed = _config(root, "killed")
    proc = _torchrun(killed)
    metrics = Path(killed.out_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    for pid in _children(proc.pid) + [proc.pid]:               # both ranks (own sessions), then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return root


def _assert_same_run(folder: Path, reference: Path) -> None:
    got, ref = _metrics(folder), _metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in ref], rel=1e-5), key
    from safetensors.torch import load_file
    a, b = (load_file(str(f / "final" / "model.safetensors")) for f in (folder, reference))
    assert a.keys() == b.keys()
    for k in a:                                                  # the exported EMA
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_fsdp2_on_two_ranks_clips_and_logs_like_one_process(runs):
    got, ref = _metrics(runs / "killed"), _metrics(runs / "reference")
    assert 7 <= len(got) < STEPS
    assert all(m["grad_norm"] > 0.05 for m in ref)               # the clip is active at every step
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in ref[:len(got)]], rel=1e-5), key


def test_a_killed_sharded_run_resumes_on_two_ranks(runs):
    shutil.copytree(runs / "killed", runs / "on2")
    proc = _torchrun(_config(runs, "on2"))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out
    _assert_same_run(runs / "on2", runs / "reference")


def test_a_killed_sharded_run_resumes_on_one_rank(runs, capfd):
    shutil.copytree(runs / "killed", runs / "on1")
    _in_process(_config(runs, "on1"))
    assert "resuming from" in capfd.readouterr().err
    _assert_same_run(runs / "on1", runs / "reference")
