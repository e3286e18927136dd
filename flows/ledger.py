"""Cost ledger in DuckDB: every asset the pipeline made, its lineage, and what it cost.

    python -m flows.ledger report [--db runs/ledger.duckdb] [--run local] [--profile paper] [--json]
    python -m flows.ledger ingest FOLDER [FOLDER ...] --profile local --run local --step precompute
    python -m flows.ledger sql                  # the SQL behind the report, to run in the duckdb CLI

Facts come from the `manifest.json` each step writes (microdit.manifest.Manifest). One writer (the flow)
ingests them, one transaction per step, with a short connect-write-close (DuckDB allows one read-write
process per file; a busy lock is retried). An asset is keyed by (path, config hash), so ingesting the same
manifests again, or after a crash between two steps, never counts anything twice and loses nothing that
was committed. Dollars are priced at ingest from infra/prices.toml and stored with the price list's id.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from microdit.cli import UserError, one_line, run_cli
from microdit.manifest import Manifest
from microdit.storage import location

from .prices import PriceList, load_prices

DEFAULT_DB = Path(os.environ.get("MICRO_BUDGET_LEDGER", "runs/ledger.duckdb"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    asset_id     VARCHAR PRIMARY KEY,   -- sha256(path | config_hash)[:16]: the idempotency key
    kind         VARCHAR NOT NULL,      -- raw | latents | checkpoint | evaluation
    name         VARCHAR NOT NULL,      -- manifest name, e.g. 'shapes-latents', 'stage1'
    step         VARCHAR NOT NULL,      -- pipeline step that made it: download, precompute, train:stage1, evaluate
    profile      VARCHAR NOT NULL,      -- local | subset | paper | ...
    run_id       VARCHAR NOT NULL,      -- pipeline run (its output folder name); stable across resumes
    flow_run_id  VARCHAR,               -- the Prefect flow run that ingested it
    path         VARCHAR NOT NULL,      -- absolute folder of the asset
    lineage      VARCHAR NOT NULL,      -- what it continues: a training stage's out_dir (resumes), else path
    config_hash  VARCHAR NOT NULL,
    parents      VARCHAR[],             -- input folders, as in the manifest
    parent_ids   VARCHAR[],             -- asset_ids of the inputs already in the ledger
    samples      BIGINT,                -- samples written / trained on / evaluated
    skipped      VARCHAR,               -- JSON {reason: count}
    bytes        BIGINT,
    metrics      VARCHAR,               -- JSON of the manifest's metrics
    created_at   TIMESTAMP,             -- when the step finished (manifest)
    ingested_at  TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS costs (
    asset_id     VARCHAR PRIMARY KEY,   -- one cost row per asset (same key as assets)
    wall_seconds DOUBLE, cpu_seconds DOUBLE, gpu_seconds DOUBLE,   -- this asset's own share (see ingest)
    gpu_type     VARCHAR, num_gpus INTEGER,
    cpu_usd DOUBLE, gpu_usd DOUBLE, storage_usd DOUBLE,
    total_usd    DOUBLE,                -- cpu_usd + gpu_usd + storage_usd
    price_list   VARCHAR                -- id of the price list used (prices table)
);
CREATE TABLE IF NOT EXISTS prices (
    price_list VARCHAR, resource VARCHAR, usd DOUBLE, unit VARCHAR, source VARCHAR,
    PRIMARY KEY (price_list, resource)
);
""" + """
-- Views for the common reports (named columns; the queries in docs/orchestration.md run as pasted).
CREATE OR REPLACE VIEW asset_costs AS          -- one row per asset with its cost
SELECT a.run_id, a.profile, a.step, a.kind, a.name, a.path, a.lineage, a.parent_ids, a.samples, a.bytes,
       a.created_at, c.wall_seconds AS wall_s, c.cpu_seconds AS cpu_s, c.gpu_seconds / 3600 AS gpu_hours,
       c.gpu_type, c.num_gpus, c.cpu_usd, c.gpu_usd, c.storage_usd, c.total_usd, c.price_list, a.asset_id
FROM assets a JOIN costs c USING (asset_id);
CREATE OR REPLACE VIEW step_costs AS           -- per run and step: what the report's rows show
SELECT run_id, profile, step, any_value(kind) AS kind, count(*) AS assets, sum(samples) AS samples,
       sum(bytes) AS bytes, sum(wall_s) AS wall_s, sum(cpu_s) AS cpu_s, sum(gpu_hours) AS gpu_hours,
       sum(cpu_usd) AS cpu_usd, sum(gpu_usd) AS gpu_usd, sum(storage_usd) AS storage_usd,
       sum(total_usd) AS total_usd, 1000 * sum(total_usd) / nullif(sum(samples), 0) AS usd_per_1k_samples,
       min(created_at) AS started
FROM asset_costs GROUP BY run_id, profile, step;
CREATE OR REPLACE VIEW run_costs AS            -- per run: the report's total line
SELECT run_id, profile, count(*) AS assets, sum(wall_s) AS wall_s, sum(cpu_s) AS cpu_s,
       sum(gpu_hours) AS gpu_hours, sum(cpu_usd) AS cpu_usd, sum(gpu_usd) AS gpu_usd,
       sum(storage_usd) AS storage_usd, sum(total_usd) AS total_usd,
       sum(samples) FILTER (WHERE kind = 'checkpoint') AS trained_samples,
       1000 * sum(total_usd) / nullif(sum(samples) FILTER (WHERE kind = 'checkpoint'), 0)
           AS usd_per_1k_trained_samples
FROM asset_costs GROUP BY run_id, profile;
"""

# The report's queries (docs/orchestration.md shows them; `python -m flows.ledger sql` prints them).
# $1 = run_id or NULL, $2 = profile or NULL.
ROWS_SQL = """
SELECT a.step, any_value(a.kind) AS kind, count(*) AS assets, sum(a.samples) AS samples,
       sum(a.bytes) AS bytes, sum(c.wall_seconds) AS wall_s, sum(c.cpu_seconds) AS cpu_s,
       sum(c.gpu_seconds) / 3600 AS gpu_hours, sum(c.cpu_usd) AS cpu_usd, sum(c.gpu_usd) AS gpu_usd,
       sum(c.storage_usd) AS storage_usd, sum(c.total_usd) AS total_usd,
       1000 * sum(c.total_usd) / nullif(sum(a.samples), 0) AS usd_per_1k_samples
FROM assets a JOIN costs c USING (asset_id)
WHERE ($1 IS NULL OR a.run_id = $1) AND ($2 IS NULL OR a.profile = $2)
GROUP BY a.step ORDER BY min(a.created_at), a.step
"""
TOTAL_SQL = """
SELECT count(*) AS assets, sum(c.wall_seconds) AS wall_s, sum(c.cpu_seconds) AS cpu_s,
       sum(c.gpu_seconds) / 3600 AS gpu_hours, sum(c.cpu_usd) AS cpu_usd, sum(c.gpu_usd) AS gpu_usd,
       sum(c.storage_usd) AS storage_usd, sum(c.total_usd) AS total_usd,
       sum(a.samples) FILTER (WHERE a.kind = 'checkpoint') AS trained_samples,
       1000 * sum(c.total_usd) / nullif(sum(a.samples) FILTER (WHERE a.kind = 'checkpoint'), 0)
           AS usd_per_1k_trained_samples
FROM assets a JOIN costs c USING (asset_id)
WHERE ($1 IS NULL OR a.run_id = $1) AND ($2 IS NULL OR a.profile = $2)
"""
GPU_SQL = """
SELECT c.gpu_type, sum(c.gpu_seconds) / 3600 AS gpu_hours, sum(c.gpu_usd) AS gpu_usd
FROM assets a JOIN costs c USING (asset_id)
WHERE c.gpu_seconds > 0 AND ($1 IS NULL OR a.run_id = $1) AND ($2 IS NULL OR a.profile = $2)
GROUP BY c.gpu_type ORDER BY gpu_hours DESC
"""
TRAIN_SQL = """
SELECT a.name, a.samples, c.gpu_seconds, c.gpu_type, c.wall_seconds, c.num_gpus
FROM assets a JOIN costs c USING (asset_id)
WHERE a.kind = 'checkpoint' AND ($1 IS NULL OR a.run_id = $1) AND ($2 IS NULL OR a.profile = $2)
ORDER BY a.created_at
"""


# ----------------------------------------------------------------------------------------------------
# Connections: short, exclusive, retried while another process holds the file lock
# ----------------------------------------------------------------------------------------------------

@contextmanager
def connect(db: str | os.PathLike = DEFAULT_DB, read_only: bool = False, timeout: float = 60.0):
    """A DuckDB connection that waits (with jittered back-off) while another process holds the lock."""
    db = Path(db)
    if read_only and not db.exists():
        raise FileNotFoundError(f"ledger {db} does not exist yet: run a flow (or `python -m flows.ledger "
                                "ingest`) first, or pass --db")
    db.parent.mkdir(parents=True, exist_ok=True)
    deadline, delay = time.monotonic() + timeout, 0.05
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only)
            break
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():
                raise UserError(f"the ledger {db} cannot be opened as a DuckDB database ({one_line(e)}): it is "
                                "corrupt or another kind of file; move it aside and re-record the run folders "
                                "(`python -m flows.ledger ingest FOLDER ...`), or pass --db") from None
            if time.monotonic() > deadline:
                raise UserError(f"could not open the ledger {db}: another process holds its lock ({one_line(e)}); "
                                "the flow is the only writer, so wait for it or use a copy") from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    try:
        if not read_only:
            con.execute(SCHEMA)
        yield con
    finally:
        con.close()


def asset_id(path: str | os.PathLike, config_hash: str) -> str:
    key = f"{location(path)}|{config_hash}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Ingest
# ----------------------------------------------------------------------------------------------------

@dataclass
class Ingested:
    asset_id: str
    path: str
    step: str
    new: bool                 # False: already in the ledger (same path + config hash), not counted again
    total_usd: float


def ingest(folders, *, profile: str, run_id: str, step: str | None = None, db=DEFAULT_DB,
           prices: PriceList | None = None, flow_run_id: str | None = None) -> list[Ingested]:
    """Record the finished assets in `folders` (each with manifest.json) in ONE transaction."""
    folders = [location(f) for f in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
    manifests = [Manifest.read(f) for f in folders]        # raises naming the folder if a step is unfinished
    prices = prices or load_prices()
    out = []
    with connect(db) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            con.executemany("INSERT OR IGNORE INTO prices VALUES (?, ?, ?, ?, ?)",
                            [(prices.id, r, usd, unit, prices.source) for r, usd, unit in prices.rows()])
            for folder, m in zip(folders, manifests):
                out.append(_ingest_one(con, folder, m, profile, run_id, step, prices, flow_run_id))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return out


def _ingest_one(con, folder: Path, m: Manifest, profile, run_id, step, prices, flow_run_id) -> Ingested:
    aid = asset_id(folder, m.config_hash)
    step = step or f"{m.kind}:{m.name}"
    row = con.execute("SELECT c.total_usd FROM costs c WHERE asset_id = ?", [aid]).fetchone()
    if row is not None:
        return Ingested(aid, str(folder), step, False, row[0])
    # A training stage's manifests carry totals accumulated over its resumes (an early-stopped checkpoint,
    # then the final one): record only the increment over what the same stage (lineage) already recorded.
    lineage = str(Path(m.config["out_dir"]).resolve()) if m.kind == "checkpoint" and m.config.get("out_dir") \
        else str(folder)
    prior = con.execute("SELECT coalesce(sum(c.wall_seconds), 0), coalesce(sum(c.cpu_seconds), 0), "
                        "coalesce(sum(c.gpu_seconds), 0), coalesce(sum(a.samples), 0) FROM assets a "
                        "JOIN costs c USING (asset_id) WHERE a.lineage = ? AND a.kind = 'checkpoint'",
                        [lineage]).fetchone() if m.kind == "checkpoint" else (0, 0, 0, 0)
    wall, cpu, gpu = (max(0.0, x - p) for x, p in zip((m.wall_seconds, m.cpu_seconds, m.gpu_seconds), prior))
    samples = max(0, int(m.samples) - int(prior[3]))
    parents = [str(p) if str(p).startswith(("http:", "https:", "hf:")) else location(p) for p in m.parents]
    parent_ids = [r[0] for r in con.execute(
        "SELECT asset_id FROM assets WHERE list_contains(?, path) ORDER BY created_at", [parents]).fetchall()]
    usd = prices.price(cpu_seconds=cpu, gpu_seconds=gpu, gpu_type=m.gpu_type, bytes=m.bytes)
    con.execute("INSERT INTO assets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "to_timestamp(?)::TIMESTAMP, current_timestamp)",
                [aid, m.kind, m.name, step, profile, run_id, flow_run_id, str(folder), lineage, m.config_hash,
                 parents, parent_ids, samples, json.dumps(m.skipped), int(m.bytes),
                 json.dumps(m.metrics, default=str), float(m.created_at)])
    con.execute("INSERT INTO costs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [aid, wall, cpu, gpu, m.gpu_type, m.num_gpus,
                 usd["cpu_usd"], usd["gpu_usd"], usd["storage_usd"], usd["total_usd"], prices.id])
    return Ingested(aid, str(folder), step, True, usd["total_usd"])


def spent_usd(*, run_id: str | None = None, profile: str | None = None, db=DEFAULT_DB,
              exclude_lineage: str | None = None) -> float:
    """Dollars recorded so far (for the budget guard), optionally leaving out one training stage's lineage
    (its running total is measured live by the trainer)."""
    if not Path(db).exists():
        return 0.0
    lin = str(Path(exclude_lineage).resolve()) if exclude_lineage else None
    with connect(db, read_only=True) as con:
        return float(con.execute(
            "SELECT coalesce(sum(c.total_usd), 0) FROM assets a JOIN costs c USING (asset_id) "
            "WHERE ($1 IS NULL OR a.run_id = $1) AND ($2 IS NULL OR a.profile = $2) "
            "AND ($3 IS NULL OR a.lineage <> $3)", [run_id, profile, lin]).fetchone()[0])


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[dict]                      # one per step (ROWS_SQL)
    total: dict                           # TOTAL_SQL: the same rows summed
    gpus: list[dict] = field(default_factory=list)        # GPU-hours and dollars by GPU type
    projection: dict | None = None        # full-recipe projection (paper profile)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "total": self.total, "gpus": self.gpus, "projection": self.projection}


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def report(*, run_id: str | None = None, profile: str | None = None, db=DEFAULT_DB,
           prices: PriceList | None = None, project: bool | None = None) -> Report:
    with connect(db, read_only=True) as con:
        rows = _dicts(con.execute(ROWS_SQL, [run_id, profile]))
        total = _dicts(con.execute(TOTAL_SQL, [run_id, profile]))[0]
        gpus = _dicts(con.execute(GPU_SQL, [run_id, profile]))
        train = _dicts(con.execute(TRAIN_SQL, [run_id, profile]))
    rep = Report(rows, total, gpus)
    if project or (project is None and profile == "paper"):
        rep.projection = project_full_recipe(train, prices or load_prices())
    return rep


def project_full_recipe(train_rows: list[dict], prices: PriceList) -> dict:
    """Projected cost of the paper's full recipe from the measured per-stage training throughput.

    GPU-seconds per sample of each measured stage x (recipe steps x batch) x $ per GPU-hour of its GPU; the
    steps and batch are the paper recipe's own (microdit.training.config.PAPER_STAGES).
    """
    from microdit.training.config import PAPER_STAGES
    stages, missing = {}, []
    for recipe_stage in PAPER_STAGES:
        stage = recipe_stage.name
        measured = [r for r in train_rows if stage in r["name"] and r["gpu_seconds"] and r["samples"]]
        if not measured:
            missing.append(stage)
            continue
        gpu_s = sum(r["gpu_seconds"] for r in measured)
        samples = sum(r["samples"] for r in measured)
        gpu_type = measured[-1]["gpu_type"]
        full = recipe_stage.steps * recipe_stage.batch_size
        hours = gpu_s / samples * full / 3600
        stages[stage] = {"gpu_type": gpu_type, "measured_samples": samples,
                         "samples_per_gpu_second": samples / gpu_s, "recipe_samples": full,
                         "gpu_hours": hours, "usd": hours * prices.gpu_price(gpu_type)}
    return {"stages": stages, "missing": missing,
            "gpu_hours": sum(s["gpu_hours"] for s in stages.values()),
            "usd": sum(s["usd"] for s in stages.values()),
            "paper_usd": prices.paper_reference_usd}


def format_report(rep: Report, title: str = "cost ledger") -> str:
    head = f"{'step':<22}{'assets':>7}{'samples':>9}{'MB':>9}{'wall s':>9}{'CPU s':>9}{'GPU h':>8}" \
           f"{'$':>11}{'$/1K smp':>10}"
    lines = [title, head, "-" * len(head)]
    for r in rep.rows:
        lines.append(f"{r['step']:<22}{r['assets']:>7}{int(r['samples'] or 0):>9}{(r['bytes'] or 0) / 1e6:>9.2f}"
                     f"{r['wall_s'] or 0:>9.1f}{r['cpu_s'] or 0:>9.1f}{r['gpu_hours'] or 0:>8.3f}"
                     f"{r['total_usd'] or 0:>11.6f}{_fmt(r['usd_per_1k_samples']):>10}")
    t = rep.total
    lines.append("-" * len(head))
    lines.append(f"{'TOTAL':<22}{t['assets']:>7}{'':>9}{'':>9}{t['wall_s'] or 0:>9.1f}{t['cpu_s'] or 0:>9.1f}"
                 f"{t['gpu_hours'] or 0:>8.3f}{t['total_usd'] or 0:>11.6f}"
                 f"{_fmt(t['usd_per_1k_trained_samples']):>10}")
    lines.append(f"(rows add up to the total; TOTAL $/1K is per 1K trained samples; CPU ${t['cpu_usd'] or 0:.6f}"
                 f" + GPU ${t['gpu_usd'] or 0:.6f} + storage ${t['storage_usd'] or 0:.6f})")
    for g in rep.gpus:
        lines.append(f"GPU {g['gpu_type'] or '?'}: {g['gpu_hours']:.3f} GPU-hours, ${g['gpu_usd']:.2f}")
    p = rep.projection
    if p is not None:
        lines.append("projected full recipe (measured throughput x the paper recipe's steps x batch):")
        for name, s in p["stages"].items():
            lines.append(f"  {name}: {s['samples_per_gpu_second']:.1f} samples/GPU-s on {s['gpu_type']} -> "
                         f"{s['gpu_hours']:.1f} GPU-h, ${s['usd']:,.0f}")
        if p["missing"]:
            lines.append(f"  not measured (left out of the projection): {', '.join(p['missing'])}")
        lines.append(f"  projected ${p['usd']:,.0f} ({p['gpu_hours']:.0f} GPU-h)   vs paper ${p['paper_usd']:,.0f}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.5f}"


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.ledger", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="per-step and total cost, $ per 1K samples, GPU-hours, projection")
    r.add_argument("--db", default=str(DEFAULT_DB), help="ledger file (default %(default)s)")
    r.add_argument("--run", default=None, help="only this run id (default: all runs)")
    r.add_argument("--profile", default=None, help="only this profile; 'paper' adds the full-recipe projection")
    r.add_argument("--project", action="store_true", help="show the full-recipe projection for any profile")
    r.add_argument("--prices", default=None, help="price list for the projection (default infra/prices.toml)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i = sub.add_parser("ingest", help="record finished asset folders (each with manifest.json)")
    i.add_argument("folders", nargs="+")
    i.add_argument("--db", default=str(DEFAULT_DB))
    i.add_argument("--profile", required=True)
    i.add_argument("--run", required=True, help="run id (the pipeline run's folder name)")
    i.add_argument("--step", default=None, help="step name (default kind:name from the manifest)")
    i.add_argument("--prices", default=None)
    sub.add_parser("sql", help="print the tables, the report views and the SQL the report runs")
    a = ap.parse_args(argv)
    if a.cmd == "sql":
        print(SCHEMA, "-- per step\n" + ROWS_SQL, "-- total\n" + TOTAL_SQL, "-- GPU-hours\n" + GPU_SQL, sep="\n")
        return 0
    prices = load_prices(a.prices) if a.prices else None
    if a.cmd == "ingest":
        for x in ingest(a.folders, profile=a.profile, run_id=a.run, step=a.step, db=a.db, prices=prices):
            print(f"{'recorded' if x.new else 'already recorded'}: {x.step} {x.path} ${x.total_usd:.6f}")
        return 0
    rep = report(run_id=a.run, profile=a.profile, db=a.db, prices=prices, project=a.project or None)
    print(json.dumps(rep.to_dict(), indent=2, default=str) if a.json else
          format_report(rep, f"cost ledger {a.db}" + (f" run={a.run}" if a.run else "")
                        + (f" profile={a.profile}" if a.profile else "")))
    return 0


if __name__ == "__main__":
    run_cli(main)
