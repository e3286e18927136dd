"""The training reader: MosaicML streaming over one or more precomputed latent sets.

    from microdit.data import latent_loader
    loader = latent_loader(["data/shapes-latents"], resolution=16, batch_size=64, seed=0, run_dir="runs/s1")
    for batch in loader: batch["latents"] (N, C, h, w) float32, batch["caption"] (N, L, Dc) float32

A latent set is the folder `dataprep.precompute` writes: MDS shards (indexes merged at the top),
`schema.json` (microdit.schema.LatentSchema) and `manifest.json`. Several sets are mixed by
proportion (`streaming.Stream(proportion=...)`); the order is deterministic for a seed; the position
is resumable (`loader.state_dict()` / `loader.load_state_dict()`, StreamingDataLoader). Caption dropout
is applied by the trainer with its own checkpointed generator (`caption_dropout`), so that it too
replays exactly after a resume. Only the columns training needs are decoded (one resolution's latents,
the caption embeddings, the id), local shards are read through a memory map, and a batch is cast to
float32 once (`decode_only`, `collate_latents`); `python -m dataprep.data_bench` measures it.

Streaming keeps file locks in $TMPDIR and shared memory in /dev/shm. `prepare_run_tmp` gives each run
its own TMPDIR (cleared at start) and unlinks the shared memory a previous, killed run of the same
folder left behind (only its own prefix, recorded with its pid; never another live process's).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .schema import LatentSchema

SHM_RECORD = "streaming_shm.json"


# --------------------------------------------------------------------------------------------
#                                    Schema validation
# --------------------------------------------------------------------------------------------

def index_columns(folder) -> dict[str, str]:
    """Column name -> encoding of the MDS shards under `folder` (from the merged index.json)."""
    path = Path(folder) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {folder} holds no merged MDS index (run "
                                "`python -m dataprep.precompute` to completion, or merge the writers' indexes)")
    shards = json.loads(path.read_text()).get("shards", [])
    if not shards:
        raise ValueError(f"{path} lists no shards: the latent set {folder} is empty")
    cols = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"]))
    for s in shards[1:]:
        if dict(zip(s["column_names"], s["column_encodings"])) != cols:
            raise ValueError(f"{path}: shards disagree on their columns ({s['raw_data']['basename']})")
    return cols


def open_latent_sets(folders, resolution: int | None = None) -> LatentSchema:
    """Read and cross-check the schema.json of every set against its shards; return the common schema."""
    if not folders:
        raise ValueError("no latent set given")
    schemas = []
    for f in folders:
        schema = LatentSchema.read(f)
        schema.check_columns(index_columns(f), where=str(f))
        if resolution is not None and int(resolution) not in [int(r) for r in schema.resolutions]:
            raise ValueError(f"{f}: schema.json has latents for resolutions {list(schema.resolutions)}, "
                             f"not {resolution}; train at one of those or precompute {resolution} px")
        schemas.append(schema)
    first = schemas[0]
    for f, s in zip(folders[1:], schemas[1:]):
        for attr in ("latent_channels", "downsample", "caption_len", "caption_dim", "image_autoencoder",
                     "text_encoder"):
            if getattr(s, attr) != getattr(first, attr):
                raise ValueError(f"latent sets {folders[0]} and {f} differ in {attr} ({getattr(first, attr)!r} vs "
                                 f"{getattr(s, attr)!r}): sets mixed in one run must share the encoders")
    return first


# --------------------------------------------------------------------------------------------
#                                        The dataset
# --------------------------------------------------------------------------------------------

def _to_tensor(arr) -> torch.Tensor:
    # Streaming's decoded arrays are read-only views of the shard: copy before torch.from_numpy.
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def collate_latents(items: list) -> dict:
    """Stack a batch of float16 samples once and cast to float32 (cheaper than per-sample casts)."""
    return {"latents": torch.from_numpy(np.stack([it["latents"] for it in items])).float(),
            "caption": torch.from_numpy(np.stack([it["caption"] for it in items])).float(),
            "sample_id": [it["sample_id"] for it in items]}


def _decoder(encoding: str):
    """bytes -> value for one MDS column encoding, parsed once (streaming re-parses it every sample)."""
    kind, _, rest = encoding.partition(":")
    if kind == "ndarray" and rest.count(":") == 1:          # ndarray:<dtype>:<shape>: fixed shape
        dtype, shape = rest.split(":")
        dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape.split(","))
        return lambda b: np.frombuffer(b, dtype).reshape(shape)
    if kind == "str":
        return lambda b: bytes(b).decode("utf-8")
    from streaming.base.format.mds.encodings import mds_decode
    return lambda b: mds_decode(encoding, b)


class _ColumnDecoder:
    """An MDS shard's `decode_sample` that decodes only the columns in `keep`.

    Training reads one resolution's latents and the caption embeddings; the other resolutions'
    latents, the caption text and the meta JSON are skipped (they are most of a sample's bytes)."""

    def __init__(self, shard, keep):
        self.sizes = list(shard.column_sizes)           # None = variable size, stored in the sample header
        self.names = list(shard.column_names)
        self.header = self.sizes.count(None)
        missing = set(keep) - set(self.names)
        if missing:
            raise KeyError(f"MDS shard {shard.raw_data.basename} has no column(s) {sorted(missing)}")
        self.decoders = {n: _decoder(e) for n, e in zip(self.names, shard.column_encodings) if n in keep}

    def __call__(self, data: bytes) -> dict:
        var = iter(np.frombuffer(data, np.uint32, self.header).tolist())
        idx, out = 4 * self.header, {}
        for name, size in zip(self.names, self.sizes):
            size = size or next(var)
            if name in self.decoders:
                out[name] = self.decoders[name](data[idx:idx + size])
            idx += size
        return out


class _MappedSampleReader:
    """An MDS shard's `get_sample_data` over one read-only memory map of the shard file (streaming
    opens the file once per sample, which costs more than decoding a small latent). Only for
    streams without a remote: their shards are never evicted, so the mapping stays valid."""

    def __init__(self, shard):
        self.path = os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)
        self._map = None

    def __getstate__(self):                 # a memory map is per process: re-open after pickling
        return {"path": self.path, "_map": None}

    def __call__(self, idx: int) -> bytes:
        if self._map is None:
            with open(self.path, "rb") as f:
                # MAP_POPULATE: fault the (page-cached) shard in at once, not page by page per sample
                self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                      prot=mmap.PROT_READ)
        begin, end = np.frombuffer(self._map, np.uint32, 2, (1 + idx) * 4)
        if end <= begin:
            raise IndexError(f"sample {idx} is not present in {self.path}")
        return self._map[begin:end]


def decode_only(dataset, keep) -> None:
    """Make every MDS shard of a streaming dataset decode just the `keep` columns (and read local
    shards through a memory map)."""
    from streaming.base.format.mds.reader import MDSReader
    for shard, stream_id in zip(dataset.shards, dataset.stream_per_shard):
        if isinstance(shard, MDSReader):
            shard.decode_sample = _ColumnDecoder(shard, keep)
            if dataset.streams[int(stream_id)].remote is None:
                shard.get_sample_data = _MappedSampleReader(shard)


def _make_dataset_class():
    from streaming import StreamingDataset

    class LatentStreamingDataset(StreamingDataset):
        """Yields {"latents": (C, h, w), "caption": (L, Dc)} float16 arrays and the sample id
        (`collate_latents` stacks a batch into float32 tensors)."""

        def __init__(self, *, latent_key: str, **kwargs):
            self.latent_key = latent_key
            super().__init__(**kwargs)
            decode_only(self, (latent_key, "caption_latents", "sample_id"))

        def __getitem__(self, idx: int) -> dict:
            s = super().__getitem__(idx)
            return {"latents": s[self.latent_key], "caption": s["caption_latents"], "sample_id": s["sample_id"]}

    return LatentStreamingDataset


def latent_loader(folders, resolution: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                  proportions=None, run_dir=None, drop_last: bool = True):
    """A resumable StreamingDataLoader over `folders` (per-rank `batch_size`), latents at `resolution` px."""
    from streaming import Stream, StreamingDataLoader
    folders = [str(Path(f).resolve()) for f in folders]
    open_latent_sets(folders, resolution)
    tmp = prepare_run_tmp(run_dir) if run_dir is not None else None
    if proportions:
        streams = [Stream(local=f, proportion=float(p)) for f, p in zip(folders, proportions)]
    else:
        streams = [Stream(local=f) for f in folders]
    cls = _make_dataset_class()
    with _tmpdir(tmp):           # streaming places its file locks in gettempdir() at construction
        ds = cls(latent_key=LatentSchema.latent_key(resolution), streams=streams, shuffle=shuffle,
                 shuffle_seed=int(seed), batch_size=batch_size, num_canonical_nodes=1,
                 sampling_method="fixed" if proportions else "balanced")
    if run_dir is not None:
        record_shm_prefix(run_dir, ds)
    return StreamingDataLoader(ds, batch_size=batch_size, num_workers=0, drop_last=drop_last,
                               collate_fn=collate_latents)


def caption_dropout(caption: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample's caption embedding with probability p (the unconditional branch of guidance)."""
    if p <= 0:
        return caption
    keep = torch.rand(caption.shape[0], generator=generator) >= p
    return caption * keep.to(caption.dtype).view(-1, *([1] * (caption.dim() - 1))).to(caption.device)


class LatentSet(torch.utils.data.Dataset):
    """Map-style, random-access view of one latent set (validation, sample captions); no shared memory."""

    def __init__(self, folder, resolution: int):
        from streaming import LocalDataset
        self.schema = open_latent_sets([folder], resolution)
        self.key = LatentSchema.latent_key(resolution)
        self._ds = LocalDataset(local=str(folder))

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        s = self._ds[int(i)]
        return {"latents": _to_tensor(s[self.key]), "caption": _to_tensor(s["caption_latents"]),
                "caption_text": s["caption"], "sample_id": s["sample_id"], "meta": s.get("meta") or {}}

    def batch(self, indices) -> dict:
        items = [self[i] for i in indices]
        return {"latents": torch.stack([it["latents"] for it in items]),
                "caption": torch.stack([it["caption"] for it in items]),
                "caption_text": [it["caption_text"] for it in items], "meta": [it["meta"] for it in items]}


# --------------------------------------------------------------------------------------------
#                          Per-run temporary folder and shared memory
# --------------------------------------------------------------------------------------------

def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def _tmpdir(path):
    """TMPDIR = path inside the block (restored after), so streaming's locks live in the run folder."""
    if path is None:
        yield
        return
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None


def prepare_run_tmp(run_dir) -> Path:
    """run_dir/tmp for streaming's file locks, cleared at the start of a run; unlink the shared
    memory a previous (dead) process of this run left behind."""
    tmp = Path(run_dir) / "tmp"
    if _local_rank() == 0:
        _unlink_dead_run_shm(tmp / SHM_RECORD)
        if tmp.exists() and not _owned_by_live_peer(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    return tmp


def _owned_by_live_peer(tmp: Path) -> bool:
    rec = tmp / SHM_RECORD
    if not rec.exists():
        return False
    pid = json.loads(rec.read_text()).get("pid", 0)
    return pid != os.getpid() and _alive(pid)


def record_shm_prefix(run_dir, dataset) -> None:
    if _local_rank() != 0:
        return
    rec = Path(run_dir) / "tmp" / SHM_RECORD
    rec.write_text(json.dumps({"pid": os.getpid(), "prefix": int(dataset._shm_prefix_int)}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _unlink_dead_run_shm(record: Path) -> None:
    if not record.exists():
        return
    d = json.loads(record.read_text())
    if _alive(int(d.get("pid", 0))) and d.get("pid") != os.getpid():
        return
    from multiprocessing import shared_memory

    from streaming.base.constant import SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path
    for name in SHM_TO_CLEAN:
        try:
            shm = shared_memory.SharedMemory(_get_path(int(d["prefix"]), name), create=False)
        except (FileNotFoundError, PermissionError):
            continue
        shm.close()
        shm.unlink()
    record.unlink(missing_ok=True)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
