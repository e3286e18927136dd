"""Credentials stay out of logs, other processes' shared memory is left alone, downloaded weights are pinned."""
import hashlib
import http.server
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from microdit.cli import UserError
from microdit.redact import install_log_redaction, redact

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("SECRETPOLICY", "SECRETSIGNATURE", "SECRETKEYPAIR")
SIGNED = "?Policy=SECRETPOLICY&Signature=SECRETSIGNATURE&Key-Pair-Id=SECRETKEYPAIR"


class _Server:
    """Loopback HTTP server: `files` by path are served, anything else answers 500 (a retryable failure)."""

    def __init__(self, files: dict[str, bytes] | None = None):
        files = files or {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = files.get(self.path.split("?")[0])
                if body is None:
                    self.send_error(500, "server trouble")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- redaction

def test_redact_removes_query_strings_and_credential_pairs():
    text = f"GET https://cdn.example/sa_000001.tar{SIGNED}#frag failed; retry with Signature=SECRETSIGNATURE"
    out = redact(text)
    assert not any(s in out for s in SECRETS), out
    assert "https://cdn.example/sa_000001.tar?<redacted>" in out and "Signature=<redacted>" in out
    assert redact("plain https://host/path/file.tar and no query") == "plain https://host/path/file.tar and no query"


def test_every_log_record_is_redacted_once_installed(caplog):
    install_log_redaction()
    log = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        log.warning("download %s failed", f"https://cdn.example/x.tar{SIGNED}")
        try:
            raise OSError(f"connection reset by https://cdn.example/x.tar{SIGNED}")
        except OSError:
            log.exception("giving up")
    text = caplog.text + "".join(logging.Formatter().format(r) for r in caplog.records)
    assert "x.tar?<redacted>" in text
    assert not any(s in text for s in SECRETS), text


FETCH = """
import sys
from microdit.cli import run_cli
from dataprep.fetch import fetch_url
run_cli(lambda argv: fetch_url(sys.argv[1], sys.argv[2], retries=1, delay=0.1, progress=False))
"""


def test_a_failing_signed_link_is_never_printed(tmp_path):
    """A signed CDN link (SA-1B style) that fails on a loopback server, fetched as a command does: the retry
    warning and the final error name the file, never its Policy, Signature or Key-Pair-Id."""
    with _Server() as server:
        r = subprocess.run([sys.executable, "-c", FETCH, f"{server.base}/sa_000000.tar{SIGNED}",
                            str(tmp_path / "sa_000000.tar")],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "retry 1/1" in out and "sa_000000.tar?<redacted>" in out and "error: download" in out, out[-3000:]
    assert not any(s in out for s in SECRETS), out[-3000:]


# ---------------------------------------------------------------- shared memory

def test_precompute_leaves_other_processes_shared_memory_alone(tmp_path):
    """A /dev/shm entry named like streaming's (NNNNNN_locals) that this run did not create survives it."""
    from multiprocessing import shared_memory

    from PIL import Image
    from streaming.base.constant import SHM_TO_CLEAN

    from dataprep.convert import ConvertConfig, convert
    from dataprep.precompute import PrecomputeConfig, precompute
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, color in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (32, 32), color).save(raw / f"{i}.png")
        (raw / f"{i}.txt").write_text(f"a {color} square")
    prefix = next(p for p in range(1000) if not any(Path(f"/dev/shm/{p:06d}_{n}").exists() for n in SHM_TO_CLEAN))
    name = f"{prefix:06d}_locals"          # where streaming's global clean-up would look first
    foreign = shared_memory.SharedMemory(name, create=True, size=4)
    try:
        conv = convert(ConvertConfig(str(raw), str(tmp_path / "conv"), min_size=16), progress=False)
        precompute(PrecomputeConfig(str(conv), str(tmp_path / "lat"), resolutions=(16,), image_autoencoder="pixel:2",
                                    text_encoder="tiny-clip:16", engine="local", unit_samples=8, progress=False))
        assert Path(f"/dev/shm/{name}").exists(), "precompute removed shared memory it did not create"
    finally:
        foreign.close()
        foreign.unlink()


# ---------------------------------------------------------------- pinned downloads

def test_inception_download_is_checked_against_its_pin_before_loading(tmp_path, monkeypatch):
    import torch

    from microdit.evaluate import frechet
    payload = b"a stand-in for the Inception TorchScript file" * 100
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MICRODIT_OFFLINE", raising=False)
    with _Server({"/inception-2015-12-05.pt": payload}) as server:
        url = f"{server.base}/inception-2015-12-05.pt"
        cached = Path(torch.hub.get_dir()) / "checkpoints" / "inception-2015-12-05.pt"
        monkeypatch.delenv(frechet.INCEPTION_SHA256_ENV, raising=False)
        with pytest.raises(UserError, match=frechet.INCEPTION_SHA256_ENV):          # no pin: no download
            frechet._fetch_inception(url)
        monkeypatch.setenv(frechet.INCEPTION_SHA256_ENV, "0" * 64)
        with pytest.raises(UserError, match="sha256 .* not the pinned 0{64}: refusing to load"):
            frechet._fetch_inception(url)
        assert not cached.exists() and not list(cached.parent.glob("*.part"))   # nothing kept under the name
        monkeypatch.setenv(frechet.INCEPTION_SHA256_ENV, hashlib.sha256(payload).hexdigest())
        assert frechet._fetch_inception(url) == cached and cached.read_bytes() == payload
        cached.write_bytes(payload + b"tampered")                                  # the cache is checked too
        with pytest.raises(UserError, match="cached Inception weights"):
            frechet._fetch_inception(url)
