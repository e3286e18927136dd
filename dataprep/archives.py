"""Archive sets (SA-1B, COCO-2014 val over HTTP; JourneyDB, DiffusionDB as Hugging Face files).

Called by `dataprep.download`; fetches the annotation files and the first k archives of a subset into
`<out>/_input/`, extracts each into `<out>/images/<archive stem>/` (temporary folder, then rename; a
finished folder is skipped on a rerun), then writes `<out>/index.parquet`: one row per image with
`path` (relative to <out>), `caption`, `key`, the bring-your-own "paths + captions" layout that
`dataprep.readers` reads. How captions are found is the spec's `captions` field.

Several archives download at once (`concurrency`); each continues a partial download with HTTP Range
(`dataprep.fetch`). SA-1B's links file is untrusted input: file names must be plain names, URLs http(s),
and nothing is written or deleted outside `<out>/_input` and `<out>/images`. Archive members that would
escape their folder (absolute paths, `..`, links, devices) are refused and counted as
`archive_member_refused` in the raw manifest.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from microdit.cli import UserError

from .fetch import REFUSED, check_file_name, check_url, extract, fetch_hf_file, fetch_url, inside
from .specs import DatasetSpec, parts_for

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REFUSED_LOG = "refused.json"          # <out>/_input/: members refused per archive (kept for reruns' manifests)


def read_links_file(path: str | os.PathLike, allow_file_urls: bool = False) -> list[tuple[str, str]]:
    """(file name, URL) per row of SA-1B's links file (`file_name<TAB>cdn_link`, one header row).

    The file comes from outside: every file name must be a plain name and every URL http(s) (file:// only
    with allow_file_urls), else the whole file is refused with the row named, before anything is fetched.
    """
    p = Path(path)
    rows, seen = [], set()
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), start=1):
        if not line.strip() or (n == 1 and line.startswith("file_name")):
            continue
        fields = [x.strip() for x in line.split("\t")]
        if len(fields) < 2:
            raise UserError(f"{p} line {n}: expected file_name<TAB>cdn_link, got {line[:60]!r}")
        name = check_file_name(fields[0], f"{p} line {n}: file_name ")
        url = check_url(fields[1], allow_file_urls, f"{p} line {n}: cdn_link ")
        if name in seen:
            raise UserError(f"{p} line {n}: file_name {name!r} appears twice: each archive once")
        seen.add(name)
        rows.append((name, url))
    return rows


def _archive_list(spec: DatasetSpec, samples, fraction, links_file, allow_file_urls) -> list[tuple[str, str]]:
    """(file name, URL or HF path) of each archive of the subset."""
    if spec.name == "sa1b":
        if not links_file:
            raise UserError("sa1b needs --links-file: download the links text file from "
                            "https://ai.meta.com/datasets/segment-anything-downloads/ (its links expire)")
        return read_links_file(links_file, allow_file_urls)[:len(parts_for(spec, samples, fraction))]
    names = list(spec.parts)
    if names and "{i" in names[0]:
        names = [p.format(i=i) for i in parts_for(spec, samples, fraction) for p in spec.parts]
    return [(Path(n.split("?")[0]).name, n) for n in names]


class ArchiveDownload:
    """Fetch, extract and (unless kept) delete each archive of a subset, `concurrency` at a time.

    Everything is written under `<out>/_input` (downloads) and `<out>/images/<archive stem>` (extracted);
    a finished folder is skipped on a rerun, a partial download continues (dataprep.fetch).
    Retries: `retries` per file, in dataprep.fetch, the one retry layer of this step.
    """

    def __init__(self, spec: DatasetSpec, out: Path, retries: int = 2, delay: float = 2.0, concurrency: int = 4,
                 keep_archives: bool = False, allow_file_urls: bool = False):
        self.spec, self.out, self.retries, self.delay = spec, Path(out), retries, delay
        self.inbox, self.images = self.out / "_input", self.out / "images"
        self.concurrency, self.keep, self.allow_file = max(1, int(concurrency)), keep_archives, allow_file_urls
        self._lock = threading.Lock()

    def fetch(self, name: str, filename: str | None = None, progress: bool = True) -> Path:
        if self.spec.downloader == "hf_files":
            return fetch_hf_file(self.spec.source, name, self.inbox, retries=self.retries, delay=self.delay)
        dest = inside(self.inbox / check_file_name(filename or Path(name.split("?")[0]).name), self.inbox)
        return fetch_url(name, dest, retries=self.retries, delay=self.delay, progress=progress,
                         allow_file=self.allow_file)

    def extract(self, archive: Path, dest: Path) -> None:
        """Extract into `dest` (skipped when present); members refused are counted in _input/refused.json."""
        if dest.exists():
            return
        refused = extract(archive, dest).get(REFUSED, 0)
        with self._lock:
            log_path = self.inbox / REFUSED_LOG
            counts = json.loads(log_path.read_text()) if log_path.exists() else {}
            counts[archive.name] = refused
            log_path.write_text(json.dumps(counts, indent=1, sort_keys=True))

    def one(self, filename: str, name: str, progress: bool) -> None:
        dest = inside(self.images / filename.split(".")[0], self.images)
        if dest.exists():
            return
        archive = self.fetch(name, filename, progress)
        self.extract(archive, dest)
        if not self.keep:
            inside(archive, self.inbox).unlink(missing_ok=True)

    def run(self, archives: list[tuple[str, str]]) -> dict:
        from tqdm import tqdm
        self.inbox.mkdir(parents=True, exist_ok=True)
        for f in self.spec.extra_files:
            path = self.fetch(f)
            if path.suffix in (".zip", ".tgz", ".gz", ".tar"):
                self.extract(path, inside(self.inbox / (path.name.split(".")[0] + "-extracted"), self.inbox))
        bars = self.concurrency == 1
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(archives), desc=f"{self.spec.name} archives", unit="file") as bar:
            for job in [pool.submit(self.one, fn, name, bars) for fn, name in archives]:
                job.result()                       # the first failure is raised once the others finished
                bar.update(1)
        log_path = self.inbox / REFUSED_LOG
        refused = sum(json.loads(log_path.read_text()).values()) if log_path.exists() else 0
        return {REFUSED: refused} if refused else {}


def download_archives(spec: DatasetSpec, out: Path, samples, fraction, links_file=None, keep_archives=False,
                      retries: int = 2, concurrency: int = 4, allow_file_urls: bool = False,
                      delay: float = 2.0) -> dict:
    """Fetch and extract the subset's archives, then write index.parquet; returns samples and skips."""
    archives = _archive_list(spec, samples, fraction, links_file, allow_file_urls)
    job = ArchiveDownload(spec, out, retries, delay, concurrency, keep_archives, allow_file_urls)
    skipped = job.run(archives)
    rows = list(caption_rows(spec, out))
    if samples:
        rows = rows[:samples]
    write_index(out, rows)
    return {"samples": len(rows), "skipped": skipped, "layout": "index.parquet"}


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
