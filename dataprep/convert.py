"""Filter and convert a raw set into clean, uniformly laid out parquet shards for precompute.

    python -m dataprep.convert --input data/shapes-raw --out data/shapes-clean --min-size 32
    python -m dataprep.convert --input my_images.csv --out data/mine-clean --source mine
    python -m dataprep.convert --input data/sa1b-raw --out data/sa1b-clean --workers 32 [--address auto]

Keeps a sample when its image decodes, its short side is >= `min_size` and its caption is non-empty
UTF-8 text; resizes images whose short side exceeds `short_side` down to it (aspect kept); gives every
sample a stable id "<source>/<key>" (or the id the source carries). Everything left out is counted by
reason in the manifest (`skipped`), with a few examples of each in `metrics.examples`:

    image_missing  image_corrupt  image_truncated  image_too_small  image_too_large (decompression bomb)
    caption_missing  caption_empty  caption_not_utf8  duplicate_id

Parallel and resumable: the input is cut into record units (`dataprep.readers.plan_record_units`: at
most `--shard-samples` records each, or one webdataset tar / img2dataset parquet file), converted by Ray
Data actors (`UnitConverter` under `map_batches`; `--engine local` runs the same units in this process).
Each unit writes `part-<unit>.parquet` (renamed into place whole) and then its marker
`.units/<unit>.json` (kept count, skips by reason): a rerun skips units with a marker and redoes the
rest, so a killed run (even kill -9) loses only unfinished units. When every unit is done, a sample id
already kept by an earlier unit is dropped from later ones (`duplicate_id`), and `manifest.json`
(kind "raw") is written last. A changed config starts the folder over.

Output: `part-00000.parquet`, ... (columns sample_id, source, caption, image (encoded bytes), width,
height, meta (JSON text)).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from microdit.cli import UserError, run_cli
from microdit.manifest import CostMeter, Manifest, config_hash, folder_bytes, read_manifest, write_json_atomic

from .checks import Skip, check_caption, check_image
from .readers import RawRecord, RecordUnit, iter_unit_records, plan_record_units, source_name

CONVERTED_LAYOUT = "converted"        # manifest.metrics["layout"] of a folder this module wrote


@dataclass
class ConvertConfig:
    input: str                      # raw set folder (any layout of dataprep.readers) or a parquet/CSV table
    out: str                        # folder to write
    source: str | None = None       # data set name stored with each sample (default: raw manifest / folder name)
    min_size: int = 256             # drop images whose short side is smaller (the paper: 256)
    short_side: int = 512           # resize images whose short side is larger down to this (the paper: 512)
    shard_samples: int = 1000       # input records per work unit; each unit writes one output part
    layout: str | None = None       # force a reader layout (files, webdataset, parquet, table); None = detect
    jpeg_quality: int = 95          # quality when a resized JPEG is re-encoded (PNG stays PNG)
    # ---- how it runs (not part of the output's identity) ----
    workers: int | None = None      # Ray actors, one CPU each; None = the CPUs Ray has (at most the units left)
    engine: str = "ray"             # ray | local (the same units in this process; also used for a single unit)
    address: str | None = None      # Ray cluster address ("auto", ray://host:10001); None = a local Ray
    num_cpus: int | None = None     # local Ray only: CPUs it may use (None = all)


RUN_KEYS = ("out", "workers", "engine", "address", "num_cpus")     # how, not what: left out of the identity
UNITS_DIR, DUPLICATES = ".units", "duplicates.json"


class UnitConverter:
    """Converts whole record units into `part-<unit>.parquet`. Ray Data: batches of unit descriptions (JSON)
    in, per-unit stats out; the local engine calls `convert_unit` directly."""

    def __init__(self, cfg: dict):
        self.cfg = ConvertConfig(**cfg)
        self.out = Path(self.cfg.out)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        infos = [self.convert_unit(RecordUnit(**json.loads(str(u)))) for u in batch["unit"]]
        return {"info": np.array([json.dumps(i) for i in infos])}

    def convert_unit(self, unit: RecordUnit) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        marker = self.out / UNITS_DIR / f"{unit.name}.json"
        if marker.exists():                                    # finished by an earlier run (or another worker)
            return json.loads(marker.read_text())
        t0, c0 = time.time(), time.process_time()
        cfg, seen, skipped, examples, rows, skipped_ids = self.cfg, set(), {}, {}, [], []
        for rec in iter_unit_records(unit):
            try:
                rows.append(_convert_one(rec, cfg.source, cfg, seen))
            except Skip as s:
                skipped[s.reason] = skipped.get(s.reason, 0) + 1
                ex = examples.setdefault(s.reason, [])
                if len(ex) < 3:
                    ex.append(f"{rec.where}: {s}")
                if s.reason != "duplicate_id":             # a duplicate of an earlier unit's sample, if so
                    skipped_ids.append((rec.sample_id or f"{cfg.source}/{rec.key}", s.reason))
        if rows:                                               # write whole, then rename into place
            tmp = self.out / UNITS_DIR / f"part-{unit.name}.parquet.tmp-{os.getpid()}"
            pq.write_table(pa.Table.from_pylist(rows, schema=CONVERTED_SCHEMA), tmp)
            os.replace(tmp, self.out / f"part-{unit.name}.parquet")
        info = {"name": unit.name, "kept": len(rows), "skipped": skipped, "examples": examples,
                "skipped_ids": skipped_ids,
                "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0, "pid": os.getpid(),
                "finished_at": time.time()}
        write_json_atomic(marker, info)                        # the unit is finished once this exists
        return info


def convert(cfg: ConvertConfig, progress: bool = True) -> Path:
    """Run (or finish) the filter/convert step; returns the output folder (with manifest.json)."""
    _check(cfg)
    out, ident = Path(cfg.out), config_hash(_identity(cfg))
    done = read_manifest(out)
    if done is not None and done.config.get("convert_hash") == ident:
        return out
    source = cfg.source or source_name(cfg.input)
    run_cfg = {**asdict(cfg), "source": source}
    with CostMeter() as meter:
        units = plan_record_units(cfg.input, cfg.layout, cfg.shard_samples)
        _start_or_resume(out, ident, config_hash([asdict(u) for u in units]))
        todo = [u for u in units if not (out / UNITS_DIR / f"{u.name}.json").exists()]
        elsewhere = cfg.engine == "ray" and len(todo) > 1
        with _bar(todo, source, progress) as bar:
            if elsewhere:
                _run_ray(run_cfg, todo, cfg, bar)
            else:
                worker = UnitConverter(run_cfg)
                for u in todo:
                    worker.convert_unit(u)
                    bar.update(1)
        infos = [_unit_info(out, u) for u in units]
        duplicates = _drop_later_duplicates(out, units, infos)
    kept = sum(i["kept"] for i in infos) - sum(len(v["drop"]) for v in duplicates.values())
    skipped, examples = _skips(infos, duplicates)
    for f in out.glob("part-*.parquet"):                        # parts of no unit of this plan (an older run)
        if f.stem[len("part-"):] not in {u.name for u in units}:
            f.unlink()
    if skipped and progress:
        print(f"convert {source}: kept {kept}, skipped {skipped}")
    if kept == 0:                          # no manifest: nothing downstream may take this for a finished set
        raise UserError(nothing_kept(cfg, skipped, examples))
    worker_cpu = sum(i["cpu_seconds"] for i in infos if i["name"] in {u.name for u in todo}) if elsewhere else 0.0
    Manifest(kind="raw", name=f"{source}-converted", config={**asdict(cfg), "convert_hash": ident},
             parents=[str(cfg.input)], samples=kept, skipped=skipped, bytes=folder_bytes(out),
             wall_seconds=meter.wall_seconds, cpu_seconds=meter.cpu_seconds + worker_cpu,
             metrics={"layout": CONVERTED_LAYOUT, "source": source, "shards": len(list(out.glob("part-*.parquet"))),
                      "units": len(units), "units_this_run": len(todo), "examples": examples,
                      "worker_seconds": sum(i["seconds"] for i in infos)}).write(out)
    return out


# What to change when every record of a set is skipped for one reason (the flag, or the input itself).
REMEDY = {
    "image_too_small": "lower --min-size (now {min_size}) to at most your images' short side",
    "image_missing": "check --input: each record needs an image file beside its caption",
    "image_corrupt": "check --input: the images do not decode",
    "image_truncated": "check --input: the image files are cut short",
    "caption_missing": "give each image a caption (<name>.txt beside <name>.jpg, or a caption column)",
    "caption_empty": "give each image a non-empty caption",
    "caption_not_utf8": "save the captions as UTF-8 text",
    "duplicate_id": "give the samples distinct ids (or file names)",
}


def nothing_kept(cfg: ConvertConfig, skipped: dict, examples: dict) -> str:
    """The one-line error when a conversion keeps no sample: the main reason, an example, what to change."""
    if not skipped:
        return f"--input {cfg.input}: no records found (check the folder and --layout)"
    reason = max(skipped, key=skipped.get)
    example = (examples.get(reason) or [""])[0]
    return (f"--input {cfg.input}: kept 0 samples, skipped {skipped}" + (f" (e.g. {example})" if example else "")
            + f": {REMEDY.get(reason, 'see the reasons above').format(min_size=cfg.min_size)}")


def _check(cfg: ConvertConfig) -> None:
    for name in ("min_size", "short_side", "shard_samples"):
        if int(getattr(cfg, name)) < (0 if name == "min_size" else 1):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: give a positive number of "
                            f"{'samples' if name == 'shard_samples' else 'pixels'}")
    if cfg.workers is not None and cfg.workers < 1:
        raise UserError(f"--workers {cfg.workers}: give at least 1 (or leave it out: one per CPU)")
    if cfg.engine not in ("ray", "local"):
        raise UserError(f"--engine {cfg.engine!r}: ray or local")


def _identity(cfg: ConvertConfig) -> dict:
    d = asdict(cfg)
    for k in RUN_KEYS:
        d.pop(k)
    return d


def _start_or_resume(out: Path, ident: str, units_hash: str) -> None:
    """Keep the finished units of an interrupted run with the same config and the same units (the input did
    not change under it); anything else starts over."""
    plan, want = out / UNITS_DIR / "plan.json", {"convert_hash": ident, "units_hash": units_hash}
    if plan.exists() and json.loads(plan.read_text()) == want:
        (out / "manifest.json").unlink(missing_ok=True)
        return
    (out / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(out / UNITS_DIR, ignore_errors=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    (out / UNITS_DIR).mkdir(parents=True)
    write_json_atomic(plan, want)


def _unit_info(out: Path, unit: RecordUnit) -> dict:
    marker = out / UNITS_DIR / f"{unit.name}.json"
    if not marker.exists():
        raise RuntimeError(f"convert unit {unit.name} did not finish: rerun the same command to finish it")
    return json.loads(marker.read_text())


def _drop_later_duplicates(out: Path, units, infos) -> dict[str, dict]:
    """What one serial pass would call `duplicate_id`: a sample id kept by an earlier unit is a duplicate in
    every later unit, whether that unit kept the record (it is removed from its part) or skipped it for
    another reason (it is recounted). {unit: {"drop": [ids], "recount": {reason: n}}}; decided once
    (.units/duplicates.json), then applied: applying again changes nothing."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    path = out / UNITS_DIR / DUPLICATES
    if path.exists():
        plan = json.loads(path.read_text())
    else:
        seen, plan = set(), {}
        for u, info in zip(units, infos):
            ids = (pq.read_table(out / f"part-{u.name}.parquet", columns=["sample_id"]).column(0).to_pylist()
                   if info["kept"] else [])
            recount = {}
            for sid, reason in info["skipped_ids"]:
                if sid in seen:
                    recount[reason] = recount.get(reason, 0) + 1
            drop = [i for i in ids if i in seen]
            seen.update(ids)
            if drop or recount:
                plan[u.name] = {"drop": drop, "recount": recount}
        write_json_atomic(path, plan)
    for name, change in plan.items():
        part = out / f"part-{name}.parquet"
        if not change["drop"]:
            continue
        tab = pq.read_table(part)
        keep = pc.invert(pc.is_in(tab.column("sample_id"), value_set=pa.array(change["drop"], pa.string())))
        if not pc.all(keep).as_py():
            tmp = out / UNITS_DIR / f"{part.name}.dedup"
            pq.write_table(tab.filter(keep), tmp)
            os.replace(tmp, part)
    return plan


def _skips(infos, duplicates) -> tuple[dict, dict]:
    skipped, examples = {}, {}
    for info in infos:
        change = duplicates.get(info["name"], {"drop": [], "recount": {}})
        for reason, n in info["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n - change["recount"].get(reason, 0)
        dups = len(change["drop"]) + sum(change["recount"].values())
        if dups:
            skipped["duplicate_id"] = skipped.get("duplicate_id", 0) + dups
        for reason, ex in info["examples"].items():
            examples[reason] = (examples.get(reason, []) + ex)[:3]
        examples["duplicate_id"] = (examples.get("duplicate_id", [])
                                    + [f"part-{info['name']}.parquet: duplicate_id: {d}" for d in change["drop"]])[:3]
    return {k: n for k, n in sorted(skipped.items()) if n}, {k: v for k, v in examples.items() if v}


def _bar(todo, source: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=len(todo), desc=f"convert {source}", unit="unit", disable=not progress)


def _run_ray(run_cfg: dict, todo, cfg: ConvertConfig, bar) -> None:
    """The units through Ray Data: an actor pool of UnitConverter, one CPU each, two units queued per actor."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from microdit.ray_cluster import ray_session
    with ray_session(cfg.address, cfg.num_cpus):
        workers = cfg.workers or int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, min(workers, len(todo)))
        ctx = DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        items = [{"unit": json.dumps(asdict(u))} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(UnitConverter, fn_constructor_kwargs={"cfg": run_cfg}, batch_size=1, batch_format="numpy",
                            compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2), num_cpus=1)
        bar.set_postfix_str(f"{workers} Ray workers")
        quiet = logging.getLogger("ray.data")
        level, quiet.level = quiet.level, logging.ERROR        # no per-dataset INFO lines between the bar's
        try:
            for _ in ds.iter_rows():
                bar.update(1)
        finally:
            quiet.setLevel(level)


def _convert_one(rec: RawRecord, source: str, cfg: ConvertConfig, seen: set) -> dict:
    sample_id = rec.sample_id or f"{source}/{rec.key}"
    if sample_id in seen:
        raise Skip("duplicate_id", sample_id)
    caption = check_caption(rec.caption)
    image, w, h = check_image(rec.image, cfg.min_size, cfg.short_side, cfg.jpeg_quality)
    seen.add(sample_id)
    return {"sample_id": sample_id, "source": source, "caption": caption, "image": image, "width": w, "height": h,
            "meta": json.dumps(rec.meta, sort_keys=True)}


def _schema():
    import pyarrow as pa
    return pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                      ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()), ("meta", pa.string())])


CONVERTED_SCHEMA = _schema()


def is_converted(folder) -> bool:
    m = read_manifest(folder) if Path(folder).is_dir() else None
    return m is not None and m.metrics.get("layout") == CONVERTED_LAYOUT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="raw set folder or parquet/CSV of image paths + captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--source", help="data set name stored with each sample")
    p.add_argument("--min-size", type=int, default=256, help="drop images with a shorter short side")
    p.add_argument("--short-side", type=int, default=512, help="resize larger images to this short side")
    p.add_argument("--shard-samples", type=int, default=1000, help="input records per work unit (one output part each)")
    p.add_argument("--layout", choices=["files", "webdataset", "parquet", "table"], help="force a layout")
    p.add_argument("--workers", type=int, help="Ray workers, one CPU each (default: one per CPU)")
    p.add_argument("--engine", default="ray", choices=["ray", "local"], help="ray, or local (this process)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    a = p.parse_args(argv)
    path = convert(ConvertConfig(a.input, a.out, a.source, a.min_size, a.short_side, a.shard_samples, a.layout,
                                 workers=a.workers, engine=a.engine, address=a.address, num_cpus=a.num_cpus))
    m = Manifest.read(path)
    print(f"{path}: kept {m.samples}, skipped {m.skipped or 'none'}")


if __name__ == "__main__":
    run_cli(main)
