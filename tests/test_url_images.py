"""Images named by URL: downloads through the product's ingest path against a loopback HTTP server that counts the
requests it gets per path; the SSRF guard (blocked addresses, pinned connections, every redirect re-checked);
retries on transient errors only; the streamed size limit; content checked by decoding; incremental re-ingest."""

from __future__ import annotations

import csv
import io
import ipaddress
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from extractors.fetch import FetchPolicy, check_address, fetch, parse_allow
from extractors.images import ImageError
from recipes.ingest import load
from recipes.ingest.load import ingest
from recipes.ingest.sources import SourceError, table
from stores.schema import ITEM_IMAGES

HUGE_CHUNK = b"\xff" * 65536
HUGE_CHUNKS = 800  # 50 MiB offered; the client must stop long before


def _jpeg(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (n % 256, (n * 7) % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """Paths: /img/<n>.jpg a tiny JPEG; /slow.jpg answers after 1.5 s; /flaky.jpg 500 once, then a JPEG;
    /missing.jpg 404; /huge.jpg a 50 MiB body without Content-Length; /text.jpg HTML served as image/jpeg;
    /to-metadata, /to-private, /to-private2 redirect to 169.254.169.254, 10.1.2.3 and 192.168.1.7; /to-img
    redirects to /img/0.jpg; /loop redirects to itself."""

    server: _Server

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        try:
            if path.startswith("/img/"):
                self._send(200, _jpeg(int(path.removeprefix("/img/").removesuffix(".jpg"))))
            elif path == "/slow.jpg":
                time.sleep(1.5)
                self._send(200, _jpeg(1))
            elif path == "/flaky.jpg":
                self._send(500) if hits == 1 else self._send(200, _jpeg(2))
            elif path == "/huge.jpg":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.end_headers()
                for _ in range(HUGE_CHUNKS):
                    self.wfile.write(HUGE_CHUNK)
                    with self.server.lock:
                        self.server.huge_sent += len(HUGE_CHUNK)
            elif path == "/text.jpg":
                self._send(200, b"<html>not an image</html>", {"Content-Type": "image/jpeg"})
            elif path in self.server.redirects:
                self._send(302, headers={"Location": self.server.redirects[path]})
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (a timeout or the size limit): what the tests want


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.huge_sent = 0
        self.redirects = {
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/to-private": "http://10.1.2.3/x.jpg",
            "/to-private2": "http://192.168.1.7/x.jpg",
            "/to-img": "/img/0.jpg",
            "/loop": "/loop",
        }

    def handle_error(self, request, client_address) -> None:
        pass

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def hits(server):
    """The server's per-path request counter, emptied for this test."""
    with server.lock:
        server.hits.clear()
        server.huge_sent = 0
    return server.hits


LOOPBACK = FetchPolicy(
    allow=parse_allow(["127.0.0.1"]),
    connect_timeout=0.5,
    read_timeout=0.5,
    total_timeout=5.0,
    max_bytes=100_000,
    retries=2,
    backoff=0.01,
)


def _items(path: Path, rows: list[tuple[str, str]], column: str = "image_url") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", column])
        w.writerows([item_id, f"title {item_id}", url] for item_id, url in rows)
    return path


def _reasons(ws) -> dict[str, str]:
    q = ws.read("quarantine", columns=["record_key", "reason"]).to_pylist()
    return {r["record_key"]: r["reason"] for r in q}


def test_hundreds_of_url_images_ingest_once_and_reingest_makes_no_request(ws, tmp_path, server, hits):
    """300 URL images are downloaded, decoded and stored with their URL; ingesting the same source again sends
    no request at all (stored URLs are never fetched again) and writes nothing."""
    rows = [(f"i{n:03d}", server.url(f"/img/{n}.jpg")) for n in range(300)]
    src_path = _items(tmp_path / "items.csv", rows)
    report = ingest(ws, table(src_path), LOOPBACK)
    assert report.balanced
    assert report.files["image_url"].stored == 300
    assert sum(hits.values()) == 300 and set(hits.values()) == {1}
    stored = ws.read("item_images", columns=["item_id", "url", "format", "width"]).to_pylist()
    assert len(stored) == 300
    assert {(r["item_id"], r["url"]) for r in stored} == set(rows)
    assert {r["format"] for r in stored} == {"JPEG"} and {r["width"] for r in stored} == {8}
    version = ws.version("item_images")

    again = ingest(ws, table(src_path), LOOPBACK)
    assert sum(hits.values()) == 300, "re-ingest sent requests for URLs already stored"
    assert again.files["image_url"].stored == 300 and again.balanced
    assert ws.version("item_images") == version


def test_failures_are_quarantined_with_their_reason(ws, tmp_path, server, hits):
    """Each kind of bad URL costs its row only, with its reason: a slow server times out (retried, then
    download_failed), a 500 is retried and then stored, a 404 is http_status (not retried), an oversized body is
    too_large and reading stops at the limit, HTML is unsupported_format whatever its content type, redirects to
    the metadata address and to private addresses are blocked_address although loopback is allowed (no request
    goes out), a redirect loop stops after 5 hops, and a same-host redirect is followed."""
    cases = {
        "slow": "/slow.jpg",
        "flaky": "/flaky.jpg",
        "missing": "/missing.jpg",
        "huge": "/huge.jpg",
        "text": "/text.jpg",
        "metadata": "/to-metadata",
        "private": "/to-private",
        "private2": "/to-private2",
        "loop": "/loop",
        "redirected": "/to-img",
    }
    rows = [(k, server.url(p)) for k, p in cases.items()] + [("ftp", "ftp://127.0.0.1/x.jpg")]
    report = ingest(ws, table(_items(tmp_path / "items.csv", rows)), LOOPBACK)
    assert report.balanced
    assert _reasons(ws) == {
        "slow": "download_failed",
        "missing": "http_status",
        "huge": "too_large",
        "text": "unsupported_format",
        "metadata": "blocked_address",
        "private": "blocked_address",
        "private2": "blocked_address",
        "loop": "download_failed",
        "ftp": "bad_url",
    }
    stored = ws.read("item_images", columns=["item_id", "url"]).to_pylist()
    assert sorted(r["item_id"] for r in stored) == ["flaky", "redirected"]
    assert hits["/slow.jpg"] == 3  # timeouts are transient: 1 + retries
    assert hits["/flaky.jpg"] == 2  # the 500, then the image
    assert hits["/missing.jpg"] == 1  # a 404 is not retried
    assert hits["/to-metadata"] == 1 and hits["/to-private"] == 1  # blocked hops: not retried either
    assert hits["/loop"] == 6  # the first request and 5 redirects
    assert server.huge_sent < HUGE_CHUNKS * len(HUGE_CHUNK)


def test_without_allow_list_loopback_is_blocked_and_no_request_is_made(ws, tmp_path, server, hits):
    """With the default policy (public addresses only) every loopback URL is quarantined as blocked_address and
    the server sees no request at all."""
    rows = [(f"i{n}", server.url(f"/img/{n}.jpg")) for n in range(20)] + [("m", server.url("/to-metadata"))]
    report = ingest(ws, table(_items(tmp_path / "items.csv", rows)), FetchPolicy(connect_timeout=0.5))
    assert report.balanced and report.files["image_url"].quarantined == 21
    assert set(_reasons(ws).values()) == {"blocked_address"}
    assert ws.count("item_images") == 0
    assert sum(hits.values()) == 0


def test_interrupted_ingest_resumes_from_committed_batches(ws, tmp_path, server, hits, monkeypatch):
    """Images are committed in batches while downloading: after an ingest dies half-way, what was committed stays
    and the next run fetches only the rest."""
    monkeypatch.setattr(load, "URL_BATCH_ROWS", 40)
    rows = [(f"i{n:03d}", server.url(f"/img/{n}.jpg")) for n in range(200)]
    src_path = _items(tmp_path / "items.csv", rows)
    real, calls = load.inspect_image, []

    def dies_half_way(data: bytes):
        calls.append(1)
        if len(calls) == 101:
            raise KeyboardInterrupt
        return real(data)

    monkeypatch.setattr(load, "inspect_image", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ingest(ws, table(src_path), LOOPBACK)
    kept = ws.count("item_images")
    assert kept == 80  # 100 images decoded before the crash: two full batches of 40 committed, 20 lost
    sent = sum(hits.values())
    monkeypatch.setattr(load, "inspect_image", real)
    report = ingest(ws, table(src_path), LOOPBACK)
    assert report.balanced and ws.count("item_images") == 200
    assert sum(hits.values()) - sent == 200 - kept


def test_table_written_before_the_url_column_gets_it(ws, tmp_path, server, hits):
    """A workspace whose item_images predates the url column keeps its rows and gains the column on the next
    URL ingest."""
    old = ITEM_IMAGES.schema.remove(ITEM_IMAGES.schema.get_field_index("url"))
    rows = pa.Table.from_pylist([{"item_id": "old", "sha256": "x", "source": "s"}], schema=old)
    ws.db.create_table("item_images", data=rows)
    ingest(ws, table(_items(tmp_path / "items.csv", [("new", server.url("/img/5.jpg"))])), LOOPBACK)
    got = {r["item_id"]: r["url"] for r in ws.read("item_images", columns=["item_id", "url"]).to_pylist()}
    assert got == {"old": None, "new": server.url("/img/5.jpg")}


def test_cli_image_url_column_and_allow_list(tmp_path, server, hits):
    """`mmfeat ingest table --image-url-column --allow-private-network` downloads from the named column; an
    allow-list reaching the metadata range is refused with one line, and so is an unknown column."""
    from flows.cli import cli

    items = _items(tmp_path / "items.csv", [("a", server.url("/img/1.jpg"))], column="poster")
    ws_dir = str(tmp_path / "ws")
    runner = CliRunner()
    args = ["--workspace", ws_dir, "ingest", "table", "--items", str(items), "--image-url-column", "poster"]
    ok = runner.invoke(cli, [*args, "--allow-private-network", "127.0.0.1", "--json"])
    assert ok.exit_code == 0, ok.output
    assert hits["/img/1.jpg"] == 1
    bad = runner.invoke(cli, [*args, "--allow-private-network", "169.254.0.0/16"])
    assert bad.exit_code != 0 and "never allowed" in bad.output
    with pytest.raises(SourceError, match="not a column"):
        table(items, image_url_column="nope")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", True),  # allow-listed below
        ("127.0.0.2", False),
        ("::1", False),
        ("::ffff:127.0.0.1", True),  # the allow-listed address, IPv4-mapped
        ("10.0.0.1", False),
        ("192.168.1.1", False),
        ("172.16.0.1", False),
        ("100.64.0.1", False),  # shared address space (carrier NAT)
        ("169.254.169.254", False),
        ("::ffff:169.254.169.254", False),
        ("2002:a9fe:a9fe::1", False),  # 6to4 form of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 form of 169.254.169.254
        ("fe80::1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("240.0.0.1", False),
    ],
)
def test_address_guard(address, allowed):
    """Only public addresses pass, plus the allow-listed ones; IPv6 forms of IPv4 addresses are judged by the
    IPv4 address they carry."""
    assert (check_address(ipaddress.ip_address(address), parse_allow(["127.0.0.1"])) is None) is allowed


def test_allow_list_never_reaches_link_local_and_bad_urls_are_refused():
    """An allow-list cannot open link-local (metadata), multicast or unspecified addresses, a malformed entry is an
    error naming it, and only http(s) URLs with a host are fetched."""
    for value in ("169.254.169.254", "0.0.0.0/0", "fe80::/10", "224.0.0.0/4"):
        with pytest.raises(ValueError, match="never allowed"):
            parse_allow([value])
    with pytest.raises(ValueError, match="not an address"):
        parse_allow(["localhost"])
    assert check_address(ipaddress.ip_address("169.254.169.254"), parse_allow(["169.0.0.0/9"])) is not None
    for url in ("file:///etc/passwd", "gopher://x/", "http:///nohost", "http://[::1"):
        with pytest.raises(ImageError) as exc:
            fetch(url, LOOPBACK)
        assert exc.value.code == "bad_url"
