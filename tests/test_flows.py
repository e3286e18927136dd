"""Flows under Prefect's test harness: the local profile end to end on a tiny config, a re-run that
skips everything, and a budget that stops training cleanly and then resumes without double counting.

    .venv/bin/python -m pytest tests/test_flows.py -q
"""
import json
import math
from pathlib import Path

import pytest

from flows import ledger, steps
from flows.profiles import PROFILES, get_profile
from microdit.manifest import read_manifest

TINY = {"datasets": [{"dataset": "shapes", "samples": 96}], "steps_scale": 0.01,
        "train_overrides": {"batch_size": 16, "checkpoint_every": 4, "progress": False},
        "eval_kwargs": {"steps": 3, "shapes_prompts_per_task": 1, "images_per_prompt": 1,
                        "shapes_real_images": 16}}


def test_profiles_and_content_addressed_stages(tmp_path):
    assert set(PROFILES) == {"local", "subset", "paper", "rehearsal"}
    with pytest.raises(ValueError, match="unknown profile fields"):
        get_profile("local", {"stepz": 1})
    p = get_profile("local", TINY)
    assert [c.name for c in steps.stage_configs(p.replace(stages=[2, 3]), [tmp_path], tmp_path)] == \
        ["stage2", "stage3"]
    a = steps.stage_configs(p, [tmp_path / "lat-a"], tmp_path)
    b = steps.stage_configs(p, [tmp_path / "lat-b"], tmp_path)
    assert [c.name for c in a] == ["stage1", "stage2", "stage3", "stage4"]
    assert a[1].init_from == str(Path(a[0].out_dir) / "final")          # each stage starts from the last
    assert all(x.out_dir != y.out_dir for x, y in zip(a, b))             # other inputs -> other folders
    from microdit.training.config import CPU_STAGES
    assert a[0].steps == max(1, round(CPU_STAGES[0].steps * 0.01)) and a[2].resolution == 32
    # latents are named by what determines them: more workers reuse them, another resolution does not
    raw = tmp_path / "raw" / "shapes-1"
    lat = steps.precompute_config(p, raw, tmp_path)[1]
    assert steps.precompute_config(p.replace(precompute_workers=1, precompute_threads=2), raw, tmp_path)[1] == lat
    assert steps.precompute_config(p.replace(resolutions=[16]), raw, tmp_path)[1] != lat
    g = steps.BudgetGuard(budget_usd=1.0, spent_before=0.5, usd_per_second=0.1)
    assert not g(4, {"step": 4, "wall_seconds": 4.0})                     # 0.5 + (4 + 1) * 0.1 = 1.0
    assert g(5, {"step": 5, "wall_seconds": 5.0}) and g.stopped_at == 5   # 0.5 + 6 * 0.1 > 1.0


def test_precompute_resolutions_are_checked_against_the_recipe_before_any_work(tmp_path):
    for name in PROFILES:
        steps.check_resolutions(get_profile(name))                     # every shipped profile agrees
    bad = get_profile("local", {"resolutions": [16]})
    with pytest.raises(ValueError, match=r"\(16,\).*'cpu' trains stage3 at 32 px"):
        steps.check_resolutions(bad)
    steps.check_resolutions(bad.replace(stages=[1, 2]))                 # only the 16 px stages: fine
    steps.check_resolutions(bad.replace(train_overrides={"resolution": 16}))
    from flows.prefect_flows import _setup
    with pytest.raises(ValueError, match="stage3"):
        _setup("local", {"resolutions": [16]}, "r", str(tmp_path))
    assert not (tmp_path / "r").exists()                                # nothing written before the check


def test_budget_decision_and_the_one_price_rate():
    from flows.prices import load_prices
    assert steps.stage_budget(None, 5.0, 0.1) == (True, None)
    assert steps.stage_budget(1.0, 1.0, 0.1) == (False, None)           # nothing left: the stage does not start
    start, g = steps.stage_budget(1.0, 0.5, 0.1)
    assert start and (g.budget_usd, g.spent_before, g.rate) == (1.0, 0.5, 0.1)
    prices = load_prices()
    for p in (get_profile("paper"), get_profile("local")):
        rate = prices.usd_per_second(num_gpus=p.num_gpus, gpu_type=p.gpu_type, cpu_cores=p.cpu_cores)
        gpu_s = 1000.0 * p.num_gpus
        cpu_s = 0.0 if p.num_gpus else 1000.0 * p.cpu_cores              # what 1000 s of the run records
        ledger_usd = prices.price(cpu_seconds=cpu_s, gpu_seconds=gpu_s, gpu_type=p.gpu_type, bytes=0)["total_usd"]
        assert rate > 0 and math.isclose(1000 * rate, ledger_usd, rel_tol=1e-12)


def test_in_process_training_runs_on_the_profiles_cores_and_restores_the_thread_count(tmp_path):
    import torch
    from dataprep.synthetic import random_latent_set
    from microdit.training.config import TrainConfig
    data = random_latent_set(tmp_path / "lat", n=16, resolutions=(16,), seed=0)
    cfg = TrainConfig(name="t", data=[str(data)], out_dir=str(tmp_path / "t"), steps=2, batch_size=4,
                      checkpoint_every=0, num_samples=2, sample_steps=1, progress=False)
    seen, before = [], torch.get_num_threads()
    torch.set_num_threads(1)                        # as the demo's worker starts (OMP_NUM_THREADS=1)
    try:
        steps.train_step(cfg, on_step=lambda step, state: seen.append(torch.get_num_threads()),
                         threads=steps.cpu_threads(get_profile("local")))
        assert seen and set(seen) == {2} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert steps.cpu_threads(get_profile("paper")) == 0          # GPU runs: torch's own choice


def test_the_price_list_does_not_copy_the_recipe(tmp_path):
    from flows.prices import load_prices
    bad = tmp_path / "prices.toml"
    bad.write_text("[paper]\nreference_usd = 1890.0\nstage_steps = { stage1 = 1 }\n")
    with pytest.raises(ValueError, match="stage_steps.*PAPER_STAGES"):
        load_prices(bad)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_local_flow_end_to_end_rerun_and_budget(harness, tmp_path):
    from flows.prefect_flows import full_flow, record_task, train_flow
    root = tmp_path / "runs"
    s = full_flow(profile="local", overrides=TINY, run_name="t", root=str(root))
    db = Path(s["ledger"])
    shapes = s["evaluation"]["report"]["suites"]["shapes"]
    assert set(shapes["tasks"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert math.isfinite(shapes["fd"]) and (Path(s["evaluation"]["folder"]) / shapes["grids"][0]).exists()
    rows, total = s["costs"]["rows"], s["costs"]["total"]
    assert [r["step"] for r in rows] == ["download", "precompute", "train:stage1", "train:stage2",
                                         "train:stage3", "train:stage4", "evaluate"]
    assert math.isclose(sum(r["total_usd"] for r in rows), total["total_usd"], rel_tol=1e-9)
    assert total["total_usd"] > 0 and total["assets"] == 7
    assert json.loads((root / "t" / "summary.json").read_text())["costs"]["total"] == total
    # what a person sees: every step's start and end in the run folder, and the run's Prefect artifacts
    events = [json.loads(ln) for ln in (root / "t" / "progress.jsonl").read_text().splitlines()]
    assert {"download", "precompute", "train:stage1", "train:stage4", "evaluate"} <= \
        {e["step"] for e in events if e["event"] == "end"}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    wanted = ["cost-table", "scores", "stage-stage1", "stage-stage4", "progress-stage1", "progress-stage4"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)))
    assert {a.key for a in found} == set(wanted)
    assert max(a.data for a in found if a.key == "progress-stage4") == 100.0

    # a second run skips every finished asset and records nothing new
    again = full_flow(profile="local", overrides=TINY, run_name="t", root=str(root))
    assert again["costs"]["total"] == total and again["evaluation"]["folder"] == s["evaluation"]["folder"]
    # the ledger task alone (task.fn): ingesting the same manifests again counts nothing twice
    assert math.isclose(record_task.fn(s["latents"], "precompute", "local", "t", db), rows[1]["total_usd"])
    assert ledger.report(run_id="t", db=db).total == total

    # a budget smaller than one step stops stage 1 cleanly with a resumable checkpoint ...
    one = {**TINY, "stages": [1]}
    cut = train_flow(profile="local", latents=s["latents"], overrides=one, run_name="b", root=str(root),
                     budget_usd=1e-9)
    assert cut["status"].startswith("stopped in stage1") and len(cut["checkpoints"]) == 1
    stopped = read_manifest(cut["checkpoints"][0])
    from microdit.training.config import CPU_STAGES
    stage1_steps = max(1, round(CPU_STAGES[0].steps * TINY["steps_scale"]))
    assert stopped.metrics["stopped_early"] and stopped.metrics["steps"] < stage1_steps
    spent = ledger.report(run_id="b", db=db).total
    assert spent["assets"] == 1
    # ... and without the budget the same stage resumes from it and the run completes: the ledger
    # records each stage once in all (the stopped part is not counted twice)
    done = train_flow(profile="local", latents=s["latents"], overrides=one, run_name="b", root=str(root))
    assert done["status"] == "complete" and len(done["checkpoints"]) == 1
    rep = ledger.report(run_id="b", db=db)
    stage1 = next(r for r in rep.rows if r["step"] == "train:stage1")
    final1 = read_manifest(done["checkpoints"][0])
    assert stage1["assets"] == 2 and math.isclose(stage1["wall_s"], final1.wall_seconds, rel_tol=1e-9)
    assert stage1["samples"] == final1.samples == stage1_steps * 16
    assert math.isclose(sum(r["total_usd"] for r in rep.rows), rep.total["total_usd"], rel_tol=1e-9)


STUBBORN = """
import signal, sys, time
seen = []
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0) if seen else seen.append(1))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_demo_stops_a_process_that_ignores_the_first_sigterm(tmp_path):
    """Like an idle Prefect worker: the demo's Service.stop sends a second signal and the process ends."""
    import sys
    import time

    from flows.demo import Service
    svc = Service("stubborn", [sys.executable, "-c", STUBBORN], dict(__import__("os").environ), tmp_path / "s.log")
    t0 = time.time()
    while "ready" not in (tmp_path / "s.log").read_text() and time.time() - t0 < 20:
        time.sleep(0.05)
    svc.stop(grace=2.0)
    assert svc.proc.returncode == 0 and not svc.alive()     # exited by itself on the second SIGTERM
    assert time.time() - t0 < 20
