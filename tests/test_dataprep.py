"""dataprep: readers, filter/convert with skip accounting, downloads (loopback HTTP + img2dataset)."""
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataprep.convert import ConvertConfig, convert
from dataprep.fetch import fetch_url
from dataprep.readers import detect_layout
from dataprep.specs import SPECS, get_spec, parts_for, subset_count
from microdit.manifest import Manifest


def png(w, h, color=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(w, h, color=(20, 140, 220)):
    buf = io.BytesIO()
    Image.effect_noise((w, h), 60).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# Each sample: (key, image bytes or None, caption bytes or None, expected skip reason or None).
def fault_samples():
    good = [(f"good{i}", png(48, 40 + i), f"a photo of thing {i}".encode(), None) for i in range(4)]
    return good + [
        ("corrupt", b"\x89PNG\r\n\x1a\n this is not an image", b"a caption", "image_corrupt"),
        ("truncated", jpeg(64, 64)[:600], b"a caption", "image_truncated"),
        ("nocaption", png(48, 48), None, "caption_missing"),
        ("badutf8", png(48, 48), b"caf\xe9 \xff\xfe", "caption_not_utf8"),
        ("emptycap", png(48, 48), b"  \n ", "caption_empty"),
        ("small", png(20, 64), b"a small image", "image_too_small"),
        ("good0", png(48, 48, (0, 0, 0)), b"same key again", "duplicate_id"),
        ("large", png(120, 90), b"a large image", None),
    ]


EXPECTED_SKIPS = {"image_corrupt": 1, "image_truncated": 1, "caption_missing": 1, "caption_not_utf8": 1,
                  "caption_empty": 1, "image_too_small": 1, "duplicate_id": 1}
EXPECTED_KEPT = {"good0", "good1", "good2", "good3", "large"}


def write_files_layout(root, samples):
    for i, (key, img, cap, _) in enumerate(samples):
        d = root / f"{i // 6:05d}"
        d.mkdir(parents=True, exist_ok=True)
        stem = d / f"{i:09d}"
        stem.with_suffix(".png").write_bytes(img)
        if cap is not None:
            stem.with_suffix(".txt").write_bytes(cap)
        stem.with_suffix(".json").write_text(json.dumps({"key": key, "meta": json.dumps({"i": i})}))
    return root


def write_webdataset(root, samples):
    root.mkdir(parents=True)
    with tarfile.open(root / "00000.tar", "w") as t:
        for i, (key, img, cap, _) in enumerate(samples):
            files = {"png": img, "json": json.dumps({"key": key}).encode()}
            if cap is not None:
                files["txt"] = cap
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return root


def write_csv_table(root, samples):
    root.mkdir(parents=True)
    lines = [b"path,caption,key"]
    for i, (key, img, cap, _) in enumerate(samples):
        (root / f"img{i}.png").write_bytes(img)
        lines.append(f"img{i}.png,".encode() + (b'"' + cap + b'"' if cap is not None else b"") + f",{key}".encode())
    (root / "list.csv").write_bytes(b"\n".join(lines) + b"\n")
    return root / "list.csv"


def check_converted(out, source):
    m = Manifest.read(out)
    assert m.kind == "raw" and m.samples == len(EXPECTED_KEPT)
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))]).to_pylist()
    assert {r["sample_id"] for r in rows} == {f"{source}/{k}" for k in EXPECTED_KEPT}
    by_id = {r["sample_id"]: r for r in rows}
    assert by_id[f"{source}/good1"]["caption"] == "a photo of thing 1"
    large = by_id[f"{source}/large"]
    assert (large["width"], large["height"]) == (53, 40)           # short side 90 -> 40, aspect kept
    assert Image.open(io.BytesIO(large["image"])).size == (53, 40)
    return m


@pytest.mark.parametrize("layout", ["files", "webdataset", "table"])
def test_convert_counts_every_fault_by_reason(tmp_path, layout):
    samples = fault_samples()
    writer = {"files": write_files_layout, "webdataset": write_webdataset, "table": write_csv_table}[layout]
    src = writer(tmp_path / "raw", samples)
    assert detect_layout(src) == layout
    out = convert(ConvertConfig(str(src), str(tmp_path / "clean"), source="mine", min_size=32, short_side=40),
                  progress=False)
    m = check_converted(out, "mine")
    expected = dict(EXPECTED_SKIPS)
    if layout == "table":                      # a CSV cannot tell a missing caption from an empty cell
        expected["caption_empty"] += expected.pop("caption_missing")
    assert m.skipped == expected
    assert all(m.metrics["examples"][r] for r in expected)     # each reason names where it happened


def test_img2dataset_parquet_output_is_read(tmp_path):
    samples = [s for s in fault_samples() if s[1] is not None and s[2] is not None]
    src = tmp_path / "pq"
    src.mkdir()
    tab = pa.table({"key": [s[0] for s in samples], "caption": [s[2].decode("utf-8", "replace") for s in samples],
                    "jpg": [s[1] for s in samples], "status": ["success"] * len(samples)})
    pq.write_table(tab, src / "00000.parquet")
    assert detect_layout(src) == "parquet"
    out = convert(ConvertConfig(str(src), str(tmp_path / "clean"), source="pq", min_size=32, short_side=40),
                  progress=False)
    m = Manifest.read(out)
    assert m.samples == len(EXPECTED_KEPT)
    assert m.skipped["caption_not_utf8"] == 1 and m.skipped["caption_empty"] == 1


def test_convert_rerun_is_skipped_and_config_change_redoes(tmp_path):
    src = write_files_layout(tmp_path / "raw", fault_samples())
    cfg = ConvertConfig(str(src), str(tmp_path / "clean"), source="mine", min_size=32, short_side=40)
    out = convert(cfg, progress=False)
    first = Manifest.read(out).created_at
    assert Manifest.read(convert(cfg, progress=False)).created_at == first
    cfg.min_size = 45                                                 # good0..3 are 48x40.. -> some too small now
    m = Manifest.read(convert(cfg, progress=False))
    assert m.created_at != first and m.skipped["image_too_small"] > 1


def test_spec_table_and_subsets():
    assert {"sa1b", "cc12m", "journeydb", "diffusiondb", "coco2014-val", "shapes"} <= set(SPECS)
    assert get_spec("cc12m").downloader == "img2dataset"
    assert get_spec("journeydb").downloader == "hf_files"
    assert subset_count(1000, samples=10) == 10 and subset_count(1000, fraction=0.25) == 250
    assert parts_for(get_spec("diffusiondb"), samples=2500) == [1, 2, 3]
    assert len(parts_for(get_spec("journeydb"), fraction=0.01)) == 2
    with pytest.raises(ValueError, match="unknown dataset"):
        get_spec("imagenet")


# ------------------------------------------------------------------------------------------------
#                                  downloads over loopback HTTP
# ------------------------------------------------------------------------------------------------

class _Flaky(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        srv.hits += 1
        body = b"x" * 5000
        if srv.hits <= srv.fail_first:
            self.send_error(503, "busy")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (100 if srv.truncate else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def flaky_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    httpd.hits, httpd.fail_first, httpd.truncate = 0, 2, False
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_fetch_retries_then_skips_finished_and_never_names_a_partial_file_finished(tmp_path, flaky_server):
    url = f"http://127.0.0.1:{flaky_server.server_address[1]}/a.bin"
    dest = fetch_url(url, tmp_path / "a.bin", retries=3, delay=0.01, progress=False)
    assert dest.read_bytes() == b"x" * 5000 and flaky_server.hits == 3
    fetch_url(url, tmp_path / "a.bin", retries=3, delay=0.01, progress=False)
    assert flaky_server.hits == 3                                      # finished file: no request at all
    flaky_server.fail_first, flaky_server.truncate = 0, True
    with pytest.raises(RuntimeError, match="failed after"):
        fetch_url(url, tmp_path / "b.bin", retries=1, delay=0.01, progress=False, timeout=2)
    assert not (tmp_path / "b.bin").exists()                          # only b.bin.part (+ .json), for a resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin.part", "b.bin.part.json"]


def test_shapes_through_img2dataset_keeps_ground_truth(tmp_path, output_format="files"):
    from dataprep.download import download
    from microdit.shapes import generate_shapes
    n = 24
    raw = download("shapes", tmp_path / "raw", samples=n, resolution=32, output_format=output_format,
                   missing=[3], corrupt=[5])
    m = Manifest.read(raw)
    assert m.kind == "raw" and m.samples == n - 2
    assert sum(m.skipped.values()) == 2 and all(k.startswith("download: ") for k in m.skipped)
    out = convert(ConvertConfig(str(raw), str(tmp_path / "clean"), min_size=16, short_side=64), progress=False)
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))]).to_pylist()
    truth = list(generate_shapes(n, resolution=32, seed=0))
    assert sorted(r["sample_id"] for r in rows) == [f"shapes/0-{i:07d}" for i in range(n) if i not in (3, 5)]
    for r in rows:
        i = int(r["sample_id"].rsplit("-", 1)[1])
        assert r["source"] == "shapes" and r["caption"] == truth[i].caption
        assert json.loads(r["meta"]) == json.loads(json.dumps(truth[i].meta))
        assert Image.open(io.BytesIO(r["image"])).convert("RGB").tobytes() == truth[i].image.tobytes()  # lossless
    again = download("shapes", tmp_path / "raw", samples=n, resolution=32, output_format=output_format)
    assert Manifest.read(again).created_at == m.created_at                # finished: skipped


class _Files(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.hits += 1
        body = self.server.files.get(self.path.lstrip("/").split("?")[0])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _zip(members: dict) -> bytes:
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_archive_set_coco_layout_over_loopback(tmp_path):
    """The archive downloader (COCO's layout: image zip + annotation zip) -> index.parquet -> convert."""
    import dataclasses

    from dataprep.archives import download_archives
    ann = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3)],
           "annotations": [{"image_id": 1, "caption": "a cat\non a mat"}, {"image_id": 1, "caption": "second"},
                           {"image_id": 2, "caption": "a dog"}, {"image_id": 3, "caption": " "}]}
    files = {"val2014.zip": _zip({f"val2014/COCO_val2014_{i:012d}.jpg": jpeg(40, 36) for i in (1, 2, 3)}),
             "annotations_trainval2014.zip": _zip({"annotations/captions_val2014.json": json.dumps(ann)})}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files, httpd.hits = files, 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        spec = dataclasses.replace(get_spec("coco2014-val"), parts=(f"{base}/val2014.zip",),
                                   extra_files=(f"{base}/annotations_trainval2014.zip",))
        out = tmp_path / "coco"
        stats = download_archives(spec, out, None, None, retries=0)
        assert stats["samples"] == 3 and not list(out.rglob("*.part")) and not list(out.rglob("*.extracting"))
        hits = httpd.hits
        download_archives(spec, out, None, None, retries=0)               # rerun: extracted parts are skipped
        assert httpd.hits == hits                                           # nothing fetched again
    finally:
        httpd.shutdown()
        httpd.server_close()
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["key"]: r["caption"] for r in rows} == {"1": "a cat on a mat", "2": "a dog", "3": ""}
    clean = convert(ConvertConfig(str(out), str(tmp_path / "clean"), source="coco2014-val", min_size=32),
                    progress=False)
    m = Manifest.read(clean)
    assert m.samples == 2 and m.skipped == {"caption_empty": 1}


@pytest.mark.slow
def test_url_list_set_subset_through_img2dataset_webdataset(tmp_path):
    """cc12m's path: a header-less url<TAB>caption list, a --samples subset, img2dataset webdataset output."""
    from dataprep.download import _no_proxy_for_loopback, download
    from dataprep.shapes_server import ShapesServer
    _no_proxy_for_loopback()
    with ShapesServer(12, resolution=48, folder=tmp_path / "srv", missing=[2]) as server:
        listing = pq.read_table(server.url_list).to_pylist()
        tsv = tmp_path / "cc12m.tsv"
        tsv.write_text("".join(f"{r['url']}\t{r['caption']}\n" for r in listing))
        raw = download("cc12m", tmp_path / "raw", samples=8, resolution=32, output_format="webdataset",
                       url_list=str(tsv), min_image_size=16)
    m = Manifest.read(raw)
    assert m.samples == 7 and sum(m.skipped.values()) == 1                   # 8 taken, #2 is a 404
    assert detect_layout(raw) == "webdataset"
    out = convert(ConvertConfig(str(raw), str(tmp_path / "clean"), min_size=16, short_side=64), progress=False)
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))]).to_pylist()
    assert len(rows) == 7 and all(r["source"] == "cc12m" for r in rows)
    assert {r["caption"] for r in rows} == {listing[i]["caption"] for i in range(8) if i != 2}
    assert all(min(r["width"], r["height"]) == 32 for r in rows)             # capped on download (keep_ratio)


def _tar(members: dict, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_archive_set_sa1b_layout_links_file_and_caption_folder(tmp_path):
    """SA-1B's path: a links file (file_name<TAB>url), tar parts, one <stem>.txt caption per image."""
    import dataclasses

    from dataprep.archives import download_archives
    files = {"cdn/x1?sig=1": _tar({f"sa_{i}.jpg": jpeg(40, 40) for i in (1, 2)}),
             "cdn/x2?sig=2": _tar({"sa_3.jpg": jpeg(40, 40)}),
             "SA1B_caption.tar.gz": _tar({"captions/sa_1.txt": b"a street", "captions/sa_2.txt": b"a tree",
                                          "captions/sa_3.txt": b"a cat"}, gz=True)}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files, httpd.hits = {k.split("?")[0]: v for k, v in files.items()}, 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        links = tmp_path / "links.txt"
        links.write_text(f"file_name\tcdn_link\nsa_000000.tar\t{base}/cdn/x1?sig=1\n"
                         f"sa_000001.tar\t{base}/cdn/x2?sig=2\n")
        spec = dataclasses.replace(get_spec("sa1b"), extra_files=(f"{base}/SA1B_caption.tar.gz",), per_part=2)
        out = tmp_path / "sa1b"
        stats = download_archives(spec, out, 2, None, links_file=str(links), retries=0)   # 2 samples: 1 part
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert stats["samples"] == 2 and (out / "images" / "sa_000000").is_dir()
    assert not (out / "images" / "sa_000001").exists() and not (out / "_input" / "sa_000000.tar").exists()
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["key"]: r["caption"] for r in rows} == {"sa_1": "a street", "sa_2": "a tree"}
