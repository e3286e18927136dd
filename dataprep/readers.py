"""Read raw image + caption sets in every layout we accept (downloaded or brought by the user).

    for rec in iter_records("data/cc12m-raw"): rec.key, rec.image (bytes), rec.caption (bytes/str/None), rec.meta

Layouts, detected from what is in the folder (or named with `layout=`):

  files       img2dataset `files` output or any folder of images with sidecars: `00000/000000123.jpg` +
              `000000123.txt` (caption) [+ `000000123.json` (key, sample_id, meta, url, ...)]
  webdataset  img2dataset `webdataset` output: `*.tar` with members `<key>.jpg`, `<key>.txt`, `<key>.json`
  parquet     img2dataset `parquet` output: `*.parquet` with the image bytes in a `jpg` (or png/webp)
              column beside `caption` and `key`
  table       a parquet or CSV of local image paths and captions (columns `path`|`image_path`|`file`,
              `caption`|`text`|`prompt`, optional `key`|`id`); relative paths are taken from the table's
              folder. Archive sets are downloaded into this layout (`index.parquet`).

A raw set is cut into deterministic record units (`plan_record_units`: a run of files, a tar, a
parquet file, or rows of a table) that `dataprep.convert` processes in parallel and resumes one by one;
`iter_unit_records(unit)` reads one, and `iter_records` is every unit in order.

Nothing here judges a record: a missing file, an unreadable caption or a corrupt image is passed on
(image/caption None or raw bytes) for `dataprep.convert` to count by reason.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from microdit.cli import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
PATH_COLS = ("path", "image_path", "file", "filepath", "image")
CAPTION_COLS = ("caption", "text", "prompt", "txt")
KEY_COLS = ("key", "id", "sample_id")
SKIP_DIRS = {"_input"}


@dataclass
class RawRecord:
    key: str                         # stable key within the source (file stem, img2dataset key, table key)
    image: bytes | None              # encoded image bytes; None if the file is missing
    caption: bytes | str | None      # bytes when read from a file (decoded later), None when absent
    where: str                       # file or table row, for messages
    sample_id: str | None = None     # set when the source carries a global id (shapes: "shapes/<seed>-<i>")
    meta: dict = field(default_factory=dict)


def detect_layout(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: give a raw set folder or a parquet/CSV of paths + captions")
    if p.is_file():
        if p.suffix in (".parquet", ".csv", ".tsv"):
            return "table"
        raise UserError(f"{p}: a single file must be a .parquet or .csv of image paths and captions")
    if (p / "index.parquet").exists() or (p / "index.csv").exists():
        return "table"
    if any(p.glob("*.tar")):
        return "webdataset"
    pq_files = sorted(p.glob("*.parquet"))
    if pq_files and _image_column(pq_files[0]):
        return "parquet"
    if any(f.suffix.lstrip(".").lower() in IMAGE_EXTS for f in _walk(p)):
        return "files"
    raise UserError(f"{p}: no images found in any known layout (files, webdataset, parquet, table); "
                     "see docs/data.md 'Bring your own data'")


LAYOUTS = ("files", "webdataset", "parquet", "table")


@dataclass(frozen=True)
class RecordUnit:
    """A deterministic piece of a raw set: what one convert worker reads, resumable on its own."""
    name: str                        # "00012": position in the plan (also the name of the unit's output part)
    layout: str                      # one of LAYOUTS
    path: str                        # the tar / parquet / table file, or the raw folder (files)
    start: int = 0                   # first row (table) ...
    stop: int | None = None          # ... and row after the last (None: to the end)
    files: tuple = ()                # files layout: the image files of this unit


def plan_record_units(path: str | Path, layout: str | None = None, per_unit: int = 1000) -> list[RecordUnit]:
    """The raw set cut into units of at most `per_unit` records (a webdataset tar or an img2dataset parquet
    file is one unit); the same input always gives the same plan."""
    p = Path(path)
    layout = layout or detect_layout(p)
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: one of {', '.join(LAYOUTS)}")
    per_unit = max(1, int(per_unit))
    pieces: list[dict] = []
    if layout == "files":
        images = [str(f) for f in _walk(p) if f.suffix.lstrip(".").lower() in IMAGE_EXTS]
        pieces = [{"path": str(p), "files": tuple(images[i:i + per_unit])} for i in range(0, len(images), per_unit)]
    elif layout == "webdataset":
        pieces = [{"path": str(t)} for t in sorted(p.glob("*.tar"))]
    elif layout == "parquet":
        pieces = [{"path": str(f)} for f in sorted(p.glob("*.parquet")) if _image_column(f)]
    else:
        table = _table_file(p)
        n = _table_rows(table)
        pieces = [{"path": str(table), "start": i, "stop": min(n, i + per_unit)} for i in range(0, n, per_unit)]
    return [RecordUnit(name=f"{i:05d}", layout=layout, **d) for i, d in enumerate(pieces)]


def iter_unit_records(unit: RecordUnit) -> Iterator[RawRecord]:
    """The records of one unit, in order."""
    if unit.layout == "files":
        yield from _iter_files([Path(f) for f in unit.files])
    elif unit.layout == "webdataset":
        yield from _iter_webdataset(Path(unit.path))
    elif unit.layout == "parquet":
        yield from _iter_parquet(Path(unit.path))
    else:
        yield from _iter_table(Path(unit.path), unit.start, unit.stop)


def iter_records(path: str | Path, layout: str | None = None) -> Iterator[RawRecord]:
    """Every record of a raw set, in a deterministic order."""
    for unit in plan_record_units(path, layout, per_unit=1 << 30):
        yield from iter_unit_records(unit)


def source_name(path: str | Path, default: str | None = None) -> str:
    """The data set name for `source`: the raw manifest's dataset, else the folder name."""
    from microdit.manifest import read_manifest
    p = Path(path)
    m = read_manifest(p if p.is_dir() else p.parent)
    if m is not None and m.config.get("dataset"):
        return str(m.config["dataset"])
    return default or (p.name if p.is_dir() else p.stem)


# --------------------------------------------------------------------------------------------

def _walk(root: Path):
    for f in sorted(root.rglob("*")):
        if f.is_file() and not SKIP_DIRS.intersection(f.relative_to(root).parts[:-1]):
            yield f


def _sidecar_meta(js: dict) -> tuple[str | None, dict]:
    meta = js.get("meta") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {"meta": meta}
    return js.get("sample_id"), meta if isinstance(meta, dict) else {"meta": meta}


def _iter_files(images: list[Path]) -> Iterator[RawRecord]:
    for f in images:
        txt, jsf = f.with_suffix(".txt"), f.with_suffix(".json")
        js = {}
        if jsf.exists():
            try:
                js = json.loads(jsf.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError):
                js = {}
        sid, meta = _sidecar_meta(js)
        yield RawRecord(key=str(js.get("key") or f.stem), image=f.read_bytes(),
                        caption=txt.read_bytes() if txt.exists() else None, where=str(f), sample_id=sid, meta=meta)


def _iter_webdataset(tar: Path) -> Iterator[RawRecord]:
    groups: dict[str, dict] = {}
    with tarfile.open(tar) as t:
        for m in t:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            groups.setdefault(key, {})[ext.lower()] = t.extractfile(m).read()
    for key in sorted(groups):
        g = groups[key]
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is None and not any(e in g for e in ("txt", "json")):
            continue
        try:
            js = json.loads(g["json"]) if "json" in g else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            js = {}
        sid, meta = _sidecar_meta(js)
        yield RawRecord(key=str(js.get("key") or key), image=img, caption=g.get("txt"), where=f"{tar}:{key}",
                        sample_id=sid, meta=meta)


def _image_column(parquet_file: Path) -> str | None:
    import pyarrow.parquet as pq
    names = pq.read_schema(parquet_file).names
    return next((c for c in IMAGE_EXTS if c in names), None)


def _iter_parquet(f: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq
    col, pf = _image_column(f), pq.ParquetFile(f)
    cap = next((c for c in CAPTION_COLS if c in pf.schema_arrow.names), None)
    rows = (row for batch in pf.iter_batches(batch_size=256) for row in batch.to_pylist())   # a shard: ~GBs
    for i, row in enumerate(rows):
        if row.get("status") not in (None, "success"):
            continue
        sid, meta = _sidecar_meta(row)
        yield RawRecord(key=str(row.get("key") or f"{f.stem}-{i}"), image=row.get(col),
                        caption=row.get(cap) if cap else None, where=f"{f}:{i}", sample_id=sid, meta=meta)


def _table_file(path: Path) -> Path:
    if path.is_dir():
        return path / "index.parquet" if (path / "index.parquet").exists() else path / "index.csv"
    return path


def _table_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    return len(_read_table(path))


def _iter_table(path: Path, start: int = 0, stop: int | None = None) -> Iterator[RawRecord]:
    rows = _read_table(path, start, stop)
    if not rows:
        return
    names = list(rows[0])
    pcol = next((c for c in PATH_COLS if c in names), None)
    if pcol is None:
        raise UserError(f"{path}: no image path column (one of {PATH_COLS}); columns are {names}")
    ccol = next((c for c in CAPTION_COLS if c in names), None)
    kcol = next((c for c in KEY_COLS if c in names), None)
    for i, row in enumerate(rows, start=start):
        img_path = Path(str(row[pcol]))
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        image = img_path.read_bytes() if img_path.is_file() else None
        key = str(row[kcol]) if kcol and row.get(kcol) not in (None, "") else img_path.stem
        sid, meta = _sidecar_meta(row)
        yield RawRecord(key=key, image=image, caption=row.get(ccol) if ccol else None, where=f"{path}:{i}",
                        sample_id=sid if kcol != "sample_id" else None, meta=meta)


def _read_table(path: Path, start: int = 0, stop: int | None = None) -> list[dict]:
    """Rows [start, stop) of a parquet (only the row groups that hold them are read) or CSV table."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        f = pq.ParquetFile(path)
        stop = f.metadata.num_rows if stop is None else stop
        groups, first, offset = [], None, 0
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return []
        tab = pa.concat_tables([f.read_row_group(g) for g in groups])
        return tab.slice(start - first, stop - start).to_pylist()
    import csv
    delim = "\t" if path.suffix == ".tsv" else ","
    out = []
    # surrogateescape: a caption that is not UTF-8 survives as bytes (counted by convert), never a crash
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f, delimiter=delim):
            for k, v in row.items():
                if isinstance(v, str):
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError:
                        row[k] = v.encode("utf-8", "surrogateescape")
            out.append(row)
    return out[start:stop]
