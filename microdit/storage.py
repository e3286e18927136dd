"""Where data sets live: a local folder or an object-storage URL (s3://bucket/prefix, gs://, oci://, ...).

    from microdit.storage import is_remote, join, read_json, upload_file, list_files
    if is_remote("s3://bucket/latents"): read_json(join("s3://bucket/latents", "manifest.json"))

Every URL scheme MosaicML streaming can write and read works; its uploaders and downloaders do the
transfers. Endpoint and credentials come only from the standard environment variables of each store
(`S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_PROFILE`,
`GOOGLE_APPLICATION_CREDENTIALS`, ...), never from a file of this project, and are never logged.
"""
from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from pathlib import Path

from .cli import UserError


def is_remote(path) -> bool:
    """True for an object-storage URL (a scheme streaming can upload to), False for a local path."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    if len(scheme) < 2:                              # "" or a drive letter
        return False
    from streaming.base.storage.upload import UPLOADERS
    if scheme not in UPLOADERS:
        raise UserError(f"{path}: streaming cannot write to {scheme}:// URLs; use a local folder or one of "
                         f"{', '.join(sorted(s for s in UPLOADERS if '/' not in s))}")
    return True


def location(path) -> str:
    """An asset's canonical name: a URL as given (object storage, or a scheme this project does not
    write, such as https://), else the absolute local path."""
    if len(urllib.parse.urlparse(str(path)).scheme) >= 2:
        return str(path).rstrip("/")
    return str(Path(path).resolve())


def join(base, *parts) -> str:
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *[str(p).strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


def cache_folder(url: str, root) -> Path:
    """The local folder that caches `url` under `root` (stable per URL, readable name)."""
    import hashlib
    name = urllib.parse.urlparse(url).path.strip("/").replace("/", "_")[-60:] or "root"
    return Path(root) / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _explain(url: str, e: Exception) -> Exception:
    """A transfer error as a message that says what to check (without any credential value)."""
    hint = ("check the URL, that the bucket exists, and the store's environment variables "
            "(S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://)")
    return UserError(f"{url}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; {hint}")


_clients: dict = {}


def _downloader(url: str):
    """One streaming downloader per scheme and process (creating an S3 client costs ~0.5 s)."""
    from streaming.base.storage.download import CloudDownloader
    key = (urllib.parse.urlparse(url).scheme, os.getpid())
    if key not in _clients:
        _clients[key] = CloudDownloader.get(url)
    return _clients[key]


def uploader(local_root, url_root: str):
    """A streaming uploader from `local_root` to `url_root` (one per pair and process)."""
    from streaming.base.storage.upload import CloudUploader
    key = (str(local_root), url_root.rstrip("/"), os.getpid())
    if key not in _clients:
        try:
            _clients[key] = CloudUploader.get((str(local_root), url_root.rstrip("/")), keep_local=True,
                                              exist_ok=True)
        except Exception as e:
            raise _explain(url_root, e) from e
    return _clients[key]


def download_file(url: str, local, timeout: float = 120) -> Path:
    """Copy one object to `local`, replacing what is there (written under a temporary name, then renamed)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        _downloader(url).download(url, str(tmp), timeout)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if _is_missing(e):
            raise FileNotFoundError(f"{url} does not exist") from None
        raise _explain(url, e) from e
    os.replace(tmp, local)
    return local


def _is_missing(e: Exception) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
    return code in ("404", "NoSuchKey", "NotFound") or "not found" in str(e).lower()


def read_json(path) -> dict | None:
    """A JSON file from a local path or a URL; None when it does not exist."""
    if not is_remote(path):
        p = Path(path)
        return json.loads(p.read_text()) if p.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(download_file(str(path), Path(tmp) / "f.json").read_text())
        except FileNotFoundError:
            return None


def upload_file(local, url: str) -> None:
    """Copy the local file to the object `url` (same base name)."""
    local = Path(local)
    base, name = url.rsplit("/", 1)
    if name != local.name:
        raise ValueError(f"upload_file keeps names: {local.name} -> {url}")
    upload_relative(local.parent, base, name)


def upload_relative(local_root, url_root: str, relative: str) -> None:
    """Copy local_root/relative to url_root/relative."""
    try:
        uploader(local_root, url_root).upload_file(relative)
    except Exception as e:
        raise _explain(join(url_root, relative), e) from e


def list_files(url: str, prefix: str = "") -> list[str]:
    """Names (relative to `url`) of the objects under `url`/`prefix`."""
    scratch = Path(tempfile.gettempdir()) / f"microdit-list-{os.getpid()}"      # the uploader wants a folder
    try:
        names = uploader(scratch, url).list_objects(prefix) or []
    except Exception as e:
        raise _explain(url, e) from e
    root = urllib.parse.urlparse(url).path.strip("/")
    return sorted(n[len(root):].lstrip("/") if root and n.startswith(root) else n for n in names)
