"""Cost ledger: idempotent ingest, racing writers, a crash between two steps, totals = sum of rows.

    .venv/bin/python -m pytest tests/test_ledger.py -q
"""
import json
import math
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flows import ledger
from flows.prices import PriceList, load_prices
from microdit.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent


def _pipeline(tmp: Path) -> dict:
    """Manifests of a small pipeline: raw -> latents -> two stages -> evaluation."""
    specs = {
        "download": Manifest(kind="raw", name="shapes-raw", config={"n": 100}, samples=100, bytes=3_000_000,
                             wall_seconds=5.0, cpu_seconds=7.5),
        "precompute": Manifest(kind="latents", name="shapes-latents", config={"ae": "pixel:2"},
                               parents=[str(tmp / "download")], samples=98, skipped={"too_small": 2},
                               bytes=1_500_000, wall_seconds=4.0, cpu_seconds=6.0),
        "train:stage1": Manifest(kind="checkpoint", name="stage1", config={"steps": 100},
                                 parents=[str(tmp / "precompute")], samples=6400, bytes=12_000_000,
                                 wall_seconds=300.0, cpu_seconds=100.0, gpu_seconds=2400.0,
                                 gpu_type="H100-80GB", num_gpus=8),
        "train:stage2": Manifest(kind="checkpoint", name="stage2", config={"steps": 10},
                                 parents=[str(tmp / "train:stage1")], samples=640, bytes=12_000_000,
                                 wall_seconds=60.0, cpu_seconds=20.0, gpu_seconds=480.0,
                                 gpu_type="H100-80GB", num_gpus=8),
        "evaluate": Manifest(kind="evaluation", name="eval", config={"suites": ["shapes"]},
                             parents=[str(tmp / "train:stage2")], samples=24, bytes=200_000,
                             wall_seconds=10.0, cpu_seconds=15.0),
    }
    for step, m in specs.items():
        m.write(tmp / step)
    return specs


def _ingest_all(db, tmp, specs, profile="paper", run="r1"):
    for step in specs:
        ledger.ingest(tmp / step, profile=profile, run_id=run, step=step, db=db)


def _count(db) -> int:
    with ledger.connect(db, read_only=True) as con:
        return con.execute("SELECT count(*) FROM assets JOIN costs USING (asset_id)").fetchone()[0]


def _check_sums(rep: ledger.Report):
    for col in ("wall_s", "cpu_s", "gpu_hours", "cpu_usd", "gpu_usd", "storage_usd", "total_usd"):
        assert math.isclose(sum(r[col] or 0 for r in rep.rows), rep.total[col] or 0, rel_tol=1e-9, abs_tol=1e-12)
    assert sum(r["assets"] for r in rep.rows) == rep.total["assets"]
    parts = rep.total["cpu_usd"] + rep.total["gpu_usd"] + rep.total["storage_usd"]
    assert math.isclose(parts, rep.total["total_usd"], rel_tol=1e-9)


def test_ingest_is_idempotent_and_rows_add_up(tmp_path):
    specs, db = _pipeline(tmp_path), tmp_path / "ledger.duckdb"
    _ingest_all(db, tmp_path, specs)
    first = ledger.report(run_id="r1", db=db)
    again = ledger.ingest([tmp_path / s for s in specs], profile="paper", run_id="r1", db=db)
    assert not any(x.new for x in again)
    rep = ledger.report(run_id="r1", profile="paper", db=db)
    assert rep.total == first.total and _count(db) == len(specs)
    _check_sums(rep)
    # dollars follow the price list: 2880 H100-seconds + CPU of the CPU-only steps + storage
    p = load_prices()
    cpu_s = sum(m.cpu_seconds for m in specs.values() if not m.gpu_seconds)
    want = 2880 / 3600 * p.gpu_price("H100-80GB") + cpu_s / 3600 * p.cpu_usd_per_core_hour \
        + sum(m.bytes for m in specs.values()) / 1e9 * p.storage_usd_per_gb_month * p.storage_months
    assert math.isclose(rep.total["total_usd"], want, rel_tol=1e-9)
    assert math.isclose(rep.total["gpu_hours"], 0.8)
    # lineage: each asset points at the ledger id of its parent
    with ledger.connect(db, read_only=True) as con:
        got = dict(con.execute("SELECT step, parent_ids FROM assets").fetchall())
        ids = dict(con.execute("SELECT step, asset_id FROM assets").fetchall())
    assert got["train:stage2"] == [ids["train:stage1"]] and got["download"] == []
    # projection from measured throughput: stage1 6400 samples / 2400 GPU-s, 250K steps x 2048
    proj = rep.projection
    assert proj["missing"] == ["stage3", "stage4"]
    hours1 = 2400 / 6400 * 250_000 * 2048 / 3600
    assert math.isclose(proj["stages"]["stage1"]["gpu_hours"], hours1)
    assert "vs paper $1,890" in ledger.format_report(rep)
    # a re-made asset (same path, new config) is a new cost; the other run is filtered out by --run
    Manifest(kind="raw", name="shapes-raw", config={"n": 200}, samples=200, cpu_seconds=9.0).write(
        tmp_path / "download")
    assert ledger.ingest(tmp_path / "download", profile="paper", run_id="r2", db=db)[0].new
    assert ledger.report(run_id="r1", db=db).total == first.total
    _check_sums(ledger.report(db=db))


def _race_worker(db, tmp, steps, hold):
    if hold:  # a writer that keeps the file locked for a while: the other must wait, not fail
        with ledger.connect(db) as con:
            con.execute("SELECT 1")
            time.sleep(hold)
    for step in steps:
        ledger.ingest(Path(tmp) / step, profile="paper", run_id="r1", step=step, db=db)


def test_two_ingests_racing_for_the_lock(tmp_path):
    specs, db = _pipeline(tmp_path), tmp_path / "ledger.duckdb"
    steps = list(specs)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_race_worker, args=(db, tmp_path, steps, 1.0)),
             ctx.Process(target=_race_worker, args=(db, tmp_path, steps[::-1], 0.0))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _count(db) == len(specs)
    _check_sums(ledger.report(run_id="r1", db=db))
    # the race is real: while one process holds the file, a plain connect from another process fails
    with ledger.connect(db):
        r = subprocess.run([sys.executable, "-c", f"import duckdb; duckdb.connect({str(db)!r})"],
                           capture_output=True, text=True)
    assert r.returncode != 0 and "lock" in r.stderr.lower()


CRASH = """
import os, sys
from flows import ledger
db, tmp = sys.argv[1], sys.argv[2]
ledger.ingest(tmp + "/download", profile="paper", run_id="r1", step="download", db=db)
os._exit(9)  # killed between two steps: precompute is never recorded
"""


def test_crash_between_two_steps_and_inside_one(tmp_path):
    specs, db = _pipeline(tmp_path), tmp_path / "ledger.duckdb"
    r = subprocess.run([sys.executable, "-c", CRASH, str(db), str(tmp_path)], cwd=ROOT)
    assert r.returncode == 9 and _count(db) == 1                      # the committed step survived
    # a step that fails half-way through its transaction leaves nothing of itself behind
    bad = PriceList(gpu_usd_per_hour={"A100-80GB": 1.8})             # no price for H100, no default
    with pytest.raises(KeyError, match="H100-80GB"):
        ledger.ingest([tmp_path / "precompute", tmp_path / "train:stage1"], profile="paper", run_id="r1",
                      db=db, prices=bad)
    assert _count(db) == 1
    _ingest_all(db, tmp_path, specs)                                   # the re-run completes the rest
    assert _count(db) == len(specs)
    _check_sums(ledger.report(run_id="r1", db=db))


def test_cli_report_json_and_sql(tmp_path):
    specs, db = _pipeline(tmp_path), tmp_path / "ledger.duckdb"
    _ingest_all(db, tmp_path, specs, profile="local", run="local")
    out = subprocess.run([sys.executable, "-m", "flows.ledger", "report", "--db", str(db), "--run", "local",
                          "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["projection"] is None and len(d["rows"]) == len(specs)
    assert math.isclose(sum(r["total_usd"] for r in d["rows"]), d["total"]["total_usd"], rel_tol=1e-9)
    # the documented SQL, run as-is in plain DuckDB, gives the same total
    with duckdb.connect(str(db), read_only=True) as con:
        total = con.execute(ledger.TOTAL_SQL, ["local", None]).fetchone()[7]
    assert math.isclose(total, d["total"]["total_usd"], rel_tol=1e-12)


def test_resumed_stage_records_increments_not_totals(tmp_path):
    """A stage stopped early, then resumed to the end: its manifests carry running totals (the trainer
    accumulates over resumes); the ledger must hold each stage's cost exactly once."""
    db, out = tmp_path / "ledger.duckdb", str(tmp_path / "train" / "stage1-abc")
    cfg = {"name": "stage1", "out_dir": out, "steps": 100}
    Manifest(kind="checkpoint", name="stage1", config=cfg, samples=640, wall_seconds=10.0, cpu_seconds=18.0,
             metrics={"stopped_early": True}).write(tmp_path / "train" / "stage1-abc" / "checkpoints" / "step-10")
    Manifest(kind="checkpoint", name="stage1", config=cfg, samples=6400, wall_seconds=25.0, cpu_seconds=45.0,
             bytes=1000).write(tmp_path / "train" / "stage1-abc" / "final")
    for f in ("checkpoints/step-10", "final", "final"):
        ledger.ingest(Path(out) / f, profile="local", run_id="r", step="train:stage1", db=db)
    rep = ledger.report(run_id="r", db=db)
    (row,) = rep.rows
    assert row["assets"] == 2 and row["samples"] == 6400
    assert math.isclose(row["wall_s"], 25.0) and math.isclose(row["cpu_s"], 45.0)
    assert math.isclose(ledger.spent_usd(run_id="r", db=db, exclude_lineage=out), 0.0)
    assert math.isclose(ledger.spent_usd(run_id="r", db=db), rep.total["total_usd"])


def test_documented_queries_run_as_pasted(tmp_path):
    """Every SQL block in docs/orchestration.md runs as written against a filled ledger (no $1/$2
    placeholders), and the views agree with the report."""
    import re
    db = tmp_path / "ledger.duckdb"
    specs = _pipeline(tmp_path)
    _ingest_all(db, tmp_path, specs, profile="local", run="local")
    doc = (ROOT / "docs" / "orchestration.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", doc, flags=re.S)
    statements = [s.strip() for b in blocks for s in b.split(";") if s.strip() and not
                  all(ln.strip().startswith("--") for ln in s.strip().splitlines())]
    assert len(statements) >= 4
    con = duckdb.connect(str(db), read_only=True)
    try:
        results = [con.execute(s).fetchall() for s in statements]
        step_rows = con.execute("SELECT step, total_usd FROM step_costs WHERE run_id = 'local'").fetchall()
        run_total = con.execute("SELECT total_usd FROM run_costs WHERE run_id = 'local'").fetchone()[0]
    finally:
        con.close()
    assert all(results), "a documented query returned no rows on a filled ledger"
    rep = ledger.report(run_id="local", db=db)
    assert {r["step"]: r["total_usd"] for r in rep.rows} == pytest.approx(dict(step_rows))
    assert run_total == pytest.approx(rep.total["total_usd"])
