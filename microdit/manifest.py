"""Manifests: every output folder describes itself and what it cost (`manifest.json` beside the data).

One format for every asset kind (raw image shards, latent shard sets, checkpoints, evaluations), read
by the cost ledger. Written atomically (temporary name, then rename), so a crash never leaves half a
manifest, and an asset without a manifest is by definition unfinished.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
ASSET_KINDS = ("raw", "latents", "checkpoint", "evaluation")


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_bytes(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclass
class Manifest:
    kind: str                              # one of ASSET_KINDS
    name: str                              # human name, e.g. "shapes-latents" or "stage1"
    config: dict = field(default_factory=dict)    # resolved config that produced the asset
    parents: list = field(default_factory=list)   # paths (or asset ids) of the inputs
    samples: int = 0                       # samples written / trained on / evaluated
    skipped: dict = field(default_factory=dict)   # reason -> count of inputs left out
    bytes: int = 0                         # size on disk of the asset
    wall_seconds: float = 0.0              # elapsed time of the step that made it
    cpu_seconds: float = 0.0               # CPU time (all processes and workers) it used
    gpu_seconds: float = 0.0               # GPU time it used (sum over GPUs)
    gpu_type: str = ""                     # e.g. "H100-80GB"; empty for CPU-only work
    num_gpus: int = 0
    metrics: dict = field(default_factory=dict)   # step-specific figures (loss, FID, throughput...)
    created_at: float = field(default_factory=time.time)
    host: str = field(default_factory=platform.node)

    def __post_init__(self):
        if self.kind not in ASSET_KINDS:
            raise ValueError(f"manifest kind {self.kind!r} is not one of {ASSET_KINDS}")

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def to_dict(self) -> dict:
        return {**asdict(self), "config_hash": self.config_hash}

    def write(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(folder / MANIFEST_NAME, self.to_dict())

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        """The manifest of a folder, or of an object-storage set (`s3://bucket/prefix`)."""
        from .storage import is_remote, join, read_json
        if is_remote(folder):
            path = folder if str(folder).endswith("/" + MANIFEST_NAME) else join(folder, MANIFEST_NAME)
            d = read_json(path)
        else:
            path = Path(folder)
            path = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
            d = json.loads(path.read_text()) if path.exists() else None
        if d is None:
            raise FileNotFoundError(f"{path} does not exist: the step that makes this asset has not finished "
                                    "(run it again; finished work is skipped)")
        d.pop("config_hash", None)
        return cls(**d)


def read_manifest(folder) -> Manifest | None:
    """The manifest of `folder`, or None when the asset is not finished."""
    try:
        return Manifest.read(folder)
    except FileNotFoundError:
        return None


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def write_png_atomic(path: str | os.PathLike, image) -> Path:
    """Write a PIL image as PNG under a temporary name, then rename: never half an image at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


class CostMeter:
    """Measures wall and CPU seconds of a block (this process and its waited-for children).

        with CostMeter() as m: ...
        manifest.wall_seconds, manifest.cpu_seconds = m.wall_seconds, m.cpu_seconds
    Work done in other processes (Ray workers) is added by the caller with `add_cpu`.
    """

    def __enter__(self):
        self._t0, self._c0 = time.time(), self._cpu()
        self.extra_cpu = 0.0
        return self

    def __exit__(self, *exc):
        self.wall_seconds = time.time() - self._t0
        self.cpu_seconds = self._cpu() - self._c0 + self.extra_cpu
        return False

    def add_cpu(self, seconds: float) -> None:
        self.extra_cpu += seconds

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
