"""Progress a person sees: step events, the live stage line, the flow run id the demo prints.

    .venv/bin/python -m pytest tests/test_progress.py -q
"""
import io
import json
import time

import pytest

from flows import progress
from flows.demo import flow_run_id_from, reopen_commands


class Tty(io.StringIO):
    def isatty(self):
        return True


def _metrics(out_dir, *records):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_events_and_live_stage_line(tmp_path):
    run, stage = tmp_path / "run", tmp_path / "run" / "train" / "stage1-abc"
    run.mkdir()
    with progress.step_events(run, "download", dataset="shapes"):
        pass
    progress.record(run, "precompute", "skip")
    progress.record(run, "train:stage1", "start", out_dir=str(stage), steps=100, batch_size=64)
    _metrics(stage, {"step": 40, "loss": 0.25, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 128.0})
    out = Tty()
    f = progress.Follower(run, out=out)
    f.poll()
    text = out.getvalue()
    assert "> download started" in text and "= download done in 0s" in text
    assert "precompute skipped" in text
    assert "> train:stage1 (100 steps) started" in text
    # one live line, rewritten in place: 40/100 steps, 60 left at 64/128 = 0.5 s each -> 30 s
    live = text.rsplit("\n", 1)[-1]
    assert live.startswith("\r[run]   train:stage1  step 40/100 (40%)  loss 0.2500  128 samples/s  ETA 30s")
    _metrics(stage, {"step": 90, "loss": 0.125, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 64.0})
    f.poll()
    assert "step 90/100 (90%)  loss 0.1250  64 samples/s  ETA 10s" in out.getvalue().rsplit("\r", 1)[-1]
    progress.record(run, "train:stage1", "end", seconds=75.0)
    f.poll()
    f.close()
    assert out.getvalue().endswith("= train:stage1 done in 1m15s\n") and not f.running


def test_plain_output_is_sparse_and_failures_say_why(tmp_path):
    run, stage = tmp_path / "run", tmp_path / "stage"
    run.mkdir()
    progress.record(run, "train:stage2", "start", out_dir=str(stage), steps=10, batch_size=8)
    _metrics(stage, {"step": 1, "loss": 1.0, "samples_per_s": 8.0})
    out = io.StringIO()                       # a log file: no carriage returns, one line per interval
    f = progress.Follower(run, out=out, plain_every=3600)
    for _ in range(5):
        f.poll()
    assert "\r" not in out.getvalue() and out.getvalue().count("step 1/10") == 1
    with pytest.raises(RuntimeError):
        with progress.step_events(run, "evaluate"):
            raise RuntimeError("no checkpoint in runs/x\nsecond line")
    f.poll()
    assert "x evaluate FAILED in 0s: no checkpoint in runs/x" in out.getvalue()


def test_half_written_lines_wait_for_their_end(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / progress.EVENTS, "w") as fh:
        fh.write(json.dumps({"t": time.time(), "step": "download", "event": "start"}) + "\n" + '{"t": 1, "step": "down')
    out = io.StringIO()
    f = progress.Follower(run, out=out)
    f.poll()
    assert out.getvalue().count("download started") == 1 and "done" not in out.getvalue()
    with open(run / progress.EVENTS, "a") as fh:
        fh.write('load", "event": "end", "seconds": 3}\n')
    f.poll()
    assert "= download done in 3s" in out.getvalue()


def test_demo_finds_the_flow_run_and_says_how_to_reopen_it(tmp_path):
    text = ("Creating flow run for deployment 'micro-budget/full'...\nCreated flow run 'witty-fox'.\n"
            "└── UUID: 0b4c2a1e-5f7d-4e2b-9a3c-1d2e3f4a5b6c\n")
    rid = flow_run_id_from(text)
    assert rid == "0b4c2a1e-5f7d-4e2b-9a3c-1d2e3f4a5b6c" and flow_run_id_from("no id here") is None
    lines = reopen_commands({"flow_run_id": rid, "run_dir": str(tmp_path / "runs" / "local"),
                             "prefect_home": str(tmp_path / "runs" / "prefect")})
    joined = "\n".join(lines)
    assert f"/runs/flow-run/{rid}" in joined and "prefect server start --host 127.0.0.1" in joined
    assert "tensorboard" in joined and "runs/local/train" in joined
