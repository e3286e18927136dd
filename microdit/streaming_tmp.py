"""Streaming's per-run temporary files: each training run's own TMPDIR for the file locks, and the
shared memory a killed run left in /dev/shm, unlinked at the next start of the same run.

    from microdit.streaming_tmp import prepare_run_tmp
    tmp = prepare_run_tmp("runs/s1")        # runs/s1/tmp, cleared; a dead run's shared memory unlinked

Only the run's own prefix (recorded with its pid in tmp/streaming_shm.json) is ever unlinked, never a
live process's. Used by `microdit.data.latent_loader`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

SHM_RECORD = "streaming_shm.json"


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
