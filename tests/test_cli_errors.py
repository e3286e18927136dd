"""Every command line turns a bad input into one `error:` line that names the field or file, exit code 2,
and no traceback (run as the user runs them: `python -m ...` in a subprocess)."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from microdit.checkpoint import save_model
from microdit.model import create_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow          # dozens of fresh Python processes: a few minutes on 2 cores


def run(module: str, *args, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    e.pop("MICRO_BUDGET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=e, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


def user_error(r: subprocess.CompletedProcess, *names: str) -> str:
    """The one error line, after checking exit code, no traceback, and that it names each of `names`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]
    for n in names:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    return save_model(tmp_path_factory.mktemp("ckpt") / "model", model, preset="MicroDiT_Nano_2",
                      image_autoencoder="pixel:2", text_encoder="tiny-clip:16", resolution=16)


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


# ---------------------------------------------------------------- dataprep

@pytest.mark.parametrize("res", ["0", "-16"])
def test_precompute_refuses_a_resolution_that_is_not_positive(tmp_path, res):
    user_error(run("dataprep.precompute", "--input", tmp_path / "in", "--out", tmp_path / "out",
                   "--resolutions", res), f"--resolutions {res}", "positive")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_sizes_that_are_not_positive(tmp_path):
    user_error(run("dataprep.convert", "--input", tmp_path, "--out", tmp_path / "out", "--min-size", "-5",
                   "--short-side", "0"), "--min-size -5")


def test_download_and_shapes_refuse_bad_counts(tmp_path):
    user_error(run("dataprep.download", "shapes", "--out", tmp_path / "o", "--samples", "-3"), "--samples")
    user_error(run("dataprep.download", "nope", "--out", tmp_path / "o"), "unknown dataset 'nope'")
    user_error(run("microdit.shapes", "--out", tmp_path / "s", "--n", "0"), "--n 0")
    user_error(run("dataprep.shapes_server", "--samples", "0"), "--samples 0")
    user_error(run("dataprep.data_bench", "--samples", "0"), "--samples 0")


# ---------------------------------------------------------------- generation and evaluation

def test_generate_names_a_bad_autoencoder(model_dir, tmp_path):
    user_error(run("microdit.generate", "--checkpoint", model_dir, "--prompt", "a cube", "--out", tmp_path / "o",
                   "--image-autoencoder", "nope"), "unknown image autoencoder 'nope'")
    assert not (tmp_path / "o").exists()
    user_error(run("microdit.generate", "--checkpoint", model_dir, "--prompt", "a cube", "--out", tmp_path / "o",
                   "--image-autoencoder", "pixel:x"), "pixel:x")


def test_generate_names_a_corrupt_weights_file(model_dir, tmp_path):
    bad = _copy(model_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    user_error(run("microdit.generate", "--checkpoint", bad, "--prompt", "a", "--out", tmp_path / "o"),
               str(bad / "model.safetensors"), "safetensors")


def test_generate_names_a_corrupt_config(model_dir, tmp_path):
    bad = _copy(model_dir, tmp_path / "bad")
    (bad / "config.json").write_text('{"format": "microdit", "model": ')
    user_error(run("microdit.generate", "--checkpoint", bad, "--prompt", "a", "--out", tmp_path / "o"),
               str(bad / "config.json"))
    (bad / "config.json").write_text(json.dumps({"format": "microdit", "model": {"no_such_field": 1}}))
    user_error(run("microdit.generate", "--checkpoint", bad, "--prompt", "a", "--out", tmp_path / "o"),
               str(bad / "config.json"))


def test_missing_checkpoint_is_a_missing_folder_unless_it_can_be_a_hub_id(tmp_path):
    missing = tmp_path / "runs" / "demo" / "final"
    line = user_error(run("microdit.generate", "--checkpoint", missing, "--prompt", "a", "--out", tmp_path / "o"),
                      str(missing), "no such folder")
    assert "huggingface-cli" not in line
    (tmp_path / "runs").mkdir()           # "runs/final" beside a local runs/ folder is a path, not a hub id
    line = user_error(run("microdit.generate", "--checkpoint", "runs/final", "--prompt", "a", "--out", "o",
                          cwd=tmp_path), "runs/final", "no such folder")
    assert "huggingface-cli" not in line
    user_error(run("microdit.generate", "--checkpoint", "someone/no-such-model", "--prompt", "a",
                   "--out", tmp_path / "o"), "huggingface-cli download someone/no-such-model")
    user_error(run("microdit.evaluate", "--checkpoint", missing, "--suite", "shapes", cwd=tmp_path), "no such folder")
    assert not (tmp_path / "eval").exists()              # nothing written for a checkpoint that is not there


def test_evaluate_bench_and_ablation_refuse_bad_numbers(model_dir, tmp_path):
    user_error(run("microdit.evaluate", "--checkpoint", model_dir, "--steps", "0"), "--steps 0")
    user_error(run("microdit.bench", "--threads", "0"), "--threads 0")
    if not torch.cuda.is_available():
        user_error(run("microdit.bench", "--device", "cuda"), "--device cuda")
    user_error(run("microdit.ablation", "--data", tmp_path / "none", "--val-data", tmp_path / "none"),
               str(tmp_path / "none"), "schema.json")
    user_error(run("dataprep.synthetic", "--out", tmp_path / "s", "--n", "0"), "--n 0")


# ---------------------------------------------------------------- flows

def test_pipeline_checks_profile_overrides_and_budget_before_prefect_starts(tmp_path):
    home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": ""}
    user_error(run("flows.prefect_flows", "--profile", "nope", "--root", tmp_path, env=env), "unknown profile 'nope'")
    user_error(run("flows.prefect_flows", "--overrides", "{bad", "--root", tmp_path, env=env), "--overrides")
    user_error(run("flows.prefect_flows", "--overrides", '{"no_such_field": 1}', "--root", tmp_path, env=env),
               "no_such_field")
    user_error(run("flows.prefect_flows", "--budget-usd", "-1", "--root", tmp_path, env=env), "budget -1")
    user_error(run("flows.demo", "--profile", "nope", env=env), "unknown profile 'nope'")
    assert not home.exists() or not any(home.iterdir())           # no Prefect server or database was started
    assert not (tmp_path / "local").exists()


def test_profiles_help_and_one_profile():
    r = run("flows.profiles", "--help")
    assert r.returncode == 0 and "usage" in r.stdout
    r = run("flows.profiles", "local")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "local"
    user_error(run("flows.profiles", "nope"), "unknown profile 'nope'")


def test_a_corrupt_ledger_is_called_corrupt(tmp_path):
    db = tmp_path / "ledger.duckdb"
    db.write_bytes(b"not a database " * 1000)
    line = user_error(run("flows.ledger", "report", "--db", db), str(db), "corrupt")
    assert "another process" not in line


def test_data_and_precompute_steps_do_not_start_once_the_budget_is_spent(tmp_path):
    from flows import steps
    from flows.profiles import get_profile
    p = get_profile("local")
    spent = steps.RunBudget(0.0, "r1", tmp_path / "ledger.duckdb")          # nothing recorded, nothing left
    with pytest.raises(steps.BudgetSpent, match="budget \\$0 .* before downloading shapes"):
        steps.download_step(p, p.datasets[0], tmp_path, spent)
    assert not any((tmp_path / "raw").glob("*/*"))
    with pytest.raises(steps.BudgetSpent, match="before precomputing"):
        steps.precompute_step(p, tmp_path / "raw" / "shapes-0123456789", tmp_path, spent)
    assert not (tmp_path / "latents").exists()


# ---------------------------------------------------------------- data: a decompression bomb

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header; its pixels never decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_counted_as_too_large(tmp_path):
    from PIL import Image

    from dataprep.convert import ConvertConfig, convert
    from microdit.manifest import Manifest
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.new("RGB", (40, 40), "red").save(raw / "ok.png")
    (raw / "ok.txt").write_text("a red square")
    (raw / "bomb.png").write_bytes(_png_header_only(50_000, 50_000))      # 2.5 G pixels
    (raw / "bomb.txt").write_text("a bomb")
    out = convert(ConvertConfig(str(raw), str(tmp_path / "out"), min_size=32), progress=False)
    m = Manifest.read(out)
    assert m.samples == 1 and m.skipped == {"image_too_large": 1}


# ---------------------------------------------------------------- training

@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    from dataprep.synthetic import random_latent_set
    return random_latent_set(tmp_path_factory.mktemp("latents") / "train", n=32, resolutions=(16,), seed=0)


def _train(latents, out, *sets):
    return run("microdit.training", "--config", _stage_json(out.parent), "--data", latents, "--out", out,
               "--set", "steps=2", "batch_size=8", "checkpoint_every=0", "progress=false", "num_samples=2",
               "sample_steps=2", *sets)


def _stage_json(folder: Path) -> Path:
    f = folder / "stage.json"
    if not f.exists():
        f.write_text(json.dumps({"name": "t", "resolution": 16, "lr": 1e-3}))
    return f


@pytest.mark.parametrize("sets, names", [
    (["preset=MicroDiT_Nope"], ["preset", "MicroDiT_Nope"]),
    (["batch_size=0"], ["batch_size", "0"]),
    (["lr=-1"], ["lr", "-1"]),
    (["no_such_field=1"], ["no_such_field"]),
    (["steps=-5"], ["steps", "-5"]),
])
def test_train_refuses_bad_fields_before_writing_anything(latents, tmp_path, sets, names):
    out = tmp_path / "run"
    user_error(_train(latents, out, *sets), *names)
    assert not out.exists()                      # no final/ (or anything) that a rerun could take as finished


def test_train_names_a_missing_data_folder(tmp_path):
    missing = tmp_path / "no-latents"
    user_error(run("microdit.training", "--recipe", "cpu", "--data", missing, "--out", tmp_path / "run"),
               str(missing), "no such folder")
    user_error(run("microdit.training", "--recipe", "cpu", "--data", tmp_path, "--out", tmp_path / "run"),
               str(tmp_path), "schema.json")


def test_train_refuses_a_folder_trained_with_another_config(latents, tmp_path):
    out = tmp_path / "run"
    r = _train(latents, out)
    assert r.returncode == 0 and (out / "final" / "manifest.json").exists(), r.stderr[-2000:]
    again = _train(latents, out)                                 # the same command: finished, nothing to do
    assert again.returncode == 0 and "already finished" in again.stderr
    line = user_error(_train(latents, out, "steps=10", "lr=0.002"), "steps: 2 -> 10", "lr: 0.001 -> 0.002")
    assert "new --out" in line and f"remove {out}" in line
