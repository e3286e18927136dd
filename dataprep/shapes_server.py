"""Serve the synthetic shapes set over a loopback HTTP server, so it is fetched like any URL-list set.

    python -m dataprep.shapes_server --samples 8 --resolution 64 --folder /tmp/shapes-list   # serve until Ctrl-C

    with ShapesServer(1000, resolution=64, folder=tmp) as server:
        img2dataset.download(url_list=str(server.url_list), input_format="parquet", ...)

The server binds 127.0.0.1 on an ephemeral port (port 0), renders every image once
(`microdit.shapes.generate_shapes`) as PNG into memory, and writes a URL list parquet with columns
`url`, `caption`, `sample_id` (stable: "shapes/<seed>-<index>") and `meta` (the ground truth as JSON).
img2dataset keeps `sample_id` and `meta` with each image (`save_additional_columns`).
For tests, `missing` (served as 404) and `corrupt` (served as garbage bytes) name indices to break.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from microdit.cli import check_positive, run_cli


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.server.images.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404, "no such image")
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):      # quiet: img2dataset makes thousands of requests
        pass


class ShapesServer:
    """Context manager: a loopback HTTP server of `n` shapes images plus their URL list parquet."""

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, folder: str | os.PathLike = ".",
                 missing=(), corrupt=(), tasks=None):
        self.n, self.resolution, self.seed, self.folder = int(n), int(resolution), int(seed), Path(folder)
        self.missing, self.corrupt, self.tasks = set(missing), set(corrupt), tasks
        self.url_list = self.folder / f"shapes-{self.n}-{self.resolution}-{self.seed}.parquet"
        self._httpd = self._thread = None

    def _render(self) -> tuple[dict, list[dict]]:
        from tqdm import tqdm

        from microdit.shapes import generate_shapes
        images, rows = {}, []
        gen = generate_shapes(self.n, resolution=self.resolution, seed=self.seed, tasks=self.tasks)
        for i, s in enumerate(tqdm(gen, total=self.n, desc="draw shapes", unit="img", leave=False)):
            name = f"{self.seed}-{i:07d}.png"
            if i in self.corrupt:
                images[name] = b"\x89PNG not really an image"
            elif i not in self.missing:
                buf = io.BytesIO()
                s.image.save(buf, format="PNG")
                images[name] = buf.getvalue()
            rows.append({"name": name, "caption": s.caption, "sample_id": f"shapes/{self.seed}-{i:07d}",
                         "meta": json.dumps(s.meta, sort_keys=True)})
        return images, rows

    def __enter__(self) -> "ShapesServer":
        import pyarrow as pa
        import pyarrow.parquet as pq
        images, rows = self._render()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.images = images
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="shapes-server", daemon=True)
        self._thread.start()
        self.folder.mkdir(parents=True, exist_ok=True)
        table = pa.table({"url": [f"{self.base_url}/{r['name']}" for r in rows],
                          "caption": [r["caption"] for r in rows],
                          "sample_id": [r["sample_id"] for r in rows],
                          "meta": [r["meta"] for r in rows]})
        tmp = self.url_list.with_name(self.url_list.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.url_list)
        return self

    def __exit__(self, *exc):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.shapes_server", description="Serve shapes images on loopback (for trying img2dataset by hand).")
    p.add_argument("--samples", type=int, default=16, help="number of images")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="scene seed")
    p.add_argument("--folder", default=".", help="where the URL list parquet is written")
    a = p.parse_args(argv)
    check_positive(samples=a.samples, resolution=a.resolution)
    with ShapesServer(a.samples, a.resolution, a.seed, a.folder) as s:
        print(f"serving {a.samples} images at {s.base_url}; URL list {s.url_list}; Ctrl-C stops")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    run_cli(main)
