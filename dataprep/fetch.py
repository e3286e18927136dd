"""Small, careful file downloaders for archive sets (plain HTTP and Hugging Face dataset files).

Every fetch retries with growing delays, skips a file that is already complete on disk, and writes to a
temporary name that is renamed only when the file is whole, so an interrupted run never leaves a
half-written file behind under the final name. Extraction works the same way (temporary folder, rename).
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def _with_retries(what: str, fn, retries: int, delay: float):
    for attempt in range(retries + 1):
        try:
            return fn()
        except (urllib.error.HTTPError,) as e:
            if e.code in (401, 403, 404):               # retrying will not help: say what to do
                raise RuntimeError(f"{what}: HTTP {e.code} {e.reason} (gated set? accept its terms and log in, "
                                   "or check the URL in dataprep/specs.py)") from e
            err = e
        except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as e:
            err = e
        if attempt < retries:
            wait = delay * (2 ** attempt)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, err, attempt + 1, retries, wait)
            time.sleep(wait)
    raise RuntimeError(f"{what} failed after {retries + 1} attempts: {err}") from err


def fetch_url(url: str, dest: str | os.PathLike, retries: int = 4, delay: float = 2.0,
              timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists); write `dest.part`, then rename."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")

    def once():
        req = urllib.request.Request(url, headers={"User-Agent": "micro-budget-dataprep/0.1"})
        with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            bar = _bar(total, dest.name, progress)
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
            if total and f.tell() != total:
                raise OSError(f"truncated download: got {f.tell()} of {total} bytes")
        os.replace(tmp, dest)
        return dest

    try:
        return _with_retries(f"download {url}", once, retries, delay)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_hf_file(repo_id: str, filename: str, dest_dir: str | os.PathLike, repo_type: str = "dataset",
                  retries: int = 4, delay: float = 2.0) -> Path:
    """One file of a Hugging Face repo into dest_dir/filename (skipped when present)."""
    dest = Path(dest_dir) / filename
    if dest.exists():
        return dest
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise RuntimeError(f"{repo_id}/{filename} is not on disk and HF_HUB_OFFLINE is set: unset it on a "
                           "connected machine (gated sets also need `huggingface-cli login`)")
    from huggingface_hub import hf_hub_download     # writes .incomplete files and renames when done

    def once():
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=str(dest_dir)))
    return _with_retries(f"download {repo_id}/{filename}", once, retries, delay)


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a .tar/.tgz/.tar.gz/.zip into `dest` (skipped when `dest` exists); temp folder, then rename."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (corrupt download? delete it and rerun)")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=name, disable=not enabled, leave=False)
