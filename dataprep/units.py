"""Work units of precompute: the restartable pieces of a latent set, and the encoder that fills them.

A converted set (`dataprep.convert`: part-NNNNN.parquet shards) is cut into deterministic units of at
most `unit_samples` rows. Each unit is encoded into its own MDS subfolder `u-<unit>`, first under a
temporary local name `.tmp-<unit>-<pid>`; its `unit.json` is written last and marks it finished. A rerun
skips finished units and redoes the rest from scratch, so every input sample ends up in the set exactly once.

`LatentStore` is where a set is written: a local folder (the temporary folder is renamed into place,
atomically), or an object-storage URL (`s3://bucket/prefix`, any scheme streaming writes): then the
shards stream from the local staging folder to `<url>/u-<unit>/` as they are cut, and `unit.json` is
uploaded after the unit's last shard and its index. A unit redone after a kill writes the same shard
names (the same samples, in the same order, cut at the same sizes), so it replaces what a killed
attempt left and never adds to it.

`UnitEncoder` is the callable class Ray Data runs in an actor pool (encoders loaded once in __init__,
work under torch.inference_mode in __call__, numpy dicts in and out); the local engine calls it directly.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microdit.storage import download_file, is_remote, join, list_files, read_json, upload_relative

UNIT_PREFIX, TMP_PREFIX, UNIT_INFO = "u-", ".tmp-", "unit.json"


@dataclass(frozen=True)
class WorkUnit:
    name: str          # "<part stem>-<start>": stable across runs
    path: str          # converted parquet shard
    start: int         # first row (inclusive)
    stop: int          # last row (exclusive)

    @property
    def samples(self) -> int:
        return self.stop - self.start


def plan_units(converted: str | os.PathLike, unit_samples: int) -> list[WorkUnit]:
    import pyarrow.parquet as pq
    units = []
    for part in sorted(Path(converted).glob("part-*.parquet")):
        n = pq.ParquetFile(part).metadata.num_rows
        for start in range(0, n, unit_samples):
            units.append(WorkUnit(f"{part.stem}-{start:07d}", str(part), start, min(n, start + unit_samples)))
    return units


def unit_dir(out: str | os.PathLike, unit: str) -> Path:
    return Path(out) / f"{UNIT_PREFIX}{unit}"


def finished_units(out: str | os.PathLike) -> dict[str, dict]:
    """unit name -> its unit.json, for every finished unit under `out` (a folder or a URL)."""
    return LatentStore(out).finished_units()


def remove_unfinished(out: str | os.PathLike) -> int:
    """Delete temporary unit folders a killed run left behind (their units are redone)."""
    stale = list(Path(out).glob(f"{TMP_PREFIX}*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def default_staging(url: str) -> Path:
    """Local working folder of a set written to `url`: $TMPDIR/microdit-staging/<name>-<hash>."""
    from microdit.storage import cache_folder
    return cache_folder(url, Path(tempfile.gettempdir()) / "microdit-staging")


class LatentStore:
    """Where a latent set is written: `out` (a folder or a URL) and the local working folder `work`
    (the set's folder itself when local; for a URL, `staging` or `default_staging(url)`)."""

    def __init__(self, out, staging: str | os.PathLike | None = None):
        self.remote = is_remote(out)
        # streaming warns that a staging folder it reuses on purpose "exists and not empty"
        logging.getLogger("streaming.base.storage.upload").setLevel(logging.ERROR)
        self.out = str(out).rstrip("/") if self.remote else str(Path(out).resolve())
        self.work = Path(staging) if staging else default_staging(self.out) if self.remote else Path(self.out)

    def url(self, *parts) -> str:
        return join(self.out, *parts)

    def read_json(self, name: str) -> dict | None:
        return read_json(self.url(name))

    def put_json(self, name: str, obj) -> None:
        """Write `name` in the working folder (atomically) and, for a URL, upload it."""
        from microdit.manifest import write_json_atomic
        self.work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.work / name, obj)
        self.publish(name)

    def publish(self, name: str) -> None:
        """Upload a file written into the working folder (nothing to do for a local set)."""
        if self.remote:
            upload_relative(self.work, self.out, name)

    def finished_units(self) -> dict[str, dict]:
        if not self.remote:
            done = {}
            for d in sorted(Path(self.out).glob(f"{UNIT_PREFIX}*")):
                if (d / UNIT_INFO).exists():
                    done[d.name[len(UNIT_PREFIX):]] = json.loads((d / UNIT_INFO).read_text())
            return done
        names = [n for n in list_files(self.out, UNIT_PREFIX) if n.count("/") == 1 and n.endswith("/" + UNIT_INFO)]
        infos = {n.split("/")[0][len(UNIT_PREFIX):]: self.read_json(n) for n in names}
        return {k: v for k, v in sorted(infos.items()) if v is not None}

    def unit_info(self, unit: str) -> dict | None:
        return self.read_json(f"{UNIT_PREFIX}{unit}/{UNIT_INFO}")

    def begin_unit(self, unit: str):
        """(local temporary folder, MDSWriter `out`) for a unit about to be encoded."""
        tmp = self.work / f"{TMP_PREFIX}{unit}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        return tmp, ((str(tmp), self.url(f"{UNIT_PREFIX}{unit}")) if self.remote else str(tmp))

    def commit_unit(self, unit: str, tmp: Path, info: dict) -> dict:
        """Mark the unit finished (its shards and index are in place); returns the unit.json that counts."""
        if self.remote:                                   # the marker goes up after every shard and the index
            shutil.rmtree(tmp, ignore_errors=True)
            marker = self.work / f"{UNIT_PREFIX}{unit}" / UNIT_INFO
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(info, indent=1))
            self.publish(f"{UNIT_PREFIX}{unit}/{UNIT_INFO}")
            return info
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / UNIT_INFO).write_text(json.dumps(info, indent=1))
        final = unit_dir(self.out, unit)
        try:
            os.rename(tmp, final)                         # atomic: the unit exists whole or not at all
        except OSError:                                   # another worker finished it first
            shutil.rmtree(tmp, ignore_errors=True)
            return json.loads((final / UNIT_INFO).read_text())
        return info

    def index_of(self, unit: str):
        """The unit's index.json for streaming's merge_index: a path, or (local copy, URL)."""
        rel = f"{UNIT_PREFIX}{unit}/index.json"
        if not self.remote:
            return self.url(rel)
        download_file(self.url(rel), self.work / rel)           # one client for all (merge_index makes one each)
        return str(self.work / rel), self.url(rel)


def crop_to(image, resolution: int) -> np.ndarray:
    """Resize so the short side is `resolution` (bicubic, antialiased), then centre-crop a square: HWC uint8."""
    from PIL import Image
    w, h = image.size
    if min(w, h) != resolution:
        s = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def writer_bytes(writer) -> int:
    """Bytes of the shards a finished MDSWriter wrote (from its shard list: local copies may be gone)."""
    return sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in writer.shards)


def _ray_node_id() -> str:
    import sys
    if "ray" not in sys.modules:
        return ""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class UnitEncoder:
    """Encodes whole work units into MDS subfolders. Ray Data: batches of unit descriptions in, stats out."""

    def __init__(self, cfg: dict, threads: int = 1):
        t0, c0 = time.time(), time.process_time()
        import torch

        from microdit.encoders import encoder_signature, load_image_autoencoder, load_text_encoder
        torch.set_num_threads(max(1, int(threads)))
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, cfg.get("dtype") or "float32") if self.device == "cuda" else torch.float32
        self.ae = load_image_autoencoder(cfg["image_autoencoder"], device=self.device, dtype=dtype)
        self.te = load_text_encoder(cfg["text_encoder"], device=self.device, dtype=dtype)
        self.signature = encoder_signature(self.ae, self.te)
        self.gpu_type = torch.cuda.get_device_name(0) if self.device == "cuda" else ""
        self.node = _ray_node_id()                       # which Ray node ran this actor ("" without Ray)
        # image decoding and resizing (PIL releases the GIL) use the actor's CPU budget in parallel
        self.pool = ThreadPoolExecutor(max(1, int(threads))) if int(threads) > 1 else None
        # start-up cost (imports, weights), charged to the first unit this worker finishes
        self._setup = (time.time() - t0, time.process_time() - c0)

    def schema(self):
        from microdit.schema import LatentSchema
        s = self.signature
        return LatentSchema(resolutions=tuple(self.cfg["resolutions"]), latent_channels=s["latent_channels"],
                            downsample=s["downsample"], caption_len=s["caption_len"], caption_dim=s["caption_dim"],
                            image_autoencoder=s["image_autoencoder"], text_encoder=s["text_encoder"])

    def __call__(self, batch: dict) -> dict:
        import torch
        stats = []
        with torch.inference_mode():
            for name, path, start, stop in zip(batch["name"], batch["path"], batch["start"], batch["stop"]):
                stats.append(self.encode_unit(WorkUnit(str(name), str(path), int(start), int(stop))))
        return {"name": np.array([s["name"] for s in stats]), "samples": np.array([s["samples"] for s in stats]),
                "info": np.array([json.dumps(s) for s in stats])}

    def encode_unit(self, unit: WorkUnit) -> dict:
        import pyarrow.parquet as pq
        import torch
        from PIL import Image
        from streaming import MDSWriter

        store = LatentStore(self.cfg["out"], self.cfg.get("staging"))
        done = store.unit_info(unit.name)
        if done is not None:                                   # finished by an earlier run
            return done
        t0, c0 = time.time(), time.process_time()
        tmp, writer_out = store.begin_unit(unit.name)
        rows = pq.read_table(unit.path).slice(unit.start, unit.samples).to_pylist()
        schema, res, bs = self.schema(), list(self.cfg["resolutions"]), int(self.cfg["batch_size"])
        gen = torch.Generator(self.device).manual_seed(int(self.cfg.get("seed", 0)) + zlib.crc32(unit.name.encode()))
        skipped, written = {}, 0
        writer = MDSWriter(out=writer_out, columns=schema.columns(), compression=self.cfg.get("compression"),
                           size_limit=int(self.cfg.get("shard_size_limit") or 1 << 26))
        def prepare(row):
            try:
                im = Image.open(io.BytesIO(row["image"])).convert("RGB")
                return {r: crop_to(im, r) for r in res}
            except Exception:                                    # converted data should never fail here
                return None

        for b in range(0, len(rows), bs):
            ok, crops = [], {r: [] for r in res}
            chunk = rows[b:b + bs]
            for row, cropped in zip(chunk, self.pool.map(prepare, chunk) if self.pool else map(prepare, chunk)):
                if cropped is None:
                    skipped["image_corrupt"] = skipped.get("image_corrupt", 0) + 1
                    continue
                ok.append(row)
                for r in res:
                    crops[r].append(cropped[r])
            if not ok:
                continue
            lat = {}
            for r in res:
                x = torch.from_numpy(np.stack(crops[r])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
                lat[r] = self.ae.encode(x.to(self.device), generator=gen).float().cpu().numpy()
            cap = self.te.encode([row["caption"] for row in ok]).float().cpu().numpy()
            for i, row in enumerate(ok):
                sample = {"sample_id": row["sample_id"], "source": row["source"], "caption": row["caption"],
                          "caption_latents": cap[i], "meta": json.loads(row["meta"] or "{}"),
                          **{schema.latent_key(r): lat[r][i] for r in res}}
                writer.write(schema.encode_sample(sample))
                written += 1
        writer.finish()
        (setup_s, setup_cpu), self._setup = self._setup, (0.0, 0.0)
        seconds = time.time() - t0 + setup_s
        info = {"name": unit.name, "samples": written, "bytes": writer_bytes(writer), "skipped": skipped,
                "seconds": seconds, "setup_seconds": setup_s, "cpu_seconds": time.process_time() - c0 + setup_cpu,
                "gpu_seconds": seconds if self.device == "cuda" else 0.0,
                "gpu_type": self.gpu_type, "device": self.device, "pid": os.getpid(), "node": self.node,
                "finished_at": time.time(),
                "signature": self.signature, "schema": schema.to_dict()}
        return store.commit_unit(unit.name, tmp, info)
