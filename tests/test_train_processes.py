"""The trainer as real processes: kill -9 and rerun resumes exactly; two gloo ranks stay in sync."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microdit.training.config import TrainConfig
from dataprep.synthetic import random_latent_set

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _config(tmp_path, out: str, **kw) -> Path:
    data = tmp_path / "train"
    if not data.exists():
        random_latent_set(data, n=96, resolutions=(16,), seed=0)
    cfg = TrainConfig(name="p", data=[str(data)], out_dir=str(tmp_path / out), steps=30, batch_size=8, lr=2e-3,
                      mask_ratio=0.75, checkpoint_every=5, progress=False, num_samples=0, warmup_steps=3,
                      ema_decay=0.9, **kw)
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_rerun_resumes_with_identical_losses(tmp_path):
    ref_cfg, cfg = _config(tmp_path, "ref"), _config(tmp_path, "killed")
    cmd = [sys.executable, "-m", "microdit.training", "--config"]
    import torch

    from microdit.training.stages import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # the same thread count as the subprocesses: same sums
    try:
        train(TrainConfig.load(ref_cfg))           # the uninterrupted reference, in this process
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.Popen(cmd + [str(cfg)], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 13 <= done < 30
    r = subprocess.run(cmd + [str(cfg)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "ref")
    assert (tmp_path / "killed" / "final" / "manifest.json").exists()


def test_two_gloo_ranks_stay_identical(tmp_path):
    cfg = _config(tmp_path, "ddp", strategy="ddp")
    d = json.loads(cfg.read_text())
    d.update(steps=6, checkpoint_every=3, micro_batch_size=2)        # 2 ranks x 2 micro-steps x 2 = 8
    cfg.write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "microdit.training", "--config", str(cfg)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "final" / "manifest.json").read_text())
    sums = m["metrics"]["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert m["config"]["world_size"] == 2 and m["config"]["accumulation"] == 2 and m["samples"] == 6 * 8
    assert len(_losses(tmp_path / "ddp")) == 6
