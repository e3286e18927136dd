"""Download a data set (whole or a subset) into a raw set folder with a manifest.

    python -m dataprep.download shapes --out data/shapes-raw --samples 4000 --resolution 64   # offline
    python -m dataprep.download cc12m --out data/cc12m-raw --fraction 0.01 --processes 8 --threads 64
    python -m dataprep.download journeydb --out data/jdb-raw --samples 50000
    python -m dataprep.download sa1b --out data/sa1b-raw --fraction 0.01 --links-file sa1b_links.txt
    python -m dataprep.download --list

URL-list sets (cc12m, and shapes served on loopback) go through img2dataset, sized by the caller
(`--processes`, `--threads`; layout `--output-format`: `parquet` or `webdataset` for real URL sets, whose
shards are convert's work units; `files` for small local sets), which also drops images whose short side
is under `--min-image-size` before they are resized or written; archive sets (sa1b, coco2014-val: plain
HTTP; journeydb, diffusiondb: Hugging Face files)
through `dataprep.fetch`, then an `index.parquet` of local image paths and captions is written.
Re-running the same command skips what is finished (img2dataset shards, archives, extracted folders).
The folder gets `manifest.json` (kind "raw") last, so a folder without one is unfinished.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from microdit.cli import UserError, check_positive, run_cli
from microdit.manifest import CostMeter, Manifest, folder_bytes, read_manifest
from microdit.redact import redact

from .specs import DatasetSpec, get_spec, subset_count, table

INPUT_DIR = "_input"          # URL lists and archives live here, beside the downloaded shards


def download(dataset: str, out_dir: str | os.PathLike, samples: int | None = None, fraction: float | None = None,
             resolution: int | None = None, output_format: str | None = None, processes: int = 1,
             threads: int = 32, seed: int = 0, links_file: str | None = None, url_list: str | None = None,
             retries: int = 2,
             keep_archives: bool = False, missing=(), corrupt=(), concurrency: int = 4,
             allow_file_urls: bool = False, retry_delay: float = 2.0, min_image_size: int | None = None) -> Path:
    """Fetch `dataset` (a name in dataprep.specs.SPECS) into `out_dir`; returns the folder (with manifest.json).

    samples / fraction: a subset (the first rows of the URL list, or the first archives).
    resolution: image size on download (shapes: the drawn size; others: the short-side cap, default 512).
    url_list: a local copy of the set's URL list (instead of fetching spec.source).
    missing / corrupt: shapes only, indices served as 404 / garbage (for tests of the skip accounting).
    retries: the one retry layer of a download: per URL in img2dataset, per file (with Range resume) in
    dataprep.fetch, `retry_delay` seconds doubling between tries. concurrency: archives fetched at once.
    allow_file_urls: accept file:// links in a links file (off: only http(s)).
    processes / threads / output_format: img2dataset's size and layout. min_image_size: img2dataset drops
    images with a shorter short side (None: the spec's min_size; archive sets are filtered by convert).
    """
    spec, out = get_spec(dataset), Path(out_dir)
    output_format = output_format or ("files" if spec.downloader == "shapes" else "parquet")
    min_image_size = spec.min_size if min_image_size is None else int(min_image_size)
    if min(processes, threads) < 1 or min_image_size < 0:
        raise UserError(f"--processes {processes}, --threads {threads}, --min-image-size {min_image_size}: "
                        "give at least 1 process and 1 thread, and a size >= 0")
    config = {"dataset": dataset, "samples": samples, "fraction": fraction, "resolution": resolution,
              "output_format": output_format, "seed": seed, "spec": spec.to_dict()}
    if spec.downloader in ("img2dataset", "shapes"):
        config["min_image_size"] = min_image_size
    done = read_manifest(out)
    if done is not None:
        if json.loads(json.dumps(done.config, default=str)) == json.loads(json.dumps(config, default=str)):
            return out                              # finished with the same request: nothing to do
        raise UserError(f"{out} already holds a finished download with another config "
                         f"({done.config.get('dataset')}, samples={done.config.get('samples')}, "
                         f"fraction={done.config.get('fraction')}): use another --out folder")
    if spec.downloader == "shapes" and fraction is not None:
        raise UserError("shapes has no fixed size: give --samples N")
    out.mkdir(parents=True, exist_ok=True)
    with CostMeter() as meter:
        if spec.downloader == "shapes":
            n = subset_count(0, samples, None) if samples else 1000
            res = resolution or spec.image_size
            from .shapes_server import ShapesServer
            _no_proxy_for_loopback()
            with ShapesServer(n, res, seed, out / INPUT_DIR, missing=missing, corrupt=corrupt) as server:
                stats = run_img2dataset(server.url_list, out, spec, image_size=res, output_format=output_format,
                                        processes=processes, threads=threads, retries=retries,
                                        min_image_size=min_image_size, extra_columns=["sample_id", "meta"],
                                        resize_mode="no", encode_format="png")
        elif spec.downloader == "img2dataset":
            listing = subset_url_list(spec, out / INPUT_DIR, samples, fraction, url_list)
            stats = run_img2dataset(listing, out, spec, image_size=resolution or spec.image_size,
                                    output_format=output_format, processes=processes, threads=threads,
                                    retries=retries, min_image_size=min_image_size)
        elif spec.downloader in ("files", "hf_files"):
            from .archives import download_archives
            stats = download_archives(spec, out, samples, fraction, links_file, keep_archives, retries,
                                      concurrency, allow_file_urls, retry_delay)
        else:
            raise UserError(f"spec {spec.name}: unknown downloader {spec.downloader!r}")
    Manifest(kind="raw", name=f"{dataset}-raw", config=config, samples=stats["samples"],
             skipped=stats["skipped"], bytes=folder_bytes(out), wall_seconds=meter.wall_seconds,
             cpu_seconds=meter.cpu_seconds, metrics={"layout": stats.get("layout", output_format)}).write(out)
    return out


def _no_proxy_for_loopback() -> None:
    """A proxy from the environment must not intercept loopback requests (inherited by img2dataset's workers)."""
    for var in ("NO_PROXY", "no_proxy"):
        have = [h for h in os.environ.get(var, "").split(",") if h]
        os.environ[var] = ",".join(dict.fromkeys(have + ["127.0.0.1", "localhost"]))


# --------------------------------------------------------------------------------------------
#                                    URL lists -> img2dataset
# --------------------------------------------------------------------------------------------

def subset_url_list(spec: DatasetSpec, folder: Path, samples, fraction, url_list=None) -> Path:
    """The first N rows of the set's URL list as a parquet with `url`, `caption` (written once)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from .fetch import fetch_url
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(url_list) if url_list else fetch_url(spec.source, folder / Path(spec.source).name)
    tag = f"n{samples}" if samples else (f"f{fraction}" if fraction else "all")
    dest = folder / f"{spec.name}-{tag}.parquet"
    if dest.exists():
        return dest
    if src.suffix == ".parquet":
        tab = pq.read_table(src)
    else:
        delim = "\t" if spec.list_format == "tsv" else ","
        ropts = pcsv.ReadOptions(column_names=list(spec.list_columns) or None)
        tab = pcsv.read_csv(src, read_options=ropts, parse_options=pcsv.ParseOptions(delimiter=delim,
                                                                                      newlines_in_values=False))
    for col in (spec.url_col, spec.caption_col):
        if col not in tab.column_names:
            raise UserError(f"{src}: no column {col!r} (columns: {tab.column_names}); fix dataprep/specs.py")
    n = subset_count(tab.num_rows, samples, fraction)
    tab = tab.slice(0, n).select([spec.url_col, spec.caption_col])
    tab = pa.table({"url": tab.column(0), "caption": tab.column(1)})
    pq.write_table(tab, dest.with_name(dest.name + ".tmp"))
    os.replace(dest.with_name(dest.name + ".tmp"), dest)
    return dest


def run_img2dataset(url_list: Path, out: Path, spec: DatasetSpec, image_size: int, output_format: str = "files",
                    processes: int = 1, threads: int = 32, retries: int = 2, min_image_size: int = 0,
                    extra_columns=None,
                    resize_mode: str = "keep_ratio", encode_format: str = "jpg", shard_size: int = 10_000) -> dict:
    """Run img2dataset over a parquet URL list (incremental: finished shards are skipped on a rerun).

    img2dataset starts its workers with `spawn`: callers' entry points must be guarded by
    `if __name__ == "__main__":` (this module's is).
    """
    if output_format not in ("files", "webdataset", "parquet"):
        raise UserError(f"output_format must be files, webdataset or parquet, got {output_format!r}")
    import logging
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        from img2dataset import download as i2d
    except ImportError:
        raise ImportError("img2dataset is not installed: make setup installs it (requirements.lock), or "
                          "pip install -e '.[download]' then pip uninstall -y dataclasses") from None
    logging.getLogger("img2dataset").setLevel(logging.WARNING)
    i2d(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
        output_folder=str(out), output_format=output_format, image_size=image_size, resize_mode=resize_mode,
        resize_only_if_bigger=True, encode_format=encode_format, encode_quality=95 if encode_format == "jpg" else 9,
        processes_count=processes, thread_count=threads, number_sample_per_shard=shard_size,
        save_additional_columns=extra_columns, retries=retries, timeout=20, enable_wandb=False,
        min_image_size=min_image_size,
        incremental_mode="incremental", distributor="multiprocessing", compute_hash=None)
    return img2dataset_stats(out)


def img2dataset_stats(out: Path) -> dict:
    """Sum img2dataset's per-shard `*_stats.json`: successes, and failures by reason."""
    samples, skipped = 0, {}
    for f in sorted(Path(out).glob("*_stats.json")):
        st = json.loads(f.read_text())
        samples += int(st.get("successes", 0))
        for err, count in (st.get("status_dict") or {}).items():
            if err != "success":
                reason = "download: " + redact(str(err))[:80]        # no signed-URL credentials in the manifest
                skipped[reason] = skipped.get(reason, 0) + int(count)
    return {"samples": samples, "skipped": skipped}


# --------------------------------------------------------------------------------------------
#                                          CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.download", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=table())
    p.add_argument("dataset", nargs="?", help="a name from the table below")
    p.add_argument("--out", help="raw set folder to create (or complete)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--samples", type=int, help="take the first N samples (or the archives that hold them)")
    g.add_argument("--fraction", type=float, help="take this fraction of the set (0-1]")
    p.add_argument("--resolution", type=int, help="shapes: drawn size; others: short-side cap on download")
    p.add_argument("--output-format", choices=["files", "webdataset", "parquet"],
                   help="img2dataset output layout (default: parquet; files for shapes)")
    p.add_argument("--processes", type=int, default=1, help="img2dataset processes (about one per core)")
    p.add_argument("--threads", type=int, default=32, help="img2dataset download threads per process")
    p.add_argument("--min-image-size", type=int, help="img2dataset drops images with a shorter short side "
                   "(default: the set's min size from dataprep/specs.py)")
    p.add_argument("--seed", type=int, default=0, help="shapes: scene seed")
    p.add_argument("--links-file", help="sa1b: the links file from the SA-1B download page")
    p.add_argument("--url-list", help="a local copy of the set's URL list")
    p.add_argument("--keep-archives", action="store_true", help="keep archives after extraction")
    p.add_argument("--concurrency", type=int, default=4, help="archives downloaded at once")
    p.add_argument("--retries", type=int, default=2, help="retries per file (archives) or per URL (img2dataset)")
    p.add_argument("--allow-file-urls", action="store_true", help="accept file:// links in --links-file")
    p.add_argument("--list", action="store_true", help="print the dataset table and exit")
    a = p.parse_args(argv)
    if a.list or not a.dataset:
        print(table())
        return
    if not a.out:
        raise UserError("--out is required: the raw set folder to create")
    check_positive(processes=a.processes, threads=a.threads, concurrency=a.concurrency, resolution=a.resolution)
    if a.retries < 0:
        raise UserError(f"--retries {a.retries}: give 0 or more")
    path = download(a.dataset, a.out, a.samples, a.fraction, a.resolution, a.output_format, a.processes,
                    a.threads, a.seed, a.links_file, a.url_list, retries=a.retries, keep_archives=a.keep_archives,
                    concurrency=a.concurrency, allow_file_urls=a.allow_file_urls, min_image_size=a.min_image_size)
    m = Manifest.read(path)
    print(f"{path}: {m.samples} samples, skipped {m.skipped or 'none'}, {m.bytes / 1e6:.1f} MB, "
          f"{m.wall_seconds:.1f} s")


if __name__ == "__main__":
    run_cli(main)
