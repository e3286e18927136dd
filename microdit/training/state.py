"""Checkpoints and exact resume.

A stage folder (TrainConfig.out_dir) holds:

    checkpoints/step_00000100/   resumable: model.safetensors + config.json (loadable by the pipeline),
                                 train_state.pt (raw weights, optimizer, EMA, scheduler, data-loader
                                 position, every rank's RNG generators, counters), train_config.json
    final/                       the stage's result: model.safetensors + config.json + train_config.json
                                 + manifest.json (kind "checkpoint")
    metrics.jsonl, tensorboard/, samples/, tmp/

Folders are written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one. Only the last K are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..manifest import write_json_atomic

STATE_NAME, CONFIG_NAME = "train_state.pt", "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(out_dir) -> list[Path]:
    """Finished resumable checkpoints of a stage, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / STATE_NAME).exists()]
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
        torch.save(state, tmp / STATE_NAME)

    write_folder_atomically(target, fill)
    for old in checkpoint_dirs(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_resumable(folder) -> dict:
    return torch.load(Path(folder) / STATE_NAME, map_location="cpu", weights_only=False)


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
