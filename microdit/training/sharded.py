"""Sharded, asynchronous checkpoints with torch.distributed.checkpoint (DCP), read back without pickles.

Every rank writes its own shard of the model, the optimizer moments and the EMA (`shards/`, one
`__<rank>_0.distcp` file each plus DCP's `.metadata`) in a background thread: training continues while
the files are written. A checkpoint is written under `checkpoints/.step_<N>.tmp/` and renamed into place
once every rank's shard and the metadata are on disk; the next save, and the end of the stage, wait for
the previous one first. DCP records where each piece of each tensor lives, so a checkpoint written by
N ranks loads onto any number of ranks (FSDP2, DDP or one process).

DCP's own reader unpickles `.metadata` and, for non-tensor entries, calls torch.load(weights_only=False):
both can run code from a planted file. `SafeReader` unpickles the metadata with an allow-list of DCP's
metadata classes and refuses non-tensor entries and file names that leave the folder; tensor files are
read with torch.load(weights_only=True). Non-tensor state (counters, scheduler, data position, RNG) is
JSON + safetensors (`state.save_state`).

    # how long saves hold training up, blocking vs asynchronous (side by side, one process):
    OMP_NUM_THREADS=1 python -m microdit.training.sharded --preset MicroDiT_Micro_2 --saves 3
"""
from __future__ import annotations

import io
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..cli import check_positive, run_cli
from .state import (CorruptCheckpoint, UnsafeCheckpoint, checkpoint_dirs, load_state, save_state,
                    step_folder)

SHARDS = "shards"
# DCP warns on every call made without a process group (also from its writer thread); one process is meant.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# Everything DCP's `.metadata` pickle may name (torch 2.14); dtypes are checked separately.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(folder):
    """DCP metadata of `folder` (a `shards/` folder), unpickled with the allow-list and checked."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
    path = Path(folder) / ".metadata"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"{path} cannot be read ({e})") from e
    try:
        md = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        if "is not part of" in str(e):
            raise UnsafeCheckpoint(f"{path} names {str(e).split(' is not')[0]}, which could run code when "
                                   f"loaded: refused. Delete {Path(folder).parent} to resume from an earlier "
                                   "checkpoint") from None
        raise CorruptCheckpoint(f"{path} is not a DCP metadata file ({e})") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CorruptCheckpoint(f"{path} is not a DCP metadata file ({type(e).__name__}: {e})") from e
    if not isinstance(md, Metadata):
        raise CorruptCheckpoint(f"{path} is not a DCP metadata file")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeCheckpoint(f"{path}: entry {key!r} is not a tensor (it would be unpickled): refused")
    for info in (md.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise UnsafeCheckpoint(f"{path} points outside its folder ({name!r}): refused")
    return md


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata is unpickled with an allow-list (see the module docstring)."""

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpoint(f"{self.path}: per-rank metadata files are not used here")
        md = read_metadata(self.path)
        from torch.distributed.checkpoint.metadata import StorageMeta
        md.storage_meta = md.storage_meta or StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


# ---- what a checkpoint holds --------------------------------------------------------------------

def train_tensors(model, optimizer, ema_shadow: dict | None = None) -> tuple[dict, list]:
    """(the tensors a checkpoint holds, the optimizer's hyper-parameters): model, optimizer moments and
    EMA as this rank holds them (its shards under FSDP2), saved and loaded in place by DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optimizer": optimizer_state["state"]}
    if ema_shadow is not None:
        tensors["ema"] = ema_shadow
    return tensors, optimizer_state["param_groups"]


def load_train_tensors(model, optimizer, tensors: dict, param_groups: list) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups})


# ---- writing ------------------------------------------------------------------------------------

class CheckpointWriter:
    """Writes checkpoints/step_<N>/ (shards from every rank, state and whole-model export from rank 0).

    save() returns once this rank's tensors are copied to host memory (staged); the files are written
    in a background thread. A finished save is renamed into place by rank 0 (whose write completes
    last: DCP's metadata is written after every rank's shard), at the next poll(), save() or wait();
    then only the last `keep` are kept.
    """

    def __init__(self, out_dir, keep: int, rank: int = 0, group=None, asynchronous: bool = True):
        self.out_dir, self.keep, self.rank, self.group = Path(out_dir), keep, rank, group
        self.asynchronous = asynchronous
        self.pending = None                 # (future, tmp folder, target folder, export thread)
        self.blocked_seconds: list[float] = []    # how long each save held training up

    def save(self, step: int, tensors: dict, state: dict | None, fill=None, block: bool = False) -> Path:
        """Rank 0 passes `state` (small: JSON + safetensors) and `fill(folder)` (the whole-model
        export, run in a thread of its own); block=True returns only when the checkpoint is in place."""
        import threading
        t0 = time.perf_counter()
        self.wait()
        target = step_folder(self.out_dir, step)
        tmp = target.with_name(f".{target.name}.tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_state(tmp, state)
        if dist.is_initialized():
            dist.barrier(group=self.group)          # the folder exists, empty of older files, on every rank
        export = threading.Thread(target=fill, args=(tmp,)) if self.rank == 0 and fill is not None else None
        if export is not None:
            export.start()
        # Not fsynced, like the rest of the run folder: a kill at any moment is safe (rename), a power
        # loss may cost the newest checkpoint (resume then falls back to the previous one).
        writer = dcp.FileSystemWriter(str(tmp / SHARDS), thread_count=1, sync_files=False)
        kw = dict(storage_writer=writer, process_group=self.group, no_dist=not dist.is_initialized())
        if self.asynchronous and not block:
            future = dcp.async_save(tensors, **kw)
        else:
            dcp.save(tensors, **kw)
            future = None
        self.pending = (future, tmp, target, export)
        if block or not self.asynchronous:
            self.wait()
        self.blocked_seconds.append(time.perf_counter() - t0)
        return target

    def poll(self) -> None:
        """Put a finished background save in place (no waiting, no collective)."""
        if self.pending is not None and (self.pending[0] is None or self.pending[0].done()) and (
                self.pending[3] is None or not self.pending[3].is_alive()):
            self.wait()

    def wait(self) -> Path | None:
        """Finish the pending save (if any): wait for its files, rename it into place; returns its folder."""
        if self.pending is None:
            return None
        future, tmp, target, export = self.pending
        self.pending = None
        if future is not None:
            future.result()
        if export is not None:
            export.join()
        if self.rank == 0:
            if target.exists():             # the same step written again (a rerun after a fallback)
                shutil.rmtree(target)
            os.replace(tmp, target)
            for old in checkpoint_dirs(self.out_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        return target


# ---- reading ------------------------------------------------------------------------------------

def load_into(folder, tensors: dict, group=None) -> dict:
    """Fill `tensors` (this rank's shards, in place) from checkpoint `folder`; return its small state.

    UnsafeCheckpoint when a file could run code; CorruptCheckpoint when a file cannot be read (on every
    rank alike: DCP gathers the failures of all ranks).
    """
    folder = Path(folder)
    state = load_state(folder)
    read_metadata(folder / SHARDS)
    try:
        dcp.load(tensors, storage_reader=SafeReader(str(folder / SHARDS)), process_group=group,
                 no_dist=not dist.is_initialized())
    except CheckpointException as e:
        first = next(iter(e.failures.values()), (e, None))[0]
        if isinstance(first, UnsafeCheckpoint):
            raise first from None
        raise CorruptCheckpoint(f"checkpoint {folder} cannot be read ({type(first).__name__}: "
                                f"{str(first).splitlines()[0] if str(first) else ''})") from None
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CorruptCheckpoint(f"checkpoint {folder} cannot be read ({type(e).__name__}: {e})") from e
    return state


def load_latest(out_dir, make_tensors, group=None) -> tuple[Path | None, dict | None, dict | None]:
    """(folder, small state, tensors) of the newest readable checkpoint, its tensors loaded into
    `make_tensors()` (called once, when there is a checkpoint); unreadable ones are named in a warning
    and the previous one is tried; a planted pickle is refused (UnsafeCheckpoint)."""
    tensors = None
    for folder in reversed(checkpoint_dirs(out_dir)):
        tensors = make_tensors() if tensors is None else tensors
        try:
            return folder, load_into(folder, tensors, group), tensors
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; resuming from the previous checkpoint instead", stacklevel=2)
    return None, None, None


# ---- benchmark ----------------------------------------------------------------------------------

def bench(preset: str = "MicroDiT_Micro_2", saves: int = 3, steps_between: int = 4, rounds: int = 2,
          out="/tmp/microdit-checkpoint-bench") -> list[dict]:
    """How long checkpoint saves hold training up, blocking vs asynchronous, side by side (ABAB) in one
    process: `steps_between` training steps of `preset` (batch 4 at 16 latent px, 1024-wide captions),
    then a save of model + AdamW moments + EMA, `saves` times per run."""
    from ..model import create_model
    torch.manual_seed(0)
    model = create_model(preset, latent_res=16, in_channels=4, caption_channels=1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.randn(4, 77, 1024)

    def train_steps() -> None:
        for _ in range(steps_between):
            (model(x, t, y) - x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    rows = []
    for r in range(rounds):
        for mode in ("blocking", "async"):
            folder = Path(out) / f"{mode}{r}"
            shutil.rmtree(folder, ignore_errors=True)
            writer = CheckpointWriter(folder, keep=1, asynchronous=mode == "async")
            t0 = time.perf_counter()
            for i in range(saves):
                train_steps()
                tensors, _ = train_tensors(model, optimizer, ema)
                writer.save(i, tensors, {"step": i})
            writer.wait()
            total = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            rows.append({"mode": mode, "round": r, "checkpoint_mb": round(size / 2**20, 1),
                         "held_up_s_per_save": round(sum(writer.blocked_seconds) / saves, 3),
                         "wall_s": round(total, 2)})
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv=None) -> None:
    import argparse
    import json
    p = argparse.ArgumentParser(prog="python -m microdit.training.sharded", description=bench.__doc__)
    p.add_argument("--preset", default="MicroDiT_Micro_2")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=4)
    a = p.parse_args(argv)
    check_positive(saves=a.saves, steps_between=a.steps_between)
    for row in bench(a.preset, a.saves, a.steps_between):
        print(json.dumps(row))


if __name__ == "__main__":
    run_cli(main)
