"""dataprep.precompute: MDS schema round trip, kill-and-rerun completeness, the Ray engine."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataprep.convert import ConvertConfig, convert
from dataprep.precompute import PrecomputeConfig, precompute
from dataprep.units import TMP_PREFIX, crop_to, finished_units
from microdit.manifest import Manifest
from microdit.schema import LatentSchema

REPO = Path(__file__).resolve().parents[1]


def shapes_converted(tmp_path, n, resolution=32):
    """n shapes images in img2dataset's files layout (no network step), converted."""
    from microdit.shapes import generate_shapes
    raw = tmp_path / "raw"
    for i, s in enumerate(generate_shapes(n, resolution=resolution, seed=1)):
        d = raw / f"{i // 100:05d}"
        d.mkdir(parents=True, exist_ok=True)
        s.image.save(d / f"{i:09d}.png")
        (d / f"{i:09d}.txt").write_text(s.caption)
        (d / f"{i:09d}.json").write_text(json.dumps({"key": f"{i:09d}", "meta": json.dumps(s.meta)}))
    return convert(ConvertConfig(str(raw), str(tmp_path / "clean"), source="shapes", min_size=16, short_side=64,
                                 shard_samples=100), progress=False)


def read_set(out):
    from streaming import LocalDataset
    ds = LocalDataset(local=str(out))
    return [ds[i] for i in range(len(ds))]


def converted_rows(folder):
    return pa.concat_tables([pq.read_table(f) for f in sorted(Path(folder).glob("part-*.parquet"))]).to_pylist()


def test_schema_round_trip_is_bit_identical(tmp_path):
    from microdit.data import open_latent_sets
    from microdit.encoders import load_text_encoder
    conv = shapes_converted(tmp_path, 30)
    out = precompute(PrecomputeConfig(str(conv), str(tmp_path / "lat"), resolutions=(16, 32),
                                      image_autoencoder="pixel:2", text_encoder="tiny-clip:16", engine="local",
                                      batch_size=64, unit_samples=64, progress=False))
    schema = LatentSchema.read(out)
    assert schema.resolutions == (16, 32) and (schema.latent_channels, schema.caption_len) == (12, 16)
    assert open_latent_sets([out], resolution=32).caption_dim == 64        # the training reader accepts it
    rows = {r["sample_id"]: r for r in converted_rows(conv)}
    got = read_set(out)
    assert sorted(s["sample_id"] for s in got) == sorted(rows)
    te = load_text_encoder("tiny-clip:16")
    ordered = converted_rows(conv)                                           # one unit, one batch, this order
    cap = te.encode([r["caption"] for r in ordered]).numpy().astype(np.float16)
    cap_by_id = {r["sample_id"]: cap[i] for i, r in enumerate(ordered)}
    for s in got:
        row = rows[s["sample_id"]]
        img = Image.open(io.BytesIO(row["image"])).convert("RGB")
        for res in (16, 32):
            x = torch.from_numpy(crop_to(img, res).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
            want = torch.nn.functional.pixel_unshuffle(x, 2)[0].numpy().astype(np.float16)
            lat = s[f"latents_{res}"]
            assert lat.dtype == np.float16 and lat.shape == (12, res // 2, res // 2)
            assert np.array_equal(lat, want)
        assert np.array_equal(s["caption_latents"], cap_by_id[s["sample_id"]])
        assert s["caption"] == row["caption"] and s["source"] == "shapes"
        assert s["meta"] == json.loads(row["meta"]) and s["meta"]["objects"]
    m = Manifest.read(out)
    assert m.kind == "latents" and m.samples == 30 and m.config["encoders"]["text_encoder"] == "tiny-clip:16"
    assert m.metrics["worker_seconds"] > 0 and m.bytes > 0


def _cli(conv, out, engine="local"):
    return [sys.executable, "-m", "dataprep.precompute", "--input", str(conv), "--out", str(out),
            "--resolutions", "16", "32", "--image-autoencoder", "tiny-kl", "--text-encoder", "tiny-clip:16",
            "--engine", engine, "--unit-samples", "20", "--batch-size", "10", "--threads", "1"]


def kill9_after_units(cmd: list, where, units: int, timeout: float, poll: float) -> str:
    """Run a precompute command and kill -9 it (no cleanup of any kind) once `units` work units of `where`
    (a folder or URL) are finished, or it ends, or `timeout` passes; returns what it printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while len(finished_units(where)) < units and proc.poll() is None and time.time() < deadline:
            time.sleep(poll)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0].decode()
    return log


def test_killed_run_rerun_has_every_sample_exactly_once(tmp_path):
    n, units = 400, 20
    conv = shapes_converted(tmp_path, n)
    out = tmp_path / "lat"
    kill9_after_units(_cli(conv, out), out, 2, timeout=120, poll=0.02)
    before = finished_units(out)
    assert 2 <= len(before) < units, "the run was not killed mid-way"
    assert not (out / "manifest.json").exists()
    # the same command again (in-process: same config, same folder)
    cfg = PrecomputeConfig(str(conv), str(out), resolutions=(16, 32), image_autoencoder="tiny-kl",
                           text_encoder="tiny-clip:16", engine="local", unit_samples=20, batch_size=10, threads=1,
                           progress=False)
    precompute(cfg)
    after = finished_units(out)
    assert len(after) == units and not list(out.glob(f"{TMP_PREFIX}*"))
    for name, info in before.items():                                       # finished units were not redone
        assert after[name]["finished_at"] == info["finished_at"]
    ids = [s["sample_id"] for s in read_set(out)]
    assert Counter(ids) == Counter(r["sample_id"] for r in converted_rows(conv))   # all, each exactly once
    m = Manifest.read(out)
    assert m.samples == n and m.metrics["units_this_run"] == units - len(before)
    assert Manifest.read(precompute(cfg)).created_at == m.created_at         # finished: nothing to do
    cfg.resolutions = (16,)
    with pytest.raises(ValueError, match="different config"):
        precompute(cfg)


@pytest.mark.slow
def test_ray_engine_matches_local_engine(tmp_path):
    conv = shapes_converted(tmp_path, 60)
    common = dict(resolutions=(16, 32), image_autoencoder="pixel:2", text_encoder="tiny-clip:16", unit_samples=20,
                  batch_size=20, progress=False)
    local = precompute(PrecomputeConfig(str(conv), str(tmp_path / "local"), engine="local", **common))
    ray_out = precompute(PrecomputeConfig(str(conv), str(tmp_path / "ray"), engine="ray", num_cpus=2, workers=2,
                                          **common))
    a = {s["sample_id"]: s for s in read_set(local)}
    b = {s["sample_id"]: s for s in read_set(ray_out)}
    assert sorted(a) == sorted(b) and len(a) == 60
    for k in a:
        for col in ("latents_16", "latents_32", "caption_latents"):
            assert np.array_equal(a[k][col], b[k][col])
    assert Manifest.read(ray_out).samples == 60
