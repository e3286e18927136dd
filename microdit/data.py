"""The training reader: MosaicML streaming over one or more precomputed latent sets.

    from microdit.data import latent_loader, to_device
    loader = latent_loader(["data/shapes-latents"], resolution=16, batch_size=64, seed=0, run_dir="runs/s1")
    for batch in loader: x, y = to_device(batch, "cuda")    # (N, C, h, w), (N, L, Dc) float32 on the device

A latent set is the folder `dataprep.precompute` writes: MDS shards (indexes merged at the top),
`schema.json` (microdit.schema.LatentSchema) and `manifest.json`, or the same in object storage
(`s3://bucket/prefix`: streamed through a local cache bounded by `cache_limit`). Several sets are mixed
by proportion (`streaming.Stream(proportion=...)`); the order is deterministic for a seed and
`num_canonical_nodes`; the position is resumable (`loader.state_dict()` / `loader.load_state_dict()`,
StreamingDataLoader). Caption dropout is applied by the trainer with its own checkpointed generator
(`caption_dropout`), so that it too replays exactly after a resume. Only the columns training needs are
decoded (one resolution's latents, the caption embeddings, the id), local shards are read through a
memory map, batches are stacked in DataLoader workers as float16 (pinned when CUDA is there) and cast
to float32 on the device (`decode_only`, `collate_latents`, `to_device`); `python -m dataprep.data_bench`
measures it.

Streaming keeps file locks in $TMPDIR and shared memory in /dev/shm: `microdit.streaming_tmp` gives
each run its own TMPDIR and unlinks what a killed run of the same folder left behind.
"""
from __future__ import annotations

import contextlib

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .schema import LatentSchema
from .storage import cache_folder, download_file, is_remote, join, read_json
from .streaming_tmp import _tmpdir, prepare_run_tmp, record_shm_prefix

__all__ = ["latent_loader", "to_device", "close_loader", "LatentSet", "caption_dropout", "open_latent_sets",
           "index_columns", "collate_latents", "decode_only", "local_view", "prepare_run_tmp"]


# --------------------------------------------------------------------------------------------
#                                    Schema validation
# --------------------------------------------------------------------------------------------

def index_columns(folder) -> dict[str, str]:
    """Column name -> encoding of the MDS shards under `folder` or URL (from the merged index.json)."""
    path = join(folder, "index.json")
    index = read_json(path)
    if index is None:
        raise FileNotFoundError(f"{path} is missing: {folder} holds no merged MDS index (run "
                                "`python -m dataprep.precompute` to completion, or merge the writers' indexes)")
    shards = index.get("shards", [])
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


def _stack(arrays: list) -> torch.Tensor:
    """One copy: the samples are stacked straight into the batch tensor, which a DataLoader worker
    allocates in shared memory (so handing it to the training process copies nothing more)."""
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    np.stack(arrays, out=out.numpy())
    return out


def collate_latents(items: list) -> dict:
    """Stack a batch as stored (float16): half the bytes to copy, pin and move; `to_device` casts."""
    return {"latents": _stack([it["latents"] for it in items]), "caption": _stack([it["caption"] for it in items]),
            "sample_id": [it["sample_id"] for it in items]}


def to_device(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, caption) of a loader batch on `device` as float32: moved as float16 (from pinned
    memory without blocking when on CUDA), cast there, not on the host's main thread."""
    return (batch["latents"].to(device, non_blocking=True).float(),
            batch["caption"].to(device, non_blocking=True).float())


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
                  proportions=None, run_dir=None, drop_last: bool = True, cache_dir=None, cache_limit=None,
                  num_canonical_nodes: int = 1, num_workers: int = 0, pin_memory: bool | None = None):
    """A resumable StreamingDataLoader over `folders` (per-rank `batch_size`), latents at `resolution` px.

    folders: local set folders and/or object-storage URLs. A URL streams through a local cache
    (`cache_dir`, default <run_dir>/cache) bounded by `cache_limit` ("50gb", bytes; None = unbounded):
    shards are downloaded ahead of use and the least recently used evicted. Local folders are read in
    place through a memory map. num_canonical_nodes fixes the shuffle (keep it across resumes);
    num_workers DataLoader processes decode and stack batches; pin_memory (default: when CUDA is
    available) lets `to_device` copy without blocking.
    """
    from streaming import Stream, StreamingDataLoader
    open_latent_sets(list(folders), resolution)
    cache_dir = cache_dir if cache_dir is not None else (Path(run_dir) / "cache" if run_dir is not None else None)
    views = [local_view(f, cache_dir) for f in folders]
    tmp = prepare_run_tmp(run_dir) if run_dir is not None else None
    props = [float(p) for p in proportions] if proportions else [None] * len(views)
    streams = [Stream(remote=remote, local=local, proportion=p) for (remote, local), p in zip(views, props)]
    any_remote = any(remote is not None for remote, _ in views)
    cls = _make_dataset_class()
    with _tmpdir(tmp), _transient_prefix_scan():   # file locks in gettempdir(); see _transient_prefix_scan
        ds = cls(latent_key=LatentSchema.latent_key(resolution), streams=streams, shuffle=shuffle,
                 shuffle_seed=int(seed), batch_size=batch_size, num_canonical_nodes=int(num_canonical_nodes),
                 sampling_method="fixed" if proportions else "balanced",
                 cache_limit=cache_limit if any_remote else None)   # never evict a local set's own shards
    if run_dir is not None:
        record_shm_prefix(run_dir, ds)
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    return StreamingDataLoader(ds, batch_size=batch_size, num_workers=int(num_workers), drop_last=drop_last,
                               collate_fn=collate_latents, pin_memory=pin,
                               persistent_workers=int(num_workers) > 0)


@contextlib.contextmanager
def _transient_prefix_scan():
    """While a StreamingDataset looks for a free shared-memory name it attaches to the blocks of every live
    dataset and registers each handle to be closed at exit, so a process leaks descriptors in proportion to
    datasets made x datasets alive. Handles attached here (never created) close when dropped instead."""
    from streaming.base.shared import prefix
    from streaming.base.shared.memory import SharedMemory

    def attach_or_create(name=None, create=None, size=0, auto_cleanup=True):
        return SharedMemory(name, create, size, auto_cleanup=auto_cleanup and create is not False)
    prefix.SharedMemory = attach_or_create
    try:
        yield
    finally:
        prefix.SharedMemory = SharedMemory


def close_loader(loader) -> None:
    """Stop a loader's background threads (streaming keeps downloading ahead until told) and release its
    shared memory: streaming holds each block open until the process exits (six file descriptors per
    dataset), so a process that trains stage after stage would otherwise run out of descriptors."""
    event = getattr(loader.dataset, "_event", None)
    if event is not None:
        event.set()
    release_shared_memory(loader.dataset)


def release_shared_memory(dataset) -> None:
    """Close (and, where this process created them, unlink) a StreamingDataset's shared-memory blocks now,
    instead of at exit. Call it only when no process will read the dataset again."""
    import atexit
    from streaming.base.shared.memory import SharedMemory

    def visit(obj, depth: int) -> None:
        if isinstance(obj, SharedMemory):
            atexit.unregister(obj.cleanup)
            try:
                obj.cleanup()
            except BufferError:           # a view of the block is still alive: leave it to exit
                atexit.register(obj.cleanup)
            return
        if depth < 3:
            for value in list(vars(obj).values()) if hasattr(obj, "__dict__") else ():
                if obj is dataset or type(value).__module__.startswith("streaming.base.shared"):
                    visit(value, depth + 1)
    visit(dataset, 0)


def default_cache_dir() -> Path:
    """Where remote sets are cached when no folder is given: $TMPDIR/microdit-cache."""
    return Path(tempfile.gettempdir()) / "microdit-cache"


def local_view(folder, cache_dir=None) -> tuple[str | None, str]:
    """(remote, local) of a latent set: a folder is read in place (remote None); a URL gets a local
    cache folder under `cache_dir` with its index.json and schema.json fetched now (shards on demand)."""
    if not is_remote(folder):
        return None, str(Path(folder).resolve())
    url = str(folder).rstrip("/")
    local = cache_folder(url, cache_dir if cache_dir is not None else default_cache_dir())
    for name in ("index.json", "schema.json"):    # small; written then renamed, so ranks may race safely
        download_file(join(url, name), local / name)
    return url, str(local)


def caption_dropout(caption: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero each sample's caption embedding with probability p (the unconditional branch of guidance)."""
    if p <= 0:
        return caption
    keep = torch.rand(caption.shape[0], generator=generator) >= p
    return caption * keep.to(caption.dtype).view(-1, *([1] * (caption.dim() - 1))).to(caption.device)


class LatentSet(torch.utils.data.Dataset):
    """Map-style, random-access view of one latent set (validation, sample captions); no shared memory.
    A URL is read through a local cache folder: only the shards of the samples asked for are fetched."""

    def __init__(self, folder, resolution: int, cache_dir=None):
        from streaming import LocalDataset
        self.schema = open_latent_sets([folder], resolution)
        self.key = LatentSchema.latent_key(resolution)
        self.remote, local = local_view(folder, cache_dir)
        self._ds = LocalDataset(local=local)

    def __len__(self) -> int:
        return len(self._ds)

    def _fetch_shard(self, i: int) -> None:
        shard = self._ds.shards[self._ds.spanner[i][0]]
        name = (shard.zip_data or shard.raw_data).basename
        path = Path(self._ds.local) / name
        if not path.exists():
            download_file(join(self.remote, name), path)

    def __getitem__(self, i: int) -> dict:
        if self.remote is not None:
            self._fetch_shard(int(i))
        s = self._ds[int(i)]
        return {"latents": _to_tensor(s[self.key]), "caption": _to_tensor(s["caption_latents"]),
                "caption_text": s["caption"], "sample_id": s["sample_id"], "meta": s.get("meta") or {}}

    def batch(self, indices) -> dict:
        items = [self[i] for i in indices]
        return {"latents": torch.stack([it["latents"] for it in items]),
                "caption": torch.stack([it["caption"] for it in items]),
                "caption_text": [it["caption_text"] for it in items], "meta": [it["meta"] for it in items]}
