"""Checkpoints and exact resume, stored so that reading them can never run code.

A stage folder (TrainConfig.out_dir) holds:

    checkpoints/step_00000100/   resumable: model.safetensors + config.json (loadable by the pipeline),
                                 train_state.json (step, counters, scheduler, data-loader position,
                                 optimizer hyper-parameters: plain JSON) with train_state.safetensors
                                 (raw weights, optimizer moments, EMA, every rank's RNG generators),
                                 train_config.json
    final/                       the stage's result: model.safetensors + config.json + train_config.json
                                 + manifest.json (kind "checkpoint")
    metrics.jsonl, tensorboard/, samples/, tmp/

Folders are written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one. Only the last K are kept.

Every file of a run folder is treated as untrusted (a shared `runs/`, a copied run): the state is JSON
and safetensors, never a pickle. A `train_state.pt` (pickle) is refused, not opened. A checkpoint that
cannot be read (a truncated file, a disk error) is named in a warning and resume falls back to the
previous one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
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


def save_resumable(out_dir, step: int, state: dict, export, cfg_dict: dict, keep: int) -> Path:
    """Write checkpoints/step_<step>/ atomically; `export(folder)` writes model.safetensors + config.json."""
    target = Path(out_dir) / "checkpoints" / f"step_{step:08d}"

    def fill(tmp: Path):
        export(tmp)
        write_json_atomic(tmp / CONFIG_NAME, cfg_dict)
        save_state(tmp, state)

    write_folder_atomically(target, fill)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_resumable(folder) -> dict:
    """The state written by `save_resumable`; UnsafeCheckpoint for a pickle, CorruptCheckpoint when unreadable."""
    return load_state(folder)


def load_latest(out_dir) -> tuple[Path | None, dict | None]:
    """The newest readable checkpoint and its state; unreadable ones are named in a warning and skipped."""
    for folder in reversed(checkpoint_dirs(out_dir)):
        try:
            return folder, load_state(folder)
        except CorruptCheckpoint as e:
            warnings.warn(f"{e}; resuming from the previous checkpoint instead", stacklevel=2)
    return None, None


# ---- the training state as JSON + safetensors ---------------------------------------------------

def save_state(folder, state: dict) -> None:
    """Nested dicts/lists of plain values and tensors -> train_state.json + train_state.safetensors."""
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

def rng_state(generators: dict[str, torch.Generator]) -> dict:
    out = {k: g.get_state() for k, g in generators.items()}
    out["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(generators: dict[str, torch.Generator], state: dict) -> None:
    for k, g in generators.items():
        g.set_state(state[k])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- metrics log ---------------------------------------------------------------------------------

def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines after `step` (written by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
