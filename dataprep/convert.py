"""Filter and convert a raw set into clean, uniformly laid out parquet shards for precompute.

    python -m dataprep.convert --input data/shapes-raw --out data/shapes-clean --min-size 32
    python -m dataprep.convert --input my_images.csv --out data/mine-clean --source mine

Keeps a sample when its image decodes, its short side is >= `min_size` and its caption is non-empty
UTF-8 text; resizes images whose short side exceeds `short_side` down to it (aspect kept); gives every
sample a stable id "<source>/<key>" (or the id the source carries). Everything left out is counted by
reason in the manifest (`skipped`), with a few examples of each in `metrics.examples`:

    image_missing  image_corrupt  image_truncated  image_too_small
    caption_missing  caption_empty  caption_not_utf8  duplicate_id

Output: `part-00000.parquet`, ... (columns sample_id, source, caption, image (encoded bytes), width,
height, meta (JSON text)), then `manifest.json` (kind "raw"). A rerun with the same config is skipped;
an unfinished folder (no manifest) is redone from scratch.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from microdit.manifest import CostMeter, Manifest, config_hash, folder_bytes, read_manifest

from .readers import RawRecord, iter_records, source_name

CONVERTED_LAYOUT = "converted"        # manifest.metrics["layout"] of a folder this module wrote


@dataclass
class ConvertConfig:
    input: str                      # raw set folder (any layout of dataprep.readers) or a parquet/CSV table
    out: str                        # folder to write
    source: str | None = None       # data set name stored with each sample (default: raw manifest / folder name)
    min_size: int = 256             # drop images whose short side is smaller (the paper: 256)
    short_side: int = 512           # resize images whose short side is larger down to this (the paper: 512)
    shard_samples: int = 1000       # samples per output parquet shard
    layout: str | None = None       # force a reader layout (files, webdataset, parquet, table); None = detect
    jpeg_quality: int = 95          # quality when a resized JPEG is re-encoded (PNG stays PNG)


class Skip(Exception):
    """A record left out, with its reason (a manifest `skipped` key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_caption(caption) -> str:
    if caption is None:
        raise Skip("caption_missing")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("caption_not_utf8", str(e)) from None
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:                       # surrogate-escaped bytes from a CSV
        raise Skip("caption_not_utf8", str(e)) from None
    if "\ufffd" in caption:
        raise Skip("caption_not_utf8", "contains U+FFFD (bytes that were not UTF-8)")
    caption = " ".join(caption.replace("\x00", " ").split())
    if not caption:
        raise Skip("caption_empty")
    return caption


def check_image(data: bytes | None, min_size: int, short_side: int, jpeg_quality: int = 95) -> tuple[bytes, int, int]:
    """Decoded, filtered and (when larger than short_side) resized image: (encoded bytes, width, height)."""
    if data is None:
        raise Skip("image_missing")
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        im.load()
    except Exception as e:                                 # PIL raises OSError, SyntaxError, ValueError, ...
        reason = "image_truncated" if "truncat" in str(e).lower() else "image_corrupt"
        raise Skip(reason, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if min(w, h) < min_size:
        raise Skip("image_too_small", f"{w}x{h} < {min_size}")
    changed = False
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im, changed = im.convert("RGB"), True
    if min(w, h) > short_side:
        scale = short_side / min(w, h)
        w, h = max(short_side, round(w * scale)), max(short_side, round(h * scale))
        im, changed = im.resize((w, h), Image.BICUBIC, reducing_gap=3.0), True
    if not changed and fmt in ("JPEG", "PNG", "WEBP"):
        return data, w, h
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), w, h


def convert(cfg: ConvertConfig, progress: bool = True) -> Path:
    """Run the filter/convert step; returns the output folder (with manifest.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out, config = Path(cfg.out), asdict(cfg)
    done = read_manifest(out)
    if done is not None and done.config.get("convert_hash") == config_hash(_identity(cfg)):
        return out
    source = cfg.source or source_name(cfg.input)
    work = out / ".converting"
    shutil.rmtree(work, ignore_errors=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    work.mkdir(parents=True)
    seen, skipped, examples, rows, shard, kept = set(), {}, {}, [], 0, 0

    def flush():
        nonlocal rows, shard
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=CONVERTED_SCHEMA), work / f"part-{shard:05d}.parquet")
            rows, shard = [], shard + 1

    with CostMeter() as meter:
        bar = tqdm(iter_records(cfg.input, cfg.layout), desc=f"convert {source}", unit="img", disable=not progress)
        for rec in bar:
            try:
                row = _convert_one(rec, source, cfg, seen)
            except Skip as s:
                skipped[s.reason] = skipped.get(s.reason, 0) + 1
                ex = examples.setdefault(s.reason, [])
                if len(ex) < 3:
                    ex.append(f"{rec.where}: {s}")
                continue
            rows.append(row)
            kept += 1
            if len(rows) >= cfg.shard_samples:
                flush()
        flush()
        bar.close()
    for f in sorted(work.glob("part-*.parquet")):
        os.replace(f, out / f.name)
    shutil.rmtree(work, ignore_errors=True)
    if skipped and progress:
        print(f"convert {source}: kept {kept}, skipped {skipped}")
    Manifest(kind="raw", name=f"{source}-converted", config={**config, "convert_hash": config_hash(_identity(cfg))},
             parents=[str(cfg.input)], samples=kept, skipped=skipped, bytes=folder_bytes(out),
             wall_seconds=meter.wall_seconds, cpu_seconds=meter.cpu_seconds,
             metrics={"layout": CONVERTED_LAYOUT, "source": source, "shards": shard, "examples": examples}).write(out)
    return out


def _identity(cfg: ConvertConfig) -> dict:
    d = asdict(cfg)
    d.pop("out")
    return d


def _convert_one(rec: RawRecord, source: str, cfg: ConvertConfig, seen: set) -> dict:
    sample_id = rec.sample_id or f"{source}/{rec.key}"
    if sample_id in seen:
        raise Skip("duplicate_id", sample_id)
    caption = check_caption(rec.caption)
    image, w, h = check_image(rec.image, cfg.min_size, cfg.short_side, cfg.jpeg_quality)
    seen.add(sample_id)
    return {"sample_id": sample_id, "source": source, "caption": caption, "image": image, "width": w, "height": h,
            "meta": json.dumps(rec.meta, sort_keys=True)}


def _schema():
    import pyarrow as pa
    return pa.schema([("sample_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                      ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()), ("meta", pa.string())])


CONVERTED_SCHEMA = _schema()


def is_converted(folder) -> bool:
    m = read_manifest(folder) if Path(folder).is_dir() else None
    return m is not None and m.metrics.get("layout") == CONVERTED_LAYOUT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="raw set folder or parquet/CSV of image paths + captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--source", help="data set name stored with each sample")
    p.add_argument("--min-size", type=int, default=256, help="drop images with a shorter short side")
    p.add_argument("--short-side", type=int, default=512, help="resize larger images to this short side")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per output shard")
    p.add_argument("--layout", choices=["files", "webdataset", "parquet", "table"], help="force a layout")
    a = p.parse_args(argv)
    path = convert(ConvertConfig(a.input, a.out, a.source, a.min_size, a.short_side, a.shard_samples, a.layout))
    m = Manifest.read(path)
    print(f"{path}: kept {m.samples}, skipped {m.skipped or 'none'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:     # user-fixable: the message says what to do
        raise SystemExit(f"error: {e}") from None
