"""convert on Ray Data: units in parallel, kill -9 and rerun, cross-unit duplicates, counts by reason."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataprep.convert import UNITS_DIR, ConvertConfig, convert
from dataprep.readers import iter_records, iter_unit_records, plan_record_units
from microdit.cli import UserError
from microdit.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


def noise_jpeg(w, h, seed):
    buf = io.BytesIO()
    Image.effect_noise((w, h), 40 + seed % 50).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def raw_files(root: Path, n: int, size: int = 160) -> Path:
    """A files-layout raw set of n samples; every 7th is broken in some way, some keys repeat across units."""
    for i in range(n):
        d = root / f"{i // 50:05d}"
        d.mkdir(parents=True, exist_ok=True)
        stem = d / f"{i:06d}"
        kind = i % 7
        image = noise_jpeg(size + i % 5, size, i) if kind != 1 else b"\xff\xd8 not a jpeg"
        if kind == 2:
            image = noise_jpeg(20, 20, i)                                  # too small
        stem.with_suffix(".jpg").write_bytes(image)
        if kind != 3:                                                      # kind 3: no caption file
            stem.with_suffix(".txt").write_bytes(b"caf\xe9" if kind == 4 else f"sample {i}".encode())
        if i % 11 == 5:                                                    # the same id as sample 0 (other units)
            (stem.with_suffix(".json")).write_text(json.dumps({"key": "000000"}))
    return root


def rows_of(out: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))]).to_pylist()


def test_units_cover_every_record_once_in_order(tmp_path):
    raw = raw_files(tmp_path / "raw", 23, size=40)
    units = plan_record_units(raw, per_unit=5)
    assert [u.name for u in units] == ["00000", "00001", "00002", "00003", "00004"]
    assert [r.where for u in units for r in iter_unit_records(u)] == [r.where for r in iter_records(raw)]
    rows = [{"path": f"{i}.png", "caption": f"c{i}"} for i in range(23)]
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=4)   # units cut across row groups
    units = plan_record_units(table, per_unit=6)
    assert [r.where for u in units for r in iter_unit_records(u)] == [f"{table}:{i}" for i in range(23)]


def test_local_engine_counts_and_cross_unit_duplicates(tmp_path):
    raw = raw_files(tmp_path / "raw", 40, size=40)
    one = convert(ConvertConfig(str(raw), str(tmp_path / "one"), source="s", min_size=32, short_side=36,
                                shard_samples=1000, engine="local"), progress=False)
    many = convert(ConvertConfig(str(raw), str(tmp_path / "many"), source="s", min_size=32, short_side=36,
                                 shard_samples=6, engine="local"), progress=False)
    m1, m7 = Manifest.read(one), Manifest.read(many)
    assert m7.metrics["units"] == 7 and m1.metrics["units"] == 1
    assert m7.skipped == m1.skipped and m7.samples == m1.samples                # same as one serial pass
    assert m1.skipped["duplicate_id"] == 4 and set(m1.skipped) == {
        "image_corrupt", "image_too_small", "caption_missing", "caption_not_utf8", "duplicate_id"}
    assert [r["sample_id"] for r in rows_of(many)] == [r["sample_id"] for r in rows_of(one)]
    assert len({r["sample_id"] for r in rows_of(many)}) == m7.samples


def test_bad_settings_are_user_errors(tmp_path):
    for bad in ({"min_size": -5}, {"short_side": 0}, {"shard_samples": 0}, {"workers": 0}):
        with pytest.raises(UserError, match="give"):
            convert(ConvertConfig(str(tmp_path), str(tmp_path / "o"), **bad))


def _cli(raw, out, workers=2):
    return [sys.executable, "-m", "dataprep.convert", "--input", str(raw), "--out", str(out), "--source", "s",
            "--min-size", "32", "--short-side", "96", "--shard-samples", "8", "--workers", str(workers),
            "--num-cpus", "2"]


@pytest.mark.slow
def test_ray_convert_killed_with_sigkill_then_rerun_keeps_every_sample_once(tmp_path):
    raw = raw_files(tmp_path / "raw", 160)                               # 20 units of 8 records
    clean = convert(ConvertConfig(str(raw), str(tmp_path / "clean"), source="s", min_size=32, short_side=96,
                                  shard_samples=8, engine="local"), progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": "/tmp", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(_cli(raw, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(list((out / UNITS_DIR).glob("0*.json"))) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                              # the driver and its Ray processes
        proc.wait()
    before = None
    while before != (before := {p.name: p.read_text() for p in (out / UNITS_DIR).glob("0*.json")}):
        time.sleep(2)                                                    # Ray workers die with their raylet
    assert 3 <= len(before) < 20, f"the run was not killed part-way ({len(before)} of 20 units)"
    assert not (out / "manifest.json").exists()
    r = subprocess.run(_cli(raw, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m, ref = Manifest.read(out), Manifest.read(clean)
    assert m.metrics["units_this_run"] == 20 - len(before)                # only the unfinished units
    assert all((out / UNITS_DIR / name).read_text() == text for name, text in before.items())   # not redone
    ids = [r["sample_id"] for r in rows_of(out)]
    assert sorted(ids) == sorted(r["sample_id"] for r in rows_of(clean)) and len(ids) == len(set(ids))
    assert m.samples == ref.samples and m.skipped == ref.skipped           # counts by reason as a clean run
    assert rows_of(out) == rows_of(clean)                                  # same rows, same order, same bytes
    assert not list(out.rglob("*.tmp-*"))


def test_input_that_changed_under_an_interrupted_run_starts_over(tmp_path):
    raw = raw_files(tmp_path / "raw", 20, size=40)
    cfg = ConvertConfig(str(raw), str(tmp_path / "out"), source="s", min_size=32, short_side=36, shard_samples=6,
                        engine="local")
    out = convert(cfg, progress=False)
    (out / "manifest.json").unlink()                                     # as if killed before the end
    (out / UNITS_DIR / "00003.json").unlink()
    for i in (900, 901):                                                 # new samples sort before the last unit
        (raw / "00000" / f"000{i}.jpg").write_bytes(noise_jpeg(40, 40, i))
        (raw / "00000" / f"000{i}.txt").write_text(f"new {i}")
    m = Manifest.read(convert(cfg, progress=False))
    assert m.metrics["units_this_run"] == 4                              # the plan moved: every unit redone
    ids = [r["sample_id"] for r in rows_of(out)]
    assert {"s/000900", "s/000901"} <= set(ids) and len(ids) == len(set(ids)) == m.samples
