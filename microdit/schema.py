"""The one schema of precomputed latent shards (MosaicML streaming MDS), shared by writer and reader.

A latent set is a folder of MDS shards (one subfolder per writer, indexes merged at the top) plus
`schema.json` (this dataclass) and `manifest.json`. Columns:

    sample_id        str                                  stable id: "<source>/<key>"
    source           str                                  dataset name (cc12m, sa1b, shapes, ...)
    caption          str                                  the caption text
    caption_latents  ndarray:float16:L,Dc                 per-token text embeddings
    latents_<res>    ndarray:float16:C,res/f,res/f         scaled VAE latents for each resolution
    meta             json                                 per-sample extras (e.g. shapes ground truth)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_NAME = "schema.json"
LATENT_DTYPE = "float16"


@dataclass
class LatentSchema:
    resolutions: tuple = (256, 512)       # image resolutions (pixels) with a latents column each
    latent_channels: int = 4              # C of the image autoencoder
    downsample: int = 8                   # pixels per latent cell of the image autoencoder
    caption_len: int = 77                 # L: text tokens per caption
    caption_dim: int = 1024               # Dc: text embedding width
    image_autoencoder: str = ""           # encoder names, so a reader knows what it trains on
    text_encoder: str = ""
    extra: dict = field(default_factory=dict)

    @staticmethod
    def latent_key(resolution: int) -> str:
        return f"latents_{int(resolution)}"

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's factor {self.downsample}")
        s = resolution // self.downsample
        return (self.latent_channels, s, s)

    def caption_shape(self) -> tuple[int, int]:
        return (self.caption_len, self.caption_dim)

    def columns(self) -> dict[str, str]:
        """Column name -> MDS encoding, for `streaming.MDSWriter(columns=...)`."""
        cols = {"sample_id": "str", "source": "str", "caption": "str",
                "caption_latents": _nd(self.caption_shape())}
        for r in self.resolutions:
            cols[self.latent_key(r)] = _nd(self.latent_shape(r))
        cols["meta"] = "json"
        return cols

    def encode_sample(self, sample: dict) -> dict:
        """Validate one sample (raise with the field that is wrong) and cast arrays to the column dtype."""
        out = {}
        for name in ("sample_id", "source", "caption"):
            if not isinstance(sample.get(name), str):
                raise ValueError(f"sample field {name!r} must be a str, got {type(sample.get(name)).__name__}")
            out[name] = sample[name]
        shapes = {"caption_latents": self.caption_shape(),
                  **{self.latent_key(r): self.latent_shape(r) for r in self.resolutions}}
        for name, shape in shapes.items():
            arr = np.asarray(sample.get(name))
            if arr.shape != shape:
                raise ValueError(f"sample {sample['sample_id']!r}: field {name!r} has shape {arr.shape}, "
                                 f"the schema says {shape}")
            out[name] = np.ascontiguousarray(arr, dtype=LATENT_DTYPE)
        out["meta"] = sample.get("meta") or {}
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resolutions"] = list(self.resolutions)
        return d

    def write(self, folder) -> Path:
        from .manifest import write_json_atomic
        Path(folder).mkdir(parents=True, exist_ok=True)
        return write_json_atomic(Path(folder) / SCHEMA_NAME, self.to_dict())

    @classmethod
    def read(cls, folder) -> "LatentSchema":
        """The schema of a latent set folder, or of a set in object storage (`s3://bucket/prefix`)."""
        from .storage import join, read_json
        path = join(folder, SCHEMA_NAME)
        d = read_json(path)
        if d is None:
            raise FileNotFoundError(f"{path} is missing: {folder} is not a finished latent set "
                                    "(make it with `python -m dataprep.precompute`)")
        d["resolutions"] = tuple(d["resolutions"])
        return cls(**d)

    def check_columns(self, columns: dict[str, str], where: str = "") -> None:
        """Raise if an MDS index's columns disagree with this schema (reader-side validation)."""
        want = self.columns()
        for name, enc in want.items():
            if columns.get(name) != enc:
                raise ValueError(f"{where}: column {name!r} is {columns.get(name)!r} in the shards but "
                                 f"{enc!r} in {SCHEMA_NAME}; re-run precompute into a fresh folder")


def _nd(shape) -> str:
    return f"ndarray:{LATENT_DTYPE}:" + ",".join(str(int(s)) for s in shape)
