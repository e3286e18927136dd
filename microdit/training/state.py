"""Checkpoints and exact resume, stored so that reading them can never run code.

A stage folder (TrainConfig.out_dir) holds:

    checkpoints/step_00000100/   resumable:
        shards/                  model, optimizer moments, EMA: one file per rank + DCP's .metadata
                                 (torch.distributed.checkpoint; loads onto any number of ranks)
        train_state.json         step, counters, scheduler, data-loader position, optimizer
                                 hyper-parameters (plain JSON)
        train_state.safetensors  every micro-step slot's RNG generators
        model.safetensors + config.json + train_config.json   the weights whole (EMA when kept),
                                 loadable by the pipeline like final/
    final/                       the stage's result: model.safetensors + config.json + train_config.json
                                 + manifest.json (kind "checkpoint")
    metrics.jsonl, tensorboard/, samples/, tmp/

Folders are written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one. Only the last K are kept. The shards
are written in the background (`sharded.CheckpointWriter`) while training goes on.

Every file of a run folder is treated as untrusted (a shared `runs/`, a copied run): the state is JSON
and safetensors, the shards' metadata is unpickled with an allow-list of DCP's classes
(`sharded.SafeReader`), and a `train_state.pt` (pickle) is refused, not opened. A checkpoint that
cannot be read (a truncated file, a disk error) is named in a warning and resume falls back to the
previous one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..cli import UserError
from ..manifest import write_json_atomic

STATE_NAME, TENSORS_NAME, CONFIG_NAME = "train_state.json", "train_state.safetensors", "train_config.json"
PICKLE_NAMES = ("train_state.pt",)          # older, unsafe format: refused
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class UnsafeCheckpoint(UserError):
    """A run folder holds a file whose loading could run code (a pickle): it is refused, never opened."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint's files cannot be read back (truncated, malformed)."""


def checkpoint_dirs(out_dir) -> list[Path]:
    """Finished resumable checkpoints of a stage, oldest first (pickle-format ones included: they are
    refused when resume reaches them)."""
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             any((p / n).exists() for n in (STATE_NAME, *PICKLE_NAMES))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def check_saved_config(cfg) -> None:
    """A stage folder trained (or started) with another config is refused, not resumed or reused."""
    from .config import check_same_run
    out = Path(cfg.out_dir)
    for folder in [out / "final", *reversed(checkpoint_dirs(out))]:
        try:
            saved = json.loads((folder / CONFIG_NAME).read_text())
        except (OSError, ValueError):          # absent or unreadable: the next one (resume skips it too)
            continue
        check_same_run(cfg, saved, folder / CONFIG_NAME)
        return


def write_folder_atomically(target: Path, fill) -> Path:
    """Call fill(tmp_folder), then rename tmp_folder to target (replacing an older target)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if target.exists():                      # only ever for final/ re-written by a forced rerun
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def step_folder(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


# ---- the training state as JSON + safetensors ---------------------------------------------------

def save_state(folder, state: dict) -> None:
    """Nested dicts/lists of plain values and (small) tensors -> train_state.json + train_state.safetensors."""
    from safetensors.torch import save_file
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, "", tensors)
    folder = Path(folder)
    save_file(tensors, str(folder / TENSORS_NAME))
    write_json_atomic(folder / STATE_NAME, doc)


def load_state(folder) -> dict:
    folder = Path(folder)
    for name in PICKLE_NAMES:
        if (folder / name).exists() and not (folder / STATE_NAME).exists():
            raise UnsafeCheckpoint(
                f"{folder / name} is a pickle, which can run code when loaded: refused. Checkpoints are "
                f"{STATE_NAME} + {TENSORS_NAME}; delete {folder} (or the run folder) to start over")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        doc = json.loads((folder / STATE_NAME).read_text())
        tensors = load_file(str(folder / TENSORS_NAME))
        return _decode(doc, tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CorruptCheckpoint(f"checkpoint {folder} cannot be read ({type(e).__name__}: {e})") from e


def _encode(obj, path: str, tensors: dict):
    """JSON-able structure; tensors replaced by {"tensor": key} and stored under `key` in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        return {"items": [[_encode(k, f"{path}/k{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                          for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, f"{path}/{i}", tensors)
                                                                for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if hasattr(obj, "item"):                   # numpy scalars
        return {"value": obj.item()}
    raise TypeError(f"training state at {path or '/'}: {type(obj).__name__} is neither a plain value nor a tensor")


def _decode(doc, tensors: dict):
    (kind, v), = doc.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {k: _decode(x, tensors) for k, x in v.items()}
    if kind == "items":
        return {_decode(k, tensors): _decode(x, tensors) for k, x in v}
    if kind == "list":
        return [_decode(x, tensors) for x in v]
    if kind == "tuple":
        return tuple(_decode(x, tensors) for x in v)
    if kind == "value":
        return v
    raise ValueError(f"unknown entry kind {kind!r}")


def clean_partial(out_dir) -> None:
    """Remove temporary folders a killed run left behind."""
    for root in (Path(out_dir), Path(out_dir) / "checkpoints"):
        if root.exists():
            for p in root.iterdir():
                if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


# ---- RNG -----------------------------------------------------------------------------------------
# Random draws come from one set of generators per micro-step slot: slot k * world_size + rank is
# micro-step k of `rank`, which is also where its samples sit in the global batch (streaming deals
# samples to ranks in turn). A checkpoint keeps every slot's state, so a run resumed on a different
# number of ranks with the same micro-batch continues each slot's stream.

def slot_generators(seed: int, rank: int, world_size: int, accumulation: int, device) -> dict:
    """{slot: {"noise": generator on `device`, "dropout": CPU generator}} for this rank's micro-steps."""
    return {s: {"noise": torch.Generator(device=device).manual_seed(seed * 7919 + s),
                "dropout": torch.Generator().manual_seed(seed * 104729 + s)}
            for s in range(rank, world_size * accumulation, world_size)}


def rng_state(slots: dict[int, dict[str, torch.Generator]]) -> dict:
    return {str(s): {k: g.get_state() for k, g in gens.items()} for s, gens in slots.items()}


def set_rng_state(slots: dict[int, dict[str, torch.Generator]], state: dict, source="the checkpoint") -> None:
    """Restore every slot's generators; slots missing from `state` (another micro-batch) keep their
    seeds, with a warning."""
    missing = [s for s in slots if str(s) not in state]
    if missing:
        import warnings
        warnings.warn(f"{source} was written with another micro-batch (no random state for slots {missing}): "
                      "their draws are re-seeded, so losses differ from an uninterrupted run", stacklevel=2)
    for s, gens in slots.items():
        for k, g in gens.items():
            if str(s) in state:
                g.set_state(state[str(s)][k])


# ---- metrics log ---------------------------------------------------------------------------------

def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines after `step` (written by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
