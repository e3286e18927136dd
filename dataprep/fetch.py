"""Small, careful file downloaders for archive sets (plain HTTP and Hugging Face dataset files).

    path = fetch_url("https://host/sa_000000.tar?sig=...", "data/sa1b-raw/_input/sa_000000.tar")

A download is written to `<dest>.part` and renamed only when it is whole, so nothing half-written ever
carries the final name. An interrupted download (a dropped connection, a killed run) keeps its `.part`
and continues with an HTTP Range request on the next attempt or the next run: the server's ETag (or
Last-Modified) and total size, recorded in `<dest>.part.json` when the download started, must still
match, else the part is discarded and the file fetched from the start. A server that ignores Range
(answers 200 instead of 206) restarts the file cleanly.

This module is the one retry layer for archive files: `fetch_url` retries with growing delays and
resumes where the last attempt stopped; the flow's download task does not retry on top of it.
Only http(s) URLs are fetched; `file://` needs `allow_file=True`. URLs in messages lose their query
string (signed CDN links carry credentials there).

Extraction works the same way (temporary folder, rename) and never writes outside its folder: a member
with an absolute path or `..`, a link or a device is refused, counted and logged, not extracted.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from microdit.cli import UserError
from microdit.manifest import write_json_atomic
from microdit.redact import redact

log = logging.getLogger(__name__)

USER_AGENT = "micro-budget-dataprep/0.1"
CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
#                                     URLs and names
# --------------------------------------------------------------------------------------------

class DownloadError(UserError, RuntimeError):
    """A file could not be fetched; the message says what to do (a fresh link, a login, a rerun)."""


def check_url(url: str, allow_file: bool = False, where: str = "") -> str:
    """`url` when its scheme may be fetched: http(s), and file:// only when allowed."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https") or (scheme == "file" and allow_file):
        return url
    hint = " (pass --allow-file-urls to read local files)" if scheme == "file" else ""
    raise UserError(f"{where}{redact(url)!r}: only http:// and https:// URLs are downloaded{hint}")


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


def check_file_name(name: str, where: str = "") -> str:
    """`name` when it is a plain file name: no path separators, no `..`, no leading dot."""
    if not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise UserError(f"{where}{name!r} is not a plain file name (letters, digits, '_', '-', '.'; no '/', "
                        "no '..', no leading dot): fix that row or use the original file")
    return name


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path` resolved, when it lies under `root`; anything else is refused (no write or delete outside)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise UserError(f"{path} is outside {root}: refusing to write or delete there")
    return p


# --------------------------------------------------------------------------------------------
#                                         Fetching
# --------------------------------------------------------------------------------------------

def _with_retries(what: str, fn, retries: int, delay: float):
    for attempt in range(retries + 1):
        try:
            return fn()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404, 410):             # retrying will not help: say what to do
                raise DownloadError(f"{what}: HTTP {e.code} {e.reason} (gated set? accept its terms and log in; "
                                    "an expired signed link? get a fresh links file; else check the URL in "
                                    "dataprep/specs.py)") from None
            err = e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:   # incl. a dropped connection
            err = e
        if attempt < retries:
            wait = delay * (2 ** attempt)
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, err, attempt + 1, retries, wait)
            time.sleep(wait)
    raise DownloadError(f"{what} failed after {retries + 1} attempts: {err}; rerun to continue from the part "
                        "already downloaded") from None


def fetch_url(url: str, dest: str | os.PathLike, retries: int = 4, delay: float = 2.0, timeout: float = 60.0,
              progress: bool = True, allow_file: bool = False) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists), resuming a `.part` left by an earlier attempt."""
    dest = Path(dest)
    if dest.exists():
        return dest
    check_url(url, allow_file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def once():
        _download_resuming(url, part, timeout, progress, dest.name)
        os.replace(part, dest)
        _validators_path(part).unlink(missing_ok=True)
        return dest
    return _with_retries(f"download {redact(url)}", once, retries, delay)


def _validators_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validators_path(part).unlink(missing_ok=True)


def _download_resuming(url: str, part: Path, timeout: float, progress: bool, name: str) -> None:
    """Bring `part` to the whole file: continue it with a Range request when its validators still hold."""
    meta_path = _validators_path(part)
    have = part.stat().st_size if part.exists() else 0
    try:
        meta = json.loads(meta_path.read_text()) if have and meta_path.exists() else {}
    except (OSError, ValueError):                          # unreadable: treated as absent (start over)
        meta = {}
    validator = meta.get("etag") or meta.get("last_modified")
    if have and not (validator and meta.get("length")):
        _discard(part)                                     # nothing to check a continuation against: start over
        have = 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": validator})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:                         # our part does not fit the server's file any more
            _discard(part)
            raise OSError(f"{name}: the server's file no longer matches the partial download; starting over") \
                from None
        raise
    with response as r:
        etag, length = r.headers.get("ETag"), int(r.headers.get("Content-Length") or 0)
        if getattr(r, "status", 200) == 206 and have:
            start, total = _content_range(r.headers.get("Content-Range", ""))
            if start != have or total != meta["length"] or (meta.get("etag") and etag and etag != meta["etag"]):
                _discard(part)
                raise OSError(f"{name}: the server's file changed since the partial download "
                              f"(range {start}, size {total}, ETag {etag}); starting over")
            mode = "ab"
        else:                                              # 200: the whole file (Range ignored, or file changed)
            have, total, mode = 0, length, "wb"
            meta = {"etag": etag, "last_modified": r.headers.get("Last-Modified"), "length": total}
            write_json_atomic(meta_path, meta)
        bar = _bar(total, name, progress)
        bar.update(have)
        with open(part, mode) as f:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
            size = f.tell()
        bar.close()
    if total and size != total:
        raise OSError(f"{name}: connection ended at {size} of {total} bytes (the next attempt continues from there)")


def _content_range(value: str) -> tuple[int, int]:
    """(first byte, total size) of a `Content-Range: bytes first-last/total` header."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value.strip())
    if not m:
        raise OSError(f"unexpected Content-Range {value!r}")
    return int(m.group(1)), int(m.group(3))


def fetch_hf_file(repo_id: str, filename: str, dest_dir: str | os.PathLike, repo_type: str = "dataset",
                  retries: int = 4, delay: float = 2.0) -> Path:
    """One file of a Hugging Face repo into dest_dir/filename (skipped when present)."""
    dest = Path(dest_dir) / filename
    if dest.exists():
        return dest
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DownloadError(f"{repo_id}/{filename} is not on disk and HF_HUB_OFFLINE is set: unset it on a "
                            "connected machine (gated sets also need `huggingface-cli login`)")
    from huggingface_hub import hf_hub_download     # writes .incomplete files, resumes them, renames when done

    def once():
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, local_dir=str(dest_dir)))
    return _with_retries(f"download {repo_id}/{filename}", once, retries, delay)


# --------------------------------------------------------------------------------------------
#                                        Extraction
# --------------------------------------------------------------------------------------------

REFUSED = "archive_member_refused"      # the skip reason of a member that would leave its folder


def _refusal(name: str, kind: str) -> str | None:
    """Why a member may not be extracted (None: it may)."""
    if kind not in ("file", "dir"):
        return f"a {kind}, not a regular file"
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if ".." in p.parts:
        return "a path with '..'"
    return None


def _tar_kind(m: tarfile.TarInfo) -> str:
    return ("file" if m.isfile() else "dir" if m.isdir() else "symlink" if m.issym() else "hard link" if m.islnk()
            else "device" if m.isdev() else "special file")


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Unpack a .tar/.tgz/.tar.gz/.zip into `dest` (skipped when `dest` exists); temp folder, then rename.

    Returns {"archive_member_refused": n} for members refused (absolute paths, `..`, links, devices),
    each logged with its name; an empty dict when every member was extracted (or nothing was to do).
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        return {}
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    refused = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    why = _refusal(info.filename, "dir" if info.is_dir() else "file")
                    if why:
                        refused.append((info.filename, why))
                    else:
                        z.extract(info, tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for m in t:
                    why = _refusal(m.name, _tar_kind(m))
                    if why:
                        refused.append((m.name, why))
                        continue
                    try:
                        t.extract(m, tmp, filter="data")
                    except tarfile.FilterError as e:       # anything else the "data" filter refuses
                        refused.append((m.name, str(e)))
        else:
            raise ValueError(f"{archive} is neither a zip nor a tar archive (corrupt download? delete it and rerun)")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, why in refused[:5]:
        log.warning("%s: refused member %r (%s): not extracted", archive.name, name, why)
    if len(refused) > 5:
        log.warning("%s: %d more members refused", archive.name, len(refused) - 5)
    return {REFUSED: len(refused)} if refused else {}


def _bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=name, disable=not enabled, leave=False)
