"""Precompute image latents and caption embeddings into MosaicML streaming (MDS) shards, in parallel with Ray.

    python -m dataprep.precompute --input data/cc12m-clean --out data/cc12m-latents \
        --resolutions 256 512 --image-autoencoder sdxl \
        --text-encoder openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378 [--address ray://head:10001]
    python -m dataprep.precompute --input data/shapes-raw --out data/shapes-latents --resolutions 16 32 \
        --image-autoencoder pixel:2 --text-encoder tiny-clip:16 --min-size 32      # the CPU default
    S3_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
    python -m dataprep.precompute --input data/cc12m-clean --out s3://bucket/latents/cc12m --staging /nvme/stage

The input is a converted set (`dataprep.convert`) or any raw / bring-your-own layout, which is converted
first into `<out>/_converted` (with --min-size / --short-side). Each image is resized to a short side of
each resolution and centre-cropped, encoded with the image autoencoder, its caption with the text
encoder, and written with the columns of `microdit.schema.LatentSchema`.

Engine: Ray Data `map_batches` over work units with an autoscaling actor pool of
`dataprep.units.UnitEncoder` (`--min-workers` to `--workers` actors). Each actor asks Ray for what is
declared, never for what the cluster happens to have at the start: `--gpus-per-worker` GPUs (default 1
on a machine with a GPU, else 0) and `--resources` custom resources (e.g. '{"latent_encoder": 1}': only
nodes that declare it get an actor; an autoscaler starts such nodes for pending actors), and
`--threads` CPUs, its torch threads. Locally it
starts Ray itself (`microdit.ray_cluster`: loopback only, token auth, bounded CPUs, no dashboard) and
stops it after; `--address` joins a cluster with token auth (the token from RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH, docs/security.md). `--engine local` runs the same units in this process, without Ray.

Restartable: kill it at any moment and run the same command again: finished units are kept, unfinished
ones are redone, and the merged set holds every input sample exactly once. The set is finished when
`manifest.json` exists (config, encoders, counts, skipped by reason, bytes, worker- and GPU-seconds).

`--out` is a local folder or an object-storage URL (s3://, gs://, oci://, ... : every scheme streaming
writes). For a URL, shards are cut in a local staging folder (`--staging`, default under $TMPDIR) and
uploaded as they are cut; each unit's `unit.json` is uploaded last and records it finished; the merged
index, schema.json and manifest.json go up at the end. The store's endpoint and credentials come from
its standard environment variables (S3_ENDPOINT_URL, AWS_*), never from a file here.
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
from microdit.manifest import MANIFEST_NAME, CostMeter, Manifest, config_hash, folder_bytes
from microdit.schema import LatentSchema

from .units import LatentStore, UnitEncoder, plan_units, remove_unfinished

RUN_CONFIG = "precompute.json"


@dataclass
class PrecomputeConfig:
    input: str                                   # converted set, raw set folder, or a parquet/CSV of paths + captions
    out: str                                     # latent set folder or URL (s3://bucket/prefix) to create or complete
    resolutions: tuple = (256, 512)              # image resolutions, one latents column each
    image_autoencoder: str = DEFAULT_IMAGE_AUTOENCODER   # microdit.encoders name (sdxl, ostris, pixel:2, tiny-kl...)
    text_encoder: str = DEFAULT_TEXT_ENCODER     # microdit.encoders name (openclip:hf-hub:..., t5:..., tiny-clip:16)
    batch_size: int = 32                         # images per encoder call
    workers: int | None = None                   # encoder actors at most (the pool grows to this while there is work
                                                 # and resources); None = this machine's GPUs, else its CPUs (<= 8)
    min_workers: int = 1                         # actors the pool keeps (it shrinks to this when work runs out)
    gpus_per_worker: float | None = None         # GPUs each actor asks Ray for; None = 1 when this machine has a
                                                 # CUDA GPU, else 0 (declare it when --address is a cluster)
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor, e.g. {"latent_encoder": 1}:
                                                 # actors land only on nodes that declare them
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
    staging: str | None = None                   # URL --out only: local folder for conversion and shards on their
                                                 # way up (None = $TMPDIR/microdit-staging/<name>)
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


def precompute(cfg: PrecomputeConfig) -> Path | str:
    """Make (or finish) the latent set `cfg.out`; returns its folder (a Path), or its URL (a str)."""
    cfg.validate()
    store = LatentStore(cfg.out, cfg.staging)
    result = store.out if store.remote else Path(cfg.out)
    ident = config_hash(cfg.identity())
    done = store.read_json(MANIFEST_NAME)
    if done is not None and done["config"].get("identity_hash") == ident:
        return result
    _preflight_offline(cfg)
    _check_same_run(store, cfg, ident)
    # no streaming shared memory to clean: writers (MDSWriter, merge_index) use none, and /dev/shm entries
    # of other processes are theirs (a reader cleans its own: microdit.data.prepare_run_tmp)
    with CostMeter() as meter:
        converted, convert_skipped = _converted_input(cfg, store.work)
        units = plan_units(converted, cfg.unit_samples or auto_unit_samples(converted))
        if not units:
            raise UserError(f"{cfg.input}: no samples left after conversion (see {converted}/manifest.json)")
        remove_unfinished(store.work)
        done_units = store.finished_units()
        todo = [u for u in units if u.name not in done_units]
        run_cfg = {**asdict(cfg), "out": store.out, "staging": str(store.work.resolve()),
                   "resolutions": [int(r) for r in cfg.resolutions]}
        if todo:
            if cfg.engine == "local":
                _run_local(run_cfg, todo, cfg)
            elif cfg.engine == "ray":
                _run_ray(run_cfg, todo, cfg)
            else:
                raise UserError(f"engine must be ray or local, got {cfg.engine!r}")
        found = store.finished_units()
        missing = [u.name for u in units if u.name not in found]
        if missing:
            raise UserError(f"{len(missing)} work units did not finish (e.g. {missing[:3]}); rerun the command")
        infos = {u.name: found[u.name] for u in units}            # exactly the planned units, in order
        schema = _merge(store, list(infos.values()))
    # units encoded in this process (local engine) are already in meter.cpu_seconds: count them once
    in_process_cpu = sum(infos[u.name]["cpu_seconds"] for u in todo) if cfg.engine == "local" else 0.0
    skipped = dict(convert_skipped)
    for info in infos.values():
        for k, v in info["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    sig = infos[units[0].name]["signature"]
    gpu = [i for i in infos.values() if i.get("gpu_seconds")]
    Manifest(kind="latents", name=store.out.rstrip("/").rsplit("/", 1)[-1],
             config={**asdict(cfg), "out": store.out, "identity_hash": ident, "encoders": sig,
                     "schema": schema.to_dict()},
             parents=[str(cfg.input)], samples=sum(i["samples"] for i in infos.values()), skipped=skipped,
             bytes=sum(i.get("bytes", 0) for i in infos.values()) if store.remote else folder_bytes(store.work),
             wall_seconds=meter.wall_seconds,
             cpu_seconds=meter.cpu_seconds - in_process_cpu + sum(i["cpu_seconds"] for i in infos.values()),
             gpu_seconds=sum(i["gpu_seconds"] for i in infos.values()),
             gpu_type=gpu[0]["gpu_type"] if gpu else "", num_gpus=len({(i["pid"], i["gpu_type"]) for i in gpu}),
             metrics={"units": len(units), "units_this_run": len(todo),
                      "worker_seconds": sum(i["seconds"] for i in infos.values()),
                      "samples_per_worker_second": sum(i["samples"] for i in infos.values())
                      / max(1e-9, sum(i["seconds"] for i in infos.values())),
                      "wall_seconds_note": "wall_seconds covers the last run; worker_seconds all runs"}
             ).write(store.work)
    store.publish(MANIFEST_NAME)                          # last: the set is finished once this exists
    return result


# --------------------------------------------------------------------------------------------
#                                         Steps
# --------------------------------------------------------------------------------------------

def auto_unit_samples(converted) -> int:
    """Enough units for load balance and a live progress bar, few enough to keep shards large."""
    total = sum(u.samples for u in plan_units(converted, 1 << 40))
    return int(min(1000, max(100, -(-total // 16))))


def _check_same_run(store: LatentStore, cfg: PrecomputeConfig, ident: str) -> None:
    old = store.read_json(RUN_CONFIG)
    if old is not None:
        if old.get("identity_hash") != ident:
            diff = {k: (old["identity"].get(k), v) for k, v in cfg.identity().items() if old["identity"].get(k) != v}
            raise UserError(f"{store.out} was started with a different config {diff} (old, new): use a fresh "
                            "--out, or delete this one to start over")
        return
    store.put_json(RUN_CONFIG, {"identity": cfg.identity(), "identity_hash": ident})


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


def actor_request(cfg: PrecomputeConfig, todo_units: int) -> dict:
    """What the encoder actor pool asks Ray for, from the config alone (never from what the cluster
    has at the start: an autoscaling cluster starts with no GPU node, and Ray starts the nodes that
    the pending actors' declared resources need). Keys: min_size, max_size, num_gpus, num_cpus
    (= torch threads per actor), resources."""
    import torch
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1 if torch.cuda.is_available() else 0)
    local_cpus = cfg.num_cpus or os.cpu_count() or 1
    most = cfg.workers or (torch.cuda.device_count() if gpus else min(local_cpus, 8)) or 1
    most = max(1, min(most, todo_units))
    threads = cfg.threads or (max(1, local_cpus // most) if not cfg.address else 1)
    return {"min_size": max(1, min(cfg.min_workers, most)), "max_size": most, "num_gpus": gpus,
            "num_cpus": threads, "resources": dict(cfg.resources or {})}


def _run_ray(run_cfg: dict, todo, cfg: PrecomputeConfig) -> None:
    import ray

    from microdit.ray_cluster import ray_session
    ask = actor_request(cfg, len(todo))
    with ray_session(cfg.address, cfg.num_cpus):
        from ray.data import ActorPoolStrategy, DataContext
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        items = [{"name": u.name, "path": u.path, "start": u.start, "stop": u.stop} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # an autoscaling pool of min_size..max_size actors, each placed where its declared resources are;
        # two units in flight per actor: the next one is queued while the current one encodes, so an actor
        # never idles on Ray Data's scheduling (1.54x -> 1.93x for 2 CPU actors; docs/data.md, Benchmark)
        pool = ActorPoolStrategy(min_size=ask["min_size"], max_size=ask["max_size"], max_tasks_in_flight_per_actor=2)
        ds = ds.map_batches(UnitEncoder, fn_constructor_kwargs={"cfg": run_cfg, "threads": ask["num_cpus"]},
                            batch_size=1, batch_format="numpy", compute=pool, num_cpus=ask["num_cpus"],
                            num_gpus=ask["num_gpus"], resources=ask["resources"] or None)
        with _bar(cfg, todo) as bar:
            kind = f"{ask['num_gpus']:g} GPU" if ask["num_gpus"] else f"{ask['num_cpus']} CPU"
            extra = "".join(f" + {v:g} {k}" for k, v in ask["resources"].items())
            bar.set_postfix_str(f"{ask['min_size']}-{ask['max_size']} workers x ({kind}{extra})")
            for row in ds.iter_rows():
                bar.update(int(row["samples"]) + sum(json.loads(row["info"])["skipped"].values()))


def _merge(store: LatentStore, infos: list[dict]) -> LatentSchema:
    """Check every unit used the same schema, merge their MDS indexes at the top, write schema.json."""
    from streaming.base.util import merge_index
    first = infos[0]["schema"]
    for info in infos[1:]:
        if info["schema"] != first:
            raise UserError(f"unit {info['name']} was written with schema {info['schema']}, unit "
                            f"{infos[0]['name']} with {first}: delete {store.out} and start over")
    (store.work / "index.json").unlink(missing_ok=True)   # merge_index will not overwrite
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)                          # merge_index chats about temp folders at WARNING
    try:
        merge_index([store.index_of(i["name"]) for i in infos],
                    (str(store.work), store.out) if store.remote else store.out, keep_local=True)
    finally:
        root.setLevel(level)
    d = dict(first)
    d["resolutions"] = tuple(d["resolutions"])
    schema = LatentSchema(**d)
    schema.write(store.work)
    store.publish("schema.json")
    return schema


# --------------------------------------------------------------------------------------------
#                                           CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.precompute", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="converted set, raw set folder, or parquet/CSV of paths + captions")
    p.add_argument("--out", required=True, help="latent set folder or URL, e.g. s3://bucket/prefix (rerun the "
                   "same command to finish it)")
    p.add_argument("--staging", help="URL --out: local folder for shards on their way up (default under $TMPDIR)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="image resolutions")
    p.add_argument("--image-autoencoder", default=DEFAULT_IMAGE_AUTOENCODER, help="microdit.encoders name")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, help="microdit.encoders name")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--workers", type=int, help="encoder actors at most (default: one per GPU of this machine, "
                   "else one per CPU)")
    p.add_argument("--min-workers", type=int, default=1, help="actors the pool keeps when work runs out")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each actor asks Ray for (default: 1 when this "
                   "machine has a GPU, else 0)")
    p.add_argument("--resources", type=json.loads, default={}, help='custom Ray resources per actor, JSON, '
                   'e.g. \'{"latent_encoder": 1}\'')
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
                           workers=a.workers, min_workers=a.min_workers, gpus_per_worker=a.gpus_per_worker,
                           resources=a.resources, threads=a.threads, engine=a.engine, address=a.address,
                           num_cpus=a.num_cpus, unit_samples=a.unit_samples, min_size=a.min_size,
                           short_side=a.short_side, source=a.source, compression=a.compression, dtype=a.dtype,
                           seed=a.seed, staging=a.staging)
    t0 = time.time()
    path = precompute(cfg)
    m = Manifest.read(path)
    print(f"{path}: {m.samples} samples, skipped {m.skipped or 'none'}, {m.bytes / 1e6:.1f} MB, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_cli(main)
