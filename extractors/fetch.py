"""Image downloads for ingest: bounded concurrency, timeouts, retries on transient errors, a streamed size limit and
an SSRF guard.

The guard resolves each host itself, refuses any address that is not public (loopback, private, link-local such as
the cloud metadata address 169.254.169.254, multicast, reserved, unspecified; IPv4-mapped, 6to4 and NAT64 IPv6 forms
are unwrapped first) unless it lies in an explicit allow-list, and connects to the checked address (the original
name still goes in the Host header and, for https, in SNI and certificate checks), so a second DNS answer cannot
swap the target. Redirects are followed here, at most 5, and every hop is checked again; only http and https pass.
Link-local, multicast and unspecified addresses are never allowed, whatever the allow-list says.

Every failure is an `ImageError` whose code is a quarantine reason: `bad_url`, `blocked_address`,
`download_failed` (DNS, connection, timeout, too many redirects), `http_status` and `too_large`. Timeouts,
connection resets, 429 and 5xx are retried with exponential backoff; nothing else is. The bytes returned are not
trusted: ingest decodes them with `extractors.images.inspect_image` like any local file.
"""

from __future__ import annotations

import http.client
import ipaddress
import random
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from extractors.images import MAX_BYTES, ImageError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REDIRECTS = (301, 302, 303, 307, 308)
NEVER_ALLOWED = ("link_local", "multicast", "unspecified")
USER_AGENT = "mmfeat-ingest/1 (+image download for a recommendation dataset)"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NEVER_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8", "0.0.0.0/32", "::/128")
)


@dataclass(frozen=True)
class FetchPolicy:
    """How images are downloaded. `allow` lists the non-public networks that may be reached (empty: public
    addresses only); timeouts are in seconds: `connect_timeout` per connection, `read_timeout` per socket read,
    `total_timeout` per request from the first byte sent to the last byte read."""

    allow: tuple[Network, ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 120.0
    max_bytes: int = MAX_BYTES
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_redirects: int = 5
    concurrency: int = 16


def parse_allow(values: Iterable[str]) -> tuple[Network, ...]:
    """`["127.0.0.1", "10.0.0.0/8"]` -> networks; a malformed value or one that reaches link-local (metadata),
    multicast or unspecified addresses is a `ValueError` naming it."""
    out = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                net = ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(
                    f"--allow-private-network {part!r} is not an address or network; write e.g. 127.0.0.1 or "
                    "10.0.0.0/8"
                ) from None
            if any(net.version == n.version and net.overlaps(n) for n in _NEVER_NETS):
                raise ValueError(
                    f"--allow-private-network {part!r} reaches link-local (cloud metadata), multicast or "
                    "unspecified addresses, which are never allowed; list only the hosts you mean, e.g. 127.0.0.1"
                )
            out.append(net)
    return tuple(out)


def _unwrap(ip: Address) -> Address:
    """The IPv4 address an IPv6 form carries (IPv4-mapped, 6to4, NAT64), else `ip`."""
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_class(ip: Address) -> str | None:
    """Why `ip` is not a public address ("loopback", "private", "link_local", ...), or None when it is."""
    ip = _unwrap(ip)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind
    return None if ip.is_global else "not_global"


def check_address(ip: Address, allow: tuple[Network, ...]) -> str | None:
    """None when `ip` may be connected to, else why not (one phrase)."""
    kind = address_class(ip)
    if kind is None:
        return None
    if kind in NEVER_ALLOWED:
        return f"{ip} is {kind.replace('_', '-')}, never allowed"
    plain = _unwrap(ip)
    if any(plain.version == n.version and plain in n for n in allow):
        return None
    return f"{ip} is {kind.replace('_', '-')}; allow it with --allow-private-network {plain}"


class _Transient(Exception):
    """A failure worth retrying: its code and detail become the quarantine reason if every attempt fails."""

    def __init__(self, code: str, detail: str, retry_after: float | None = None):
        super().__init__(code, detail)
        self.code, self.detail, self.retry_after = code, detail, retry_after


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to the checked address `ip`; the Host header keeps the URL's name."""

    def __init__(self, host: str, port: int, ip: str, policy: FetchPolicy):
        super().__init__(host, port, timeout=policy.connect_timeout)
        self._ip, self._read_timeout = ip, policy.read_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to the checked address `ip`, with SNI and certificate checks against the URL's name."""

    def __init__(self, host: str, port: int, ip: str, policy: FetchPolicy):
        super().__init__(host, port, timeout=policy.connect_timeout, context=ssl.create_default_context())
        self._ip, self._read_timeout = ip, policy.read_timeout

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        sock.settimeout(self._read_timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _resolve(host: str, port: int, allow: tuple[Network, ...]) -> str:
    """The first resolved address of `host` that the guard accepts; the connection is pinned to it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise _Transient("download_failed", f"DNS lookup of {host!r} failed for now ({exc})") from None
        raise ImageError("download_failed", f"cannot resolve host {host!r} ({exc})") from None
    reasons = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        why = check_address(ip, allow)
        if why is None:
            return str(ip)
        reasons.append(why)
    raise ImageError("blocked_address", f"{host!r} resolves only to refused addresses: {'; '.join(reasons)}")


def _read_body(resp: http.client.HTTPResponse, url: str, policy: FetchPolicy, deadline: float) -> bytes:
    """The body, never reading more than `max_bytes` + one chunk, nor past the request's deadline."""
    length = resp.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > policy.max_bytes:
        raise ImageError(
            "too_large", f"{url} announces {int(length)} bytes, over the {policy.max_bytes}-byte limit"
        )
    chunks, size = [], 0
    while True:
        chunk = resp.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise ImageError(
                "too_large", f"{url} sent over {policy.max_bytes} bytes; stopped reading at the limit"
            )
        if time.monotonic() > deadline:
            raise _Transient("download_failed", f"{url} took over {policy.total_timeout} s")
        chunks.append(chunk)


def _check_url(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError("bad_url", f"{url[:200]!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ImageError("bad_url", f"{url[:200]!r}: only http and https URLs are fetched")
    if not parts.hostname:
        raise ImageError("bad_url", f"{url[:200]!r} names no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), target


def _attempt(url: str, policy: FetchPolicy) -> bytes:
    """One try: follow up to `max_redirects` redirects, checking every hop's scheme and address."""
    deadline = time.monotonic() + policy.total_timeout
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, target = _check_url(url)
        ip = _resolve(host, port, policy.allow)
        conn = (_PinnedHTTPS if scheme == "https" else _PinnedHTTP)(host, port, ip, policy)
        try:
            conn.request(
                "GET",
                target,
                headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
            )
            resp = conn.getresponse()
            status = resp.status
            if status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise ImageError("http_status", f"HTTP {status} without a Location from {url}")
                url = urljoin(url, location.strip())
                continue
            if status == 200:
                return _read_body(resp, url, policy, deadline)
            if status == 429 or status >= 500:
                after = resp.getheader("Retry-After")
                wait_s = float(after) if after and after.strip().isdigit() else None
                raise _Transient("http_status", f"HTTP {status} from {url}", wait_s)
            raise ImageError("http_status", f"HTTP {status} from {url}")
        except (TimeoutError, ConnectionError, http.client.IncompleteRead) as exc:
            raise _Transient("download_failed", f"{url}: {type(exc).__name__} {exc}".strip()) from None
        except (http.client.HTTPException, ssl.SSLError, OSError) as exc:
            raise ImageError("download_failed", f"{url}: {type(exc).__name__} {exc}".strip()) from None
        finally:
            conn.close()
    raise ImageError("download_failed", f"more than {policy.max_redirects} redirects, last to {url}")


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of `url` (status 200 after redirects), retrying transient failures with exponential backoff."""
    for attempt in range(policy.retries + 1):
        try:
            return _attempt(url, policy)
        except _Transient as exc:
            if attempt == policy.retries:
                raise ImageError(exc.code, f"{exc.detail} ({attempt + 1} attempts)") from None
            delay = policy.backoff * 2**attempt * (0.5 + random.random())
            time.sleep(min(policy.max_backoff, exc.retry_after if exc.retry_after is not None else delay))
    raise AssertionError("unreachable")


def _fetch_one(url: str, policy: FetchPolicy) -> bytes | ImageError:
    try:
        return fetch(url, policy)
    except ImageError as exc:
        return exc
    except Exception as exc:  # a bad URL must cost one row, never the job
        return ImageError("download_failed", f"{url[:200]}: {type(exc).__name__}: {exc}")


def fetch_many(urls: Iterable[str], policy: FetchPolicy) -> Iterator[tuple[str, bytes | ImageError]]:
    """(url, bytes or ImageError) for every url, in completion order, with at most `policy.concurrency`
    downloads running and a few times that queued (so a million URLs never become a million futures)."""
    todo = iter(urls)
    window = max(1, policy.concurrency) * 4
    pool = ThreadPoolExecutor(max(1, policy.concurrency), thread_name_prefix="mmfeat-fetch")
    pending: dict[Future, str] = {}
    try:
        for url in todo:
            pending[pool.submit(_fetch_one, url, policy)] = url
            if len(pending) >= window:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
            for url in todo:
                pending[pool.submit(_fetch_one, url, policy)] = url
                if len(pending) >= window:
                    break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
