"""Archive sets (SA-1B, COCO-2014 val over HTTP; JourneyDB, DiffusionDB as Hugging Face files).

Called by `dataprep.download`; fetches the annotation files and the first k archives of a subset into
`<out>/_input/`, extracts each into `<out>/images/<archive stem>/` (temporary folder, then rename; a
finished folder is skipped on a rerun), then writes `<out>/index.parquet`: one row per image with
`path` (relative to <out>), `caption`, `key`, the bring-your-own "paths + captions" layout that
`dataprep.readers` reads. How captions are found is the spec's `captions` field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .fetch import extract, fetch_hf_file, fetch_url
from .specs import DatasetSpec, parts_for

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _fetch(spec: DatasetSpec, name: str, folder: Path, retries: int, filename: str | None = None) -> Path:
    if spec.downloader == "hf_files":
        return fetch_hf_file(spec.source, name, folder, retries=retries)
    return fetch_url(name, folder / (filename or Path(name.split("?")[0]).name), retries=retries)


def _archive_list(spec: DatasetSpec, samples, fraction, links_file) -> list[tuple[str, str]]:
    """(file name, URL or HF path) of each archive of the subset."""
    if spec.name == "sa1b":
        if not links_file:
            raise ValueError("sa1b needs --links-file: download the links text file from "
                             "https://ai.meta.com/datasets/segment-anything-downloads/ (its links expire)")
        lines = Path(links_file).read_text().splitlines()[1:]          # header: file_name \t cdn_link
        links = [tuple(x.strip() for x in ln.split("\t")[:2]) for ln in lines if "\t" in ln]
        return links[:len(parts_for(spec, samples, fraction))]
    names = list(spec.parts)
    if names and "{i" in names[0]:
        names = [p.format(i=i) for i in parts_for(spec, samples, fraction) for p in spec.parts]
    return [(Path(n.split("?")[0]).name, n) for n in names]


def download_archives(spec: DatasetSpec, out: Path, samples, fraction, links_file=None, keep_archives=False,
                      retries: int = 2) -> dict:
    from tqdm import tqdm
    inbox, images = out / "_input", out / "images"
    extras = [_fetch(spec, f, inbox, retries) for f in spec.extra_files]
    for f in extras:
        if f.suffix in (".zip", ".tgz", ".gz", ".tar"):
            extract(f, inbox / (f.name.split(".")[0] + "-extracted"))
    for filename, name in tqdm(_archive_list(spec, samples, fraction, links_file), desc=f"{spec.name} archives",
                               unit="file"):
        dest = images / filename.split(".")[0]
        if dest.exists():
            continue
        archive = _fetch(spec, name, inbox, retries, filename)
        extract(archive, dest)
        if not keep_archives:
            archive.unlink(missing_ok=True)
    rows = list(caption_rows(spec, out))
    if samples:
        rows = rows[:samples]
    write_index(out, rows)
    return {"samples": len(rows), "skipped": {}, "layout": "index.parquet"}


def caption_rows(spec: DatasetSpec, out: Path):
    """Yield {"path", "caption", "key"} for every extracted image that has a caption."""
    images, inbox = out / "images", out / "_input"
    kind, _, arg = spec.captions.partition(":")
    if kind == "jsonl":                          # JourneyDB: {"img_path": "./000/x.jpg", "prompt": ...}
        by_rel = {str(p.relative_to(d)): p for d in images.iterdir() for p in d.rglob("*") if p.is_file()}
        for jl in sorted(inbox.rglob("*.jsonl")):
            with open(jl) as f:
                for line in f:
                    d = json.loads(line)
                    rel = d.get("img_path", "").lstrip("./")
                    hit = by_rel.get(rel) or by_rel.get(rel.split("/", 1)[-1])
                    if hit is not None:
                        yield {"path": str(hit.relative_to(out)), "caption": d.get(arg), "key": Path(rel).stem}
    elif kind == "diffusiondb-json":            # part-NNNNNN.json: {file name: {"p": prompt, ...}}
        for js in sorted(images.rglob("part-*.json")):
            for fname, d in json.loads(js.read_text()).items():
                p = js.parent / fname
                if p.exists():
                    yield {"path": str(p.relative_to(out)), "caption": d.get("p"), "key": Path(fname).stem}
    elif kind == "coco-json":                   # annotations/captions_val2014.json: first caption per image
        ann = next(inbox.rglob("captions_val2014.json"))
        data = json.loads(ann.read_text())
        caps = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], a["caption"].replace("\n", " ").strip())
        files = {p.name: p for p in images.rglob("*.jpg")}
        for im in sorted(data["images"], key=lambda x: x["id"]):
            p = files.get(im["file_name"])
            if p is not None:
                yield {"path": str(p.relative_to(out)), "caption": caps.get(im["id"]), "key": str(im["id"])}
    elif kind == "txt-dir":                     # SA-1B: <stem>.txt per image somewhere under the captions folder
        txt = {p.stem: p for p in inbox.rglob("*.txt")}
        for p in sorted(images.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                t = txt.get(p.stem)
                yield {"path": str(p.relative_to(out)), "key": p.stem,
                       "caption": t.read_text(errors="replace").strip() if t else None}
    else:
        raise ValueError(f"spec {spec.name}: unknown captions kind {spec.captions!r}")


def write_index(out: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    tab = pa.table({k: [r.get(k) for r in rows] for k in ("path", "caption", "key")},
                   schema=pa.schema([("path", pa.string()), ("caption", pa.string()), ("key", pa.string())]))
    tmp = out / ".index.parquet.tmp"
    pq.write_table(tab, tmp)
    os.replace(tmp, out / "index.parquet")
    return out / "index.parquet"
