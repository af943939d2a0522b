"""The controller's bundle server (``fleet serve --http``) and the agent's HTTP source against it and
against a server without Range support (Python's own ``http.server``)."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from agent.updates.http_source import HttpSource, SourceFailed, runs
from edgepack.fleet.bundle_http import BundleServer, parse_range

CHUNK = 1000


@pytest.fixture()
def shelf(tmp_path):
    data = os.urandom(10 * CHUNK + 123)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{sha}.edgepack").write_bytes(data)
    server = BundleServer(tmp_path, "127.0.0.1", 0).start()
    yield server, sha, data
    server.stop()


def test_ranges_parse_as_rfc_9110_says():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-1000", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=100-", 100) is False
    assert parse_range("bytes=5-4", 100) is None  # not a valid range: ignored (RFC 9110), the whole file
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert parse_range("items=0-1", 100) is None


def test_runs_group_contiguous_missing_chunks():
    assert runs([]) == []
    assert runs([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert runs(list(range(10)), limit=4) == [(0, 3), (4, 7), (8, 9)]


def test_the_bundle_server_answers_ranges_heads_and_refusals(shelf):
    server, sha, data = shelf
    url = f"{server.url}{sha}.edgepack"
    with httpx.Client() as client:
        whole = client.get(url)
        assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
        part = client.get(url, headers={"Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        tail = client.get(url, headers={"Range": "bytes=-5"})
        assert tail.content == data[-5:]
        beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
        head = client.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data) and not head.content
        assert client.get(f"{server.url}{'0' * 64}.edgepack").status_code == 404
        assert client.get(f"{server.url}../secret").status_code == 404


def test_the_http_source_delivers_exact_chunks_on_one_connection(shelf):
    server, sha, data = shelf
    source = HttpSource(f"{server.url}{sha}.edgepack", timeout_s=5)
    got = {}
    stop = threading.Event()
    source.fetch(2, 4, CHUNK, len(data), got.__setitem__, stop)
    source.fetch(9, 10, CHUNK, len(data), got.__setitem__, stop)
    assert sorted(got) == [2, 3, 4, 9, 10]
    for index, chunk in got.items():
        assert chunk == data[index * CHUNK:(index + 1) * CHUNK]
    assert source.requests == 2 and source.bytes == 3 * CHUNK + CHUNK + 123
    source.close()


def test_the_http_source_refuses_in_one_line_what_will_not_work(shelf, tmp_path):
    server, sha, data = shelf
    missing = HttpSource(f"{server.url}{'1' * 64}.edgepack", timeout_s=5)
    with pytest.raises(SourceFailed) as caught:
        missing.fetch(0, 1, CHUNK, len(data), lambda *_: None, threading.Event())
    assert caught.value.fatal and "HTTP 404" in caught.value.message and "\n" not in caught.value.message
    refused = HttpSource("http://127.0.0.1:1/x.edgepack", timeout_s=2)
    with pytest.raises(SourceFailed) as caught:
        refused.fetch(0, 1, CHUNK, len(data), lambda *_: None, threading.Event())
    assert not caught.value.fatal and "refused" in caught.value.message
    with pytest.raises(ValueError):
        HttpSource("ftp://example.com/x")


def test_a_server_without_range_support_still_works(tmp_path):
    """``http.server`` ignores Range and sends the whole file (200): the chunks before the run are read
    and dropped, the run's chunks are delivered."""
    data = os.urandom(5 * CHUNK + 7)
    (tmp_path / "b.edgepack").write_bytes(data)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        source = HttpSource(f"http://127.0.0.1:{httpd.server_address[1]}/b.edgepack", timeout_s=5)
        got = {}
        source.fetch(3, 5, CHUNK, len(data), got.__setitem__, threading.Event())
        assert sorted(got) == [3, 4, 5] and got[5] == data[5 * CHUNK:]
        # with what is still missing given, the one whole-file pass brings every missing chunk
        got = {0: data[:CHUNK]}
        assert source.fetch(1, 1, CHUNK, len(data), got.__setitem__, threading.Event(),
                            wanted=lambda index: index not in got) is True
        assert sorted(got) == [0, 1, 2, 3, 4, 5] and b"".join(got[i] for i in range(6)) == data
        assert source.requests == 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_bad_redirect_is_a_fatal_source_failure_not_an_escape(tmp_path):
    """A redirect to a port out of range or to no host fails the source in one line (the download goes
    on over MQTT); it used to escape as ValueError/TypeError and block the update for good."""
    from http.server import BaseHTTPRequestHandler

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", self.server.target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for target in ("http://127.0.0.1:99999/x", "http:///x", "ftp://example.com/x"):
            httpd.target = target
            source = HttpSource(f"http://127.0.0.1:{httpd.server_address[1]}/b.edgepack", timeout_s=5)
            with pytest.raises(SourceFailed) as caught:
                source.fetch(0, 0, CHUNK, 10 * CHUNK, lambda *_: None, threading.Event())
            assert caught.value.fatal and "\n" not in caught.value.message, target
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_abort_wakes_a_read_on_a_connection_close_answer(tmp_path):
    """A server that answers ``Connection: close`` and then stalls mid-body: http.client hands the
    socket to the response, and abort() from another thread still ends the read at once."""
    import socket
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def stall():
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-2999/3000\r\n"
                     b"Content-Length: 3000\r\nConnection: close\r\n\r\n" + b"x" * CHUNK)
        time.sleep(30)  # the rest never comes
        conn.close()

    threading.Thread(target=stall, daemon=True).start()
    source = HttpSource(f"http://127.0.0.1:{port}/b.edgepack", timeout_s=25)
    got, failed = {}, []

    def run():
        try:
            source.fetch(0, 2, CHUNK, 3 * CHUNK, got.__setitem__, threading.Event())
        except SourceFailed as exc:
            failed.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    source.abort()
    worker.join(10)
    listener.close()
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert sorted(got) == [0] and failed and "\n" not in failed[0].message
