"""Small latent sets written in the shared schema: for tests and for the CPU demo before precompute exists.

    python -m dataprep.synthetic --out data/shapes-latents --n 20000      # shapes, 16 + 32 px

`write_latent_set` is the plain MDSWriter path (columns from LatentSchema, samples through
`schema.encode_sample`); `shapes_latent_set` renders `microdit.shapes` images and encodes them with
the `pixel:2` autoencoder and the `tiny-clip:16` text encoder, at every resolution of the schema.
The production path is `python -m dataprep.precompute`, which writes the same schema.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from microdit.cli import check_positive, run_cli
from microdit.manifest import CostMeter, Manifest, folder_bytes
from microdit.schema import LatentSchema


def write_latent_set(folder, schema: LatentSchema, samples, name: str = "latents", parents=None) -> Path:
    """Write `samples` (dicts with the schema's fields) as an MDS latent set with schema.json + manifest.json."""
    from streaming import MDSWriter
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    with CostMeter() as meter, MDSWriter(out=str(tmp), columns=schema.columns(), compression=None,
                                         size_limit=1 << 24) as w:
        for s in samples:
            w.write(schema.encode_sample(s))
            n += 1
    schema.write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    Manifest(kind="latents", name=name, config=schema.to_dict(), parents=list(parents or []), samples=n,
             bytes=folder_bytes(folder), wall_seconds=meter.wall_seconds, cpu_seconds=meter.cpu_seconds).write(folder)
    return folder


def random_latent_set(folder, n: int = 64, resolutions=(16,), seed: int = 0, caption_len: int = 4,
                      caption_dim: int = 8, channels: int = 12, downsample: int = 2, nan_from: int | None = None) -> Path:
    """Random latents and captions (tests); samples with index >= nan_from get NaN latents."""
    schema = LatentSchema(resolutions=tuple(resolutions), latent_channels=channels, downsample=downsample,
                          caption_len=caption_len, caption_dim=caption_dim, image_autoencoder=f"pixel:{downsample}",
                          text_encoder=f"tiny-clip:{caption_len}")
    rng = np.random.default_rng(seed)

    def gen():
        for i in range(n):
            s = {"sample_id": f"random/{i:06d}", "source": "random", "caption": f"caption {i}",
                 "caption_latents": rng.standard_normal(schema.caption_shape()), "meta": {"i": i}}
            for r in resolutions:
                lat = rng.standard_normal(schema.latent_shape(r)) * 0.5
                if nan_from is not None and i >= nan_from:
                    lat[:] = np.nan
                s[schema.latent_key(r)] = lat
            yield s
    return write_latent_set(folder, schema, gen(), name="random-latents")


def shapes_latent_set(folder, n: int, resolutions=(16, 32), seed: int = 0, image_autoencoder: str = "pixel:2",
                      text_encoder: str = "tiny-clip:16", batch: int = 256, progress: bool = True) -> Path:
    """Render `n` shapes images at max(resolutions) px (box-downsampled for smaller ones) and encode them."""
    from PIL import Image
    from tqdm import tqdm

    from microdit.shapes import generate_shapes

    from microdit.encoders import load_image_autoencoder, load_text_encoder
    ae, te = load_image_autoencoder(image_autoencoder), load_text_encoder(text_encoder)
    schema = LatentSchema(resolutions=tuple(resolutions), latent_channels=ae.latent_channels,
                          downsample=ae.downsample, caption_len=te.max_length, caption_dim=te.dim,
                          image_autoencoder=ae.name, text_encoder=te.name, extra={"source": "shapes", "seed": seed})
    top = max(resolutions)

    def to_tensor(img, r):
        if img.size != (r, r):
            img = img.resize((r, r), Image.BOX)
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def gen():
        it = generate_shapes(n, resolution=top, seed=seed)
        bar = tqdm(total=n, desc=f"encode {Path(folder).name}", disable=not progress)
        while True:
            chunk = [s for _, s in zip(range(batch), it)]
            if not chunk:
                break
            with torch.inference_mode():
                caps = te.encode([s.caption for s in chunk]).numpy()
                lats = {r: ae.encode(torch.stack([to_tensor(s.image, r) for s in chunk])).numpy() for r in resolutions}
            for j, s in enumerate(chunk):
                out = {"sample_id": f"shapes/{seed}-{bar.n + j:07d}", "source": "shapes", "caption": s.caption,
                       "caption_latents": caps[j], "meta": s.meta}
                out.update({schema.latent_key(r): lats[r][j] for r in resolutions})
                yield out
            bar.update(len(chunk))
        bar.close()
    return write_latent_set(folder, schema, gen(), name=Path(folder).name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="latent set folder to write")
    p.add_argument("--n", type=int, default=20000, help="number of shapes images")
    p.add_argument("--seed", type=int, default=0, help="shapes seed (use another seed for a held-out set)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    a = p.parse_args(argv)
    check_positive(n=a.n, resolutions=min(a.resolutions))
    torch.set_num_threads(1)
    print(shapes_latent_set(a.out, a.n, tuple(a.resolutions), a.seed))


if __name__ == "__main__":
    run_cli(main)
