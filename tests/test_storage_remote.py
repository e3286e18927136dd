"""Latent sets in object storage: precompute to s3:// on a loopback S3 server (moto), killed and rerun;
training from s3:// with a cache smaller than the set equals training from the same shards on disk."""
import json
import os
import sys
from collections import Counter
from pathlib import Path

import boto3
import pytest

from conftest import s3_keys
from dataprep.precompute import PrecomputeConfig, precompute
from dataprep.units import finished_units
from microdit.cli import UserError
from microdit.manifest import Manifest
from test_dataprep_precompute import REPO, converted_rows, kill9_after_units, shapes_converted


def download_prefix(url: str, dest: Path) -> Path:
    """Every object under `url` copied to `dest` (boto3 directly: not the code under test)."""
    bucket, _, prefix = url[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for key in s3_keys(f"s3://{bucket}", prefix):
        target = dest / key[len(prefix):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
    return dest


def _cli(conv, out, staging):
    return [sys.executable, "-m", "dataprep.precompute", "--input", str(conv), "--out", out, "--staging",
            str(staging), "--resolutions", "16", "--image-autoencoder", "tiny-kl", "--text-encoder", "tiny-clip:16",
            "--engine", "local", "--unit-samples", "20", "--batch-size", "10", "--threads", "1"]


def test_precompute_to_s3_killed_and_rerun_has_every_sample_once(tmp_path, s3_bucket):
    from streaming import LocalDataset
    n, units = 240, 12
    conv = shapes_converted(tmp_path, n)
    url, staging = f"{s3_bucket}/latents/shapes", tmp_path / "stage"
    first_log = kill9_after_units(_cli(conv, url, staging), url, 3, timeout=180, poll=0.2)
    before = finished_units(url)
    assert 3 <= len(before) < units, "the run was not killed mid-way"
    with pytest.raises(FileNotFoundError):
        Manifest.read(url)                                      # unfinished: no manifest in the bucket

    cfg = PrecomputeConfig(str(conv), url, resolutions=(16,), image_autoencoder="tiny-kl",
                           text_encoder="tiny-clip:16", engine="local", unit_samples=20, batch_size=10, threads=1,
                           progress=False, staging=str(staging))
    assert precompute(cfg) == url
    after = finished_units(url)
    assert len(after) == units
    for name, info in before.items():                           # finished units were not redone
        assert after[name]["finished_at"] == info["finished_at"]

    # what is in the bucket: every shard object belongs to the merged index, every sample exactly once
    local = download_prefix(url, tmp_path / "copy")
    index = json.loads((local / "index.json").read_text())
    listed = {s["raw_data"]["basename"] for s in index["shards"]}
    stored = {str(p.relative_to(local)) for p in local.rglob("*.mds")}
    assert stored == listed
    ds = LocalDataset(local=str(local))
    ids = [ds[i]["sample_id"] for i in range(len(ds))]
    assert Counter(ids) == Counter(r["sample_id"] for r in converted_rows(conv))

    m = Manifest.read(url)
    assert m.samples == n and m.config["out"] == url and m.metrics["units_this_run"] == units - len(before)
    assert m.bytes == sum(s["raw_data"]["bytes"] for s in index["shards"])
    assert (staging / "manifest.json").exists() and not list(staging.glob(".tmp-*"))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in first_log and secret not in json.dumps(m.to_dict())
    assert precompute(cfg) == url and Manifest.read(url).created_at == m.created_at   # finished: nothing to do
    from flows import ledger
    rec = ledger.ingest([url], profile="local", run_id="r", step="precompute", db=tmp_path / "ledger.duckdb")
    assert rec[0].path == url and rec[0].new                    # the ledger records where the set lives


def test_unknown_scheme_and_missing_bucket_say_what_to_do(tmp_path, s3_bucket):
    conv = shapes_converted(tmp_path, 10)
    with pytest.raises(UserError, match="cannot write to nope://"):
        precompute(PrecomputeConfig(str(conv), "nope://x/y", engine="local", progress=False))
    with pytest.raises(UserError, match="S3_ENDPOINT_URL"):
        precompute(PrecomputeConfig(str(conv), "s3://no-such-bucket-here/x", resolutions=(16,),
                                    image_autoencoder="pixel:2", text_encoder="tiny-clip:16", engine="local",
                                    progress=False, staging=str(tmp_path / "st")))


def upload_folder(folder: Path, url: str) -> str:
    """Every file of a local set copied to `url` (boto3 directly: not the code under test)."""
    bucket, _, prefix = url[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and "_converted" not in f.parts:
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder)}")
    return url


def test_training_from_s3_with_a_small_cache_equals_training_from_disk(tmp_path, s3_bucket):
    from microdit.training.loop import train
    from microdit.training.config import TrainConfig
    conv = shapes_converted(tmp_path, 96)
    local = precompute(PrecomputeConfig(str(conv), str(tmp_path / "lat"), resolutions=(16,),
                                        image_autoencoder="pixel:2", text_encoder="tiny-clip:16", engine="local",
                                        unit_samples=48, batch_size=48, shard_size_limit=1 << 14, progress=False))
    index = json.loads((local / "index.json").read_text())
    set_bytes = sum(s["raw_data"]["bytes"] for s in index["shards"])
    limit = 6 * max(s["raw_data"]["bytes"] for s in index["shards"]) + len(json.dumps(index))
    assert len(index["shards"]) >= 12 and limit < set_bytes / 2          # the cache holds under half the set
    url = upload_folder(local, f"{s3_bucket}/sets/shapes16")
    base = TrainConfig(name="t", data=[str(local)], resolution=16, steps=14, batch_size=8, lr=2e-3,
                       mask_ratio=0.5, checkpoint_every=0, num_samples=0, progress=False, seed=3)
    train(base.replace(out_dir=str(tmp_path / "disk")))
    train(base.replace(data=[url], out_dir=str(tmp_path / "s3"), cache_limit=str(limit)))

    def losses(run):
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(x)]
    assert len(losses("disk")) == 14 and losses("s3") == losses("disk")
    cached = [f for f in (tmp_path / "s3" / "cache").rglob("*.mds")]
    biggest = max(s["raw_data"]["bytes"] for s in index["shards"])
    # shards were evicted: the cache never held the set (downloads ahead may land a shard or two past the limit)
    assert 0 < len(cached) < len(index["shards"]) and sum(f.stat().st_size for f in cached) <= limit + 2 * biggest
