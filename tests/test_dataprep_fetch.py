"""Archive downloads over loopback HTTP: Range resume, several at once, untrusted links files and tar members."""
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataprep.archives import download_archives, read_links_file
from dataprep.fetch import extract, fetch_url
from dataprep.specs import get_spec
from microdit.cli import UserError


def jpeg(w=40, h=40):
    buf = io.BytesIO()
    Image.effect_noise((w, h), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tar_bytes(members: dict) -> bytes:
    """A tar of {name: bytes | TarInfo-kind tuple}: ("sym", target), ("link", target), ("dev", None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                kind, target = data
                info.type = {"sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE, "dev": tarfile.CHRTYPE}[kind]
                info.linkname = target or ""
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Archive(BaseHTTPRequestHandler):
    """Serves server.files with an ETag and byte ranges (unless honor_range is off); can drop half-way."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.lstrip("/").split("?")[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
        if path in srv.barrier_paths:
            srv.barrier.wait(timeout=10)                 # two downloads must be in flight at once
        body = srv.files.get(path)
        if body is None:
            self.send_error(404)
            return
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        start, rng = 0, self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and srv.honor_range and (if_range is None or if_range == etag):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        send = body[start:]
        drop = srv.drop_after.pop(path, None)
        if drop is not None:
            send = send[:drop]
        with srv.lock:
            srv.bytes_served += len(send)              # counted before sending: the client may finish first
        self.wfile.write(send)
        if drop is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Archive)
    httpd.daemon_threads = True
    httpd.files, httpd.drop_after, httpd.honor_range, httpd.bytes_served = {}, {}, True, 0
    httpd.requests, httpd.lock, httpd.barrier_paths, httpd.barrier = [], threading.Lock(), set(), None
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
#                                        Range resume
# ------------------------------------------------------------------------------------------------

def test_dropped_download_resumes_with_range_and_fetches_only_the_rest(server, tmp_path):
    body = os.urandom(300_000)
    server.files["sa_000000.tar"] = body
    server.drop_after["sa_000000.tar"] = 120_000
    url, dest = f"{server.base}/sa_000000.tar?Policy=p&Signature=s", tmp_path / "sa_000000.tar"
    with pytest.raises(RuntimeError, match="connection ended at 120000 of 300000") as e:
        fetch_url(url, dest, retries=0, progress=False)
    assert "Signature" not in str(e.value)                        # signed links are not printed
    assert not dest.exists() and (tmp_path / "sa_000000.tar.part").stat().st_size == 120_000
    server.bytes_served = 0
    fetch_url(url, dest, retries=0, progress=False)               # the rerun
    assert server.bytes_served == 300_000 - 120_000               # only the rest
    assert server.requests[-1][1] == "bytes=120000-"
    assert sha(dest.read_bytes()) == sha(body)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sa_000000.tar"]


def test_retry_within_one_call_continues_where_the_connection_dropped(server, tmp_path):
    body = os.urandom(100_000)
    server.files["a.tar"] = body
    server.drop_after["a.tar"] = 30_000
    dest = fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=1, delay=0.01, progress=False)
    assert sha(dest.read_bytes()) == sha(body) and server.bytes_served == 100_000


def test_server_that_ignores_range_restarts_the_file_cleanly(server, tmp_path):
    body = os.urandom(200_000)
    server.files["a.tar"] = body
    server.drop_after["a.tar"] = 50_000
    with pytest.raises(RuntimeError):
        fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=0, progress=False)
    server.honor_range, server.bytes_served = False, 0
    dest = fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=0, progress=False)
    assert server.bytes_served == 200_000 and sha(dest.read_bytes()) == sha(body)     # not 50 000 + 200 000


def test_changed_file_on_the_server_is_fetched_whole(server, tmp_path):
    server.files["a.tar"] = os.urandom(80_000)
    server.drop_after["a.tar"] = 20_000
    with pytest.raises(RuntimeError):
        fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=0, progress=False)
    new = os.urandom(90_000)
    server.files["a.tar"] = new                                   # new ETag: If-Range fails, 200 with the whole file
    dest = fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=0, progress=False)
    assert sha(dest.read_bytes()) == sha(new)


def test_partial_without_validators_is_not_trusted(server, tmp_path):
    body = os.urandom(10_000)
    server.files["a.tar"] = body
    (tmp_path / "a.tar.part").write_bytes(b"junk" * 100)          # no .part.json: cannot be checked
    dest = fetch_url(f"{server.base}/a.tar", tmp_path / "a.tar", retries=0, progress=False)
    assert dest.read_bytes() == body and server.requests[-1][1] is None
    (tmp_path / "b.tar.part").write_bytes(b"junk" * 100)
    (tmp_path / "b.tar.part.json").write_text('{"etag": "x", "len')  # cut short by a kill: unreadable
    server.files["b.tar"] = body
    assert fetch_url(f"{server.base}/b.tar", tmp_path / "b.tar", retries=0, progress=False).read_bytes() == body


# ------------------------------------------------------------------------------------------------
#                                     several at once, one layer
# ------------------------------------------------------------------------------------------------

def _sa1b(server, tmp_path, archives: dict, captions: dict, links: str | None = None):
    for name, data in archives.items():
        server.files[f"cdn/{name}"] = data
    server.files["SA1B_caption.tar.gz"] = tar_bytes({f"captions/{k}.txt": v.encode() for k, v in captions.items()})
    links_file = tmp_path / "links.txt"
    links_file.write_text(links or "file_name\tcdn_link\n" + "".join(
        f"{n}\t{server.base}/cdn/{n}?Key-Pair-Id=k&Signature=s\n" for n in archives))
    spec = dataclasses.replace(get_spec("sa1b"), extra_files=(f"{server.base}/SA1B_caption.tar.gz",), per_part=2)
    return spec, links_file


def test_archives_download_concurrently_and_resume(server, tmp_path):
    archives = {f"sa_00000{i}.tar": tar_bytes({f"sa_{i}{j}.jpg": jpeg() for j in range(2)}) for i in range(3)}
    spec, links = _sa1b(server, tmp_path, archives, {f"sa_{i}{j}": f"scene {i}{j}" for i in range(3) for j in range(2)})
    server.barrier_paths = {"cdn/sa_000000.tar", "cdn/sa_000001.tar"}
    server.barrier = threading.Barrier(2)                         # sequential downloads would time out here
    server.drop_after["cdn/sa_000002.tar"] = 1000
    out = tmp_path / "sa1b"
    with pytest.raises(RuntimeError, match="sa_000002.tar"):
        download_archives(spec, out, 6, None, links_file=str(links), retries=0, concurrency=3)
    assert (out / "images" / "sa_000000").is_dir() and (out / "images" / "sa_000001").is_dir()
    assert (out / "_input" / "sa_000002.tar.part").stat().st_size == 1000
    served = server.bytes_served
    server.barrier_paths = set()
    stats = download_archives(spec, out, 6, None, links_file=str(links), retries=0, concurrency=3)
    assert server.bytes_served - served == len(archives["sa_000002.tar"]) - 1000      # the rest, nothing else
    assert stats == {"samples": 6, "skipped": {}, "layout": "index.parquet"}
    assert not list((out / "_input").glob("sa_*.tar*"))


# ------------------------------------------------------------------------------------------------
#                                  untrusted links files and members
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../victim/important.tar", "/abs/important.tar", ".hidden.tar",
                                  "sub/x.tar", "sub\\x.tar", "..", "a..b.tar"])
def test_links_file_with_a_path_for_file_name_writes_and_deletes_nothing(server, tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.tar").write_bytes(tar_bytes({"x.jpg": jpeg()}))
    marker = victim / "marker.txt"
    marker.write_text("keep me")
    before = {p: p.read_bytes() for p in victim.iterdir()}
    good = tar_bytes({"sa_1.jpg": jpeg()})
    spec, links = _sa1b(server, tmp_path, {"important.tar": good}, {"sa_1": "x"},
                        links=f"file_name\tcdn_link\n{name}\t{server.base}/cdn/important.tar\n")
    out = tmp_path / "sa1b"                                      # _input/../.. is tmp_path: the victim
    with pytest.raises(UserError, match=r"links.txt line 2: file_name .* is not a plain file name"):
        download_archives(spec, out, 2, None, links_file=str(links), retries=0)
    assert {p: p.read_bytes() for p in victim.iterdir()} == before
    assert not [r for r in server.requests if r[0].startswith("cdn/")]          # nothing fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["links.txt", "victim"]  # nothing written anywhere


def test_links_file_urls_http_only_unless_file_urls_allowed(server, tmp_path):
    local = tmp_path / "local.tar"
    local.write_bytes(tar_bytes({"sa_1.jpg": jpeg(), "sa_2.jpg": jpeg()}))
    spec, links = _sa1b(server, tmp_path, {}, {"sa_1": "a cat", "sa_2": "a dog"},
                        links=f"file_name\tcdn_link\nsa_000000.tar\t{local.as_uri()}\n")
    with pytest.raises(UserError, match="only http:// and https://.*--allow-file-urls"):
        download_archives(spec, tmp_path / "out", 2, None, links_file=str(links), retries=0)
    for bad in ("ftp://host/x.tar", "gopher://h/x", "/etc/passwd"):
        links.write_text(f"file_name\tcdn_link\nsa_000000.tar\t{bad}\n")
        with pytest.raises(UserError, match="line 2: cdn_link"):
            read_links_file(links)
    links.write_text(f"file_name\tcdn_link\nsa_000000.tar\t{local.as_uri()}\n")
    stats = download_archives(spec, tmp_path / "out", 2, None, links_file=str(links), retries=0,
                              allow_file_urls=True)
    assert stats["samples"] == 2 and local.exists()                # the user's own file is not deleted


def test_refused_tar_members_are_counted_skips_not_tracebacks(server, tmp_path):
    outside = tmp_path / "outside.txt"
    evil = tar_bytes({"sa_1.jpg": jpeg(), "sa_2.jpg": jpeg(), str(outside): b"abs", "../../escape.txt": b"up",
                      "link.jpg": ("sym", "/etc/passwd"), "hard.jpg": ("link", "/etc/passwd"),
                      "dev": ("dev", None), "sub/../../up2.txt": b"up"})
    spec, links = _sa1b(server, tmp_path, {"sa_000000.tar": evil}, {"sa_1": "a cat", "sa_2": "a dog"})
    out = tmp_path / "a" / "b" / "sa1b"
    stats = download_archives(spec, out, 2, None, links_file=str(links), retries=0)
    assert stats["samples"] == 2 and stats["skipped"] == {"archive_member_refused": 6}
    assert not outside.exists() and not (tmp_path / "a" / "escape.txt").exists()
    assert sorted(p.name for p in (out / "images" / "sa_000000").iterdir()) == ["sa_1.jpg", "sa_2.jpg"]
    again = download_archives(spec, out, 2, None, links_file=str(links), retries=0)   # rerun keeps the count
    assert again["skipped"] == {"archive_member_refused": 6}


def test_extract_refuses_zip_members_outside(tmp_path):
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok/a.txt", "a")
        z.writestr("../up.txt", "x")
        z.writestr("/abs.txt", "x")
    (tmp_path / "x.zip").write_bytes(buf.getvalue())
    assert extract(tmp_path / "x.zip", tmp_path / "x") == {"archive_member_refused": 2}
    assert [p.name for p in (tmp_path / "x").rglob("*") if p.is_file()] == ["a.txt"]


def test_cli_refuses_a_crafted_links_file_with_one_line(tmp_path):
    links = tmp_path / "links.txt"
    links.write_text("file_name\tcdn_link\n../../victim/important.tar\thttp://127.0.0.1:9/x\n")
    r = subprocess.run([sys.executable, "-m", "dataprep.download", "sa1b", "--out", str(tmp_path / "o"),
                        "--samples", "2", "--links-file", str(links)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "links.txt line 2: file_name '../../victim/important.tar' is not a plain file name" in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.tar"))


# ------------------------------------------------------------------------------------------------
#                                 img2dataset sized by the caller
# ------------------------------------------------------------------------------------------------

def png_bytes(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, h % 256, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_url_set_as_parquet_with_min_image_size_applied_by_img2dataset(server, tmp_path):
    from dataprep.download import _no_proxy_for_loopback, download
    from dataprep.readers import detect_layout
    from microdit.manifest import Manifest
    _no_proxy_for_loopback()
    sizes = {"a.png": (32, 32), "b.png": (48, 48), "c.png": (64, 40), "d.png": (39, 80)}
    for name, (w, h) in sizes.items():
        server.files[name] = png_bytes(w, h)
    tsv = tmp_path / "list.tsv"
    tsv.write_text("".join(f"{server.base}/{n}\tpicture {n}\n" for n in sizes))
    raw = download("cc12m", tmp_path / "raw", samples=4, resolution=64, output_format="parquet", processes=2,
                   threads=4, url_list=str(tsv), min_image_size=40)
    m = Manifest.read(raw)
    assert detect_layout(raw) == "parquet" and m.config["min_image_size"] == 40
    assert m.samples == 2 and sum(m.skipped.values()) == 2                 # a (32) and d (39) never written
    assert all("small" in reason for reason in m.skipped), m.skipped
    served = {p for p, _ in server.requests}
    assert served == set(sizes)                                             # fetched once, filtered on arrival
    rows = pq.read_table(sorted(raw.glob("*.parquet"))[0]).to_pylist()
    kept = sorted(Image.open(io.BytesIO(r["jpg"])).size for r in rows if r["status"] == "success")
    assert kept == [(48, 48), (64, 40)]


def test_profile_sizes_the_download_step(tmp_path):
    from flows.profiles import get_profile
    from flows.steps import download_step
    from dataprep.readers import detect_layout
    from microdit.manifest import Manifest
    p = get_profile("local", {"datasets": [{"dataset": "shapes", "samples": 6}], "download_format": "parquet",
                              "download_threads": 2, "min_image_size": 40})
    raw, _ = download_step(p, p.datasets[0], tmp_path)
    m = Manifest.read(raw)
    assert detect_layout(raw) == "parquet" and m.samples == 6               # 64 px shapes >= 40
    assert get_profile("paper").download_format in ("parquet", "webdataset")
    too_big = get_profile("local", {"datasets": [{"dataset": "shapes", "samples": 6}], "min_image_size": 65})
    raw, _ = download_step(too_big, too_big.datasets[0], tmp_path)
    assert Manifest.read(raw).samples == 0                                  # every 64 px image under 65
