"""Precompute image latents and caption embeddings into MosaicML streaming (MDS) shards, in parallel with Ray.

    python -m dataprep.precompute --input data/cc12m-clean --out data/cc12m-latents \
        --resolutions 256 512 --image-autoencoder sdxl \
        --text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378 [--address ray://head:10001]
    python -m dataprep.precompute --input data/shapes-raw --out data/shapes-latents --resolutions 16 32 \
        --image-autoencoder pixel:2 --text-encoder tiny-clip:16 --min-size 32      # the CPU default

The input is a converted set (`dataprep.convert`) or any raw / bring-your-own layout, which is converted
first into `<out>/_converted` (with --min-size / --short-side). Each image is resized to a short side of
each resolution and centre-cropped, encoded with the image autoencoder, its caption with the text
encoder, and written with the columns of `microdit.schema.LatentSchema`.

Engine: Ray Data `map_batches` over work units with an actor pool of `dataprep.units.UnitEncoder`
(one actor per GPU; on CPU machines `--workers` actors with `--threads` torch threads each). Locally it
starts Ray itself (`microdit.ray_cluster`: loopback only, token auth, bounded CPUs, no dashboard) and
stops it after; `--address` joins a cluster with token auth (the token from RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH, docs/security.md). `--engine local` runs the same units in this process, without Ray.

Restartable: kill it at any moment and run the same command again: finished units are kept, unfinished
ones are redone, and the merged set holds every input sample exactly once. The folder is finished when
`manifest.json` exists (config, encoders, counts, skipped by reason, bytes, worker- and GPU-seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from microdit.cli import UserError, check_positive, run_cli
from microdit.encoders import DEFAULT_IMAGE_AUTOENCODER, DEFAULT_TEXT_ENCODER
from microdit.manifest import CostMeter, Manifest, config_hash, folder_bytes, read_manifest, write_json_atomic
from microdit.schema import LatentSchema

from .units import UNIT_PREFIX, UnitEncoder, finished_units, plan_units, remove_unfinished

RUN_CONFIG = "precompute.json"


@dataclass
class PrecomputeConfig:
    input: str                                   # converted set, raw set folder, or a parquet/CSV of paths + captions
    out: str                                     # latent set folder to create (or complete after a kill)
    resolutions: tuple = (256, 512)              # image resolutions, one latents column each
    image_autoencoder: str = DEFAULT_IMAGE_AUTOENCODER   # microdit.encoders name (sdxl, ostris, pixel:2, tiny-kl...)
    text_encoder: str = DEFAULT_TEXT_ENCODER     # microdit.encoders name (openclip:hf-hub:..., t5:..., tiny-clip:16)
    batch_size: int = 32                         # images per encoder call
    workers: int | None = None                   # encoder actors; None = one per GPU, else one per CPU (<= 8)
    threads: int | None = None                   # torch threads per CPU actor; None = CPUs // workers
    engine: str = "ray"                          # ray | local (same units in this process, no Ray)
    address: str | None = None                   # Ray cluster address (ray://host:10001 or auto); None = local
    num_cpus: int | None = None                  # local Ray only: CPUs it may use (default: all)
    unit_samples: int | None = None              # samples per restartable work unit (one MDS subfolder each);
                                                 # None = input size / 16, clamped to [100, 1000]
    min_size: int = 256                          # when the input is not converted yet: drop smaller images
    short_side: int = 512                        # ... and resize larger ones to this short side
    source: str | None = None                    # data set name for `source` (default: from the input)
    compression: str | None = None               # MDS shard compression (None, zstd, ...)
    shard_size_limit: int = 1 << 26              # bytes per MDS shard
    dtype: str = "float32"                       # encoder compute dtype on GPU (float32, bfloat16, float16)
    seed: int = 0                                # seeds the VAE posterior sampling (per unit)
    progress: bool = True                        # progress bar
    extra: dict = field(default_factory=dict)    # free-form, saved in the manifest

    def validate(self) -> None:
        """Refuse values that cannot work, naming the flag (before anything is read or started)."""
        for r in self.resolutions:
            if int(r) < 1:
                raise UserError(f"--resolutions {r}: give positive image sizes in pixels, e.g. 256 512")
        check_positive(batch_size=self.batch_size, workers=self.workers, threads=self.threads, num_cpus=self.num_cpus,
                       unit_samples=self.unit_samples, min_size=self.min_size, short_side=self.short_side)
        if self.engine not in ("ray", "local"):
            raise UserError(f"--engine {self.engine!r}: use ray or local")

    def identity(self) -> dict:
        """What determines the output: a rerun into the same folder must agree on these."""
        keys = ("input", "resolutions", "image_autoencoder", "text_encoder", "unit_samples", "min_size",
                "short_side", "source", "compression", "seed")
        d = asdict(self)
        d["resolutions"] = [int(r) for r in self.resolutions]
        d["input"] = str(Path(self.input).resolve())
        return {k: d[k] for k in keys}


def precompute(cfg: PrecomputeConfig) -> Path:
    """Make (or finish) the latent set `cfg.out`; returns the folder."""
    cfg.validate()
    out = Path(cfg.out)
    ident = config_hash(cfg.identity())
    done = read_manifest(out)
    if done is not None and done.config.get("identity_hash") == ident:
        return out
    _preflight_offline(cfg)
    _check_same_run(out, cfg, ident)
    # no streaming shared memory to clean: writers (MDSWriter, merge_index) use none, and /dev/shm entries
    # of other processes are theirs (a reader cleans its own: microdit.data.prepare_run_tmp)
    with CostMeter() as meter:
        converted, convert_skipped = _converted_input(cfg, out)
        units = plan_units(converted, cfg.unit_samples or auto_unit_samples(converted))
        if not units:
            raise UserError(f"{cfg.input}: no samples left after conversion (see {converted}/manifest.json)")
        remove_unfinished(out)
        done_units = finished_units(out)
        todo = [u for u in units if u.name not in done_units]
        run_cfg = {**asdict(cfg), "out": str(out.resolve()), "resolutions": [int(r) for r in cfg.resolutions]}
        if todo:
            if cfg.engine == "local":
                _run_local(run_cfg, todo, cfg)
            elif cfg.engine == "ray":
                _run_ray(run_cfg, todo, cfg)
            else:
                raise UserError(f"engine must be ray or local, got {cfg.engine!r}")
        found = finished_units(out)
        missing = [u.name for u in units if u.name not in found]
        if missing:
            raise UserError(f"{len(missing)} work units did not finish (e.g. {missing[:3]}); rerun the command")
        infos = {u.name: found[u.name] for u in units}            # exactly the planned units, in order
        schema = _merge(out, list(infos.values()))
    # units encoded in this process (local engine) are already in meter.cpu_seconds: count them once
    in_process_cpu = sum(infos[u.name]["cpu_seconds"] for u in todo) if cfg.engine == "local" else 0.0
    skipped = dict(convert_skipped)
    for info in infos.values():
        for k, v in info["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    sig = infos[units[0].name]["signature"]
    gpu = [i for i in infos.values() if i.get("gpu_seconds")]
    Manifest(kind="latents", name=f"{Path(cfg.out).name}",
             config={**asdict(cfg), "identity_hash": ident, "encoders": sig, "schema": schema.to_dict()},
             parents=[str(cfg.input)], samples=sum(i["samples"] for i in infos.values()), skipped=skipped,
             bytes=folder_bytes(out), wall_seconds=meter.wall_seconds,
             cpu_seconds=meter.cpu_seconds - in_process_cpu + sum(i["cpu_seconds"] for i in infos.values()),
             gpu_seconds=sum(i["gpu_seconds"] for i in infos.values()),
             gpu_type=gpu[0]["gpu_type"] if gpu else "", num_gpus=len({(i["pid"], i["gpu_type"]) for i in gpu}),
             metrics={"units": len(units), "units_this_run": len(todo),
                      "worker_seconds": sum(i["seconds"] for i in infos.values()),
                      "samples_per_worker_second": sum(i["samples"] for i in infos.values())
                      / max(1e-9, sum(i["seconds"] for i in infos.values())),
                      "wall_seconds_note": "wall_seconds covers the last run; worker_seconds all runs"}).write(out)
    return out


# --------------------------------------------------------------------------------------------
#                                         Steps
# --------------------------------------------------------------------------------------------

def auto_unit_samples(converted) -> int:
    """Enough units for load balance and a live progress bar, few enough to keep shards large."""
    total = sum(u.samples for u in plan_units(converted, 1 << 40))
    return int(min(1000, max(100, -(-total // 16))))


def _check_same_run(out: Path, cfg: PrecomputeConfig, ident: str) -> None:
    path = out / RUN_CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("identity_hash") != ident:
            diff = {k: (old["identity"].get(k), v) for k, v in cfg.identity().items() if old["identity"].get(k) != v}
            raise UserError(f"{out} was started with a different config {diff} (old, new): use a fresh --out "
                             "folder, or delete this one to start over")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"identity": cfg.identity(), "identity_hash": ident})


def _converted_input(cfg: PrecomputeConfig, out: Path) -> tuple[Path, dict]:
    from .convert import ConvertConfig, convert, is_converted
    if is_converted(cfg.input):
        return Path(cfg.input), {}
    conv = convert(ConvertConfig(input=cfg.input, out=str(out / "_converted"), source=cfg.source,
                                 min_size=cfg.min_size, short_side=cfg.short_side, engine=cfg.engine,
                                 address=cfg.address, num_cpus=cfg.num_cpus), progress=cfg.progress)
    return conv, dict(Manifest.read(conv).skipped)


def _preflight_offline(cfg: PrecomputeConfig) -> None:
    """With HF_HUB_OFFLINE set, fail at once (not after starting Ray and its actors) when weights are absent."""
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        return
    from microdit.encoders import VAE_ALIASES, hub_download_or_fail
    repos = []
    ae, te = cfg.image_autoencoder, cfg.text_encoder
    if ae in VAE_ALIASES:
        repos.append((VAE_ALIASES[ae][0], "image autoencoder"))
    elif ae.startswith("diffusers:") and not os.path.exists(ae[10:].partition("#")[0]):
        repos.append((ae[10:].partition("#")[0], "image autoencoder"))
    if te.startswith("openclip:hf-hub:"):
        repos.append((te[len("openclip:hf-hub:"):], "OpenCLIP text encoder"))
    elif te.startswith("t5:") and not os.path.exists(te[3:]):
        repos.append((te[3:], "T5 text encoder"))
    for repo, what in repos:
        hub_download_or_fail(repo, None, what)          # raises MissingWeightsError naming what to do


def _bar(cfg: PrecomputeConfig, todo):
    from tqdm import tqdm
    return tqdm(total=sum(u.samples for u in todo), unit="sample", desc="precompute", disable=not cfg.progress,
                smoothing=0.1)


def _run_local(run_cfg: dict, todo, cfg: PrecomputeConfig) -> None:
    import torch
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    enc = UnitEncoder(run_cfg, threads=cfg.threads or torch.get_num_threads())
    with _bar(cfg, todo) as bar, torch.inference_mode():
        for u in todo:
            enc.encode_unit(u)
            bar.update(u.samples)


def _run_ray(run_cfg: dict, todo, cfg: PrecomputeConfig) -> None:
    import ray

    from microdit.ray_cluster import ray_session
    with ray_session(cfg.address, cfg.num_cpus):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = cfg.workers or (gpus if gpus else min(cpus, 8))
        workers = max(1, min(workers, len(todo), gpus or workers))     # one actor per GPU at most
        threads = cfg.threads or max(1, cpus // workers)
        from ray.data import ActorPoolStrategy, DataContext
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = [{"name": u.name, "path": u.path, "start": u.start, "stop": u.stop} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # two units in flight per actor: the next one is queued while the current one encodes, so an actor
        # never idles on Ray Data's scheduling (1.54x -> 1.93x for 2 CPU actors; docs/data.md, Benchmark)
        ds = ds.map_batches(UnitEncoder, fn_constructor_kwargs={"cfg": run_cfg, "threads": threads},
                            batch_size=1, batch_format="numpy",
                            compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
                            num_cpus=threads, num_gpus=1 if gpus else 0)
        with _bar(cfg, todo) as bar:
            bar.set_postfix_str(f"{workers} {'GPU' if gpus else 'CPU'} workers x {threads} threads")
            for row in ds.iter_rows():
                bar.update(int(row["samples"]) + sum(json.loads(row["info"])["skipped"].values()))


def _merge(out: Path, infos: list[dict]) -> LatentSchema:
    """Check every unit used the same schema, merge their MDS indexes at the top, write schema.json."""
    from streaming.base.util import merge_index
    first = infos[0]["schema"]
    for info in infos[1:]:
        if info["schema"] != first:
            raise UserError(f"unit {info['name']} was written with schema {info['schema']}, unit "
                               f"{infos[0]['name']} with {first}: delete {out} and start over")
    (out / "index.json").unlink(missing_ok=True)          # merge_index will not overwrite
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)                          # merge_index chats about temp folders at WARNING
    try:
        merge_index([str(out / f"{UNIT_PREFIX}{i['name']}" / "index.json") for i in infos], str(out),
                    keep_local=True)
    finally:
        root.setLevel(level)
    d = dict(first)
    d["resolutions"] = tuple(d["resolutions"])
    schema = LatentSchema(**d)
    schema.write(out)
    return schema


# --------------------------------------------------------------------------------------------
#                                           CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.precompute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="converted set, raw set folder, or parquet/CSV of paths + captions")
    p.add_argument("--out", required=True, help="latent set folder (rerun the same command to finish it)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="image resolutions")
    p.add_argument("--image-autoencoder", default=DEFAULT_IMAGE_AUTOENCODER, help="microdit.encoders name")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, help="microdit.encoders name")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--workers", type=int, help="encoder actors (default: one per GPU, else one per CPU)")
    p.add_argument("--threads", type=int, help="torch threads per CPU actor (default: CPUs // workers)")
    p.add_argument("--engine", default="ray", choices=["ray", "local"], help="ray, or local (no Ray)")
    p.add_argument("--address", help="Ray cluster address (ray://host:10001 or auto); default: local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    p.add_argument("--unit-samples", type=int, help="samples per restartable work unit (default: input/16, "
                   "clamped to 100..1000)")
    p.add_argument("--min-size", type=int, default=256, help="unconverted input: drop images with a smaller short side")
    p.add_argument("--short-side", type=int, default=512, help="unconverted input: resize larger images to this")
    p.add_argument("--source", help="data set name stored with each sample")
    p.add_argument("--compression", help="MDS compression (e.g. zstd)")
    p.add_argument("--dtype", default="float32", help="encoder dtype on GPU")
    p.add_argument("--seed", type=int, default=0, help="VAE posterior sampling seed")
    a = p.parse_args(argv)
    cfg = PrecomputeConfig(a.input, a.out, tuple(a.resolutions), a.image_autoencoder, a.text_encoder, a.batch_size,
                           a.workers, a.threads, a.engine, a.address, a.num_cpus, a.unit_samples, a.min_size,
                           a.short_side, a.source, a.compression, dtype=a.dtype, seed=a.seed)
    t0 = time.time()
    path = precompute(cfg)
    m = Manifest.read(path)
    print(f"{path}: {m.samples} samples, skipped {m.skipped or 'none'}, {m.bytes / 1e6:.1f} MB, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_cli(main)
