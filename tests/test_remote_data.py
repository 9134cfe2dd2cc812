"""Data read through fsspec URLs, against a real HTTP server on 127.0.0.1 (started in the test, no network):
tar shards while training, with a dropped connection retried and counted; parquet; a missing filesystem package."""

from __future__ import annotations

import functools
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest  # fsspec's http filesystem needs aiohttp: the dev extra installs fsspec[http]
from test_pretrain import TINY
from test_shards import _parquet, write_shards

from simmim.cli import main
from simmim.data.shards import TarShardSource
from simmim.data.sources import HFImageSource, open_source
from simmim.errors import UserError


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; the first GET of each path in ``drop`` sends 3000 bytes of the body, then closes."""

    drop: set[str] = set()
    requests: Counter = Counter()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests[self.path] += 1
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        if self.path in self.drop and self.requests[self.path] == 1:
            outputfile.write(source.read(3000))
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
            return
        super().copyfile(source, outputfile)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, type[_Handler]]]:
    """``(base URL, handler class)`` of an HTTP server on 127.0.0.1 serving ``tmp_path / "www"``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"drop": set(), "requests": Counter()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    finally:
        srv.shutdown()
        srv.server_close()


def test_pretraining_streams_http_shards_and_retries_a_dropped_connection(tmp_path: Path, server) -> None:
    base, handler = server
    write_shards(tmp_path / "www" / "shards", shards=4, per_shard=5)
    handler.drop.add("/shards/train-0002.tar")
    spec = f"{base}/shards/train-{{0000..0003}}.tar"
    out = tmp_path / "run"
    assert main(["pretrain", "demo/pretrain", *TINY, "--data", spec, "--output", str(out), "data.batch_size=4",
                 "schedule.max_steps=6", "data.shuffle_buffer=0"]) == 0  # 24 samples: every shard read
    log = (out / "train.log").read_text()
    assert "step 6/6" in log
    assert f"retrying shard {base}/shards/train-0002.tar" in log and "1 retries in this reader" in log
    assert handler.requests["/shards/train-0002.tar"] == 2  # dropped once, read again
    assert "train00007.jpg" in log  # the corrupt member was still met, skipped and counted


def test_remote_globs_folders_and_parquet(tmp_path: Path, server) -> None:
    base, _ = server
    write_shards(tmp_path / "www" / "shards", shards=3, per_shard=2)
    want = [f"{base}/shards/train-{i:04d}.tar" for i in range(3)]
    for spec in (f"{base}/shards/train-*.tar", f"{base}/shards/"):  # http "ls" reads the server's index page
        src = open_source(spec)
        assert isinstance(src, TarShardSource) and src.urls == want
    _parquet(tmp_path / "www" / "pq" / "train-0.parquet", n=6)
    src = open_source(f"{base}/pq/train-0.parquet", streaming=True)
    assert isinstance(src, HFImageSource) and src.is_streaming
    assert sum(1 for _ in src.iter_raw()) == 6


def test_a_missing_filesystem_package_is_one_line_naming_the_install(monkeypatch) -> None:
    from fsspec.registry import _registry

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed (and not imported yet)
    monkeypatch.delitem(_registry, "s3", raising=False)
    with pytest.raises(UserError, match=r"pip install s3fs$"):
        open_source("s3://bucket/train-{0000..0009}.tar")
    assert main(["pretrain", "demo/pretrain", "--data", "s3://bucket/train-{0000..0009}.tar"]) == 2
