"""The write lease: one writer at a time per workspace, so read-then-write sequences (keyed upserts, extraction
commits, erasure) never interleave. Readers never take it.

    with write_lease(ws, holder="forget:req-1") as lease:
        ...             # read, compute, then:
        lease.check()   # raises LeaseLost if the lease expired or was taken over; call it right before a commit

Local workspace: an `fcntl.flock` on `<ws>/_lease/write.lock` (the kernel drops it when the process dies, so a
killed writer never leaves a stale lock) plus a fencing token in `<ws>/_lease/token`, bumped by every acquisition.
Object storage (s3://): a lock object `<ws>/_lease/write.json` holding holder, token and expiry, created with a
conditional put (If-None-Match: *), renewed by a heartbeat thread (If-Match: its ETag), taken over only once expired.
Either way `check()` verifies the token is still ours. Re-entrant: a nested `write_lease` on the same workspace in
the same thread reuses the held lease, so every upsert can take it and a whole ingest can hold it around many.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stores.errors import TransientError

DEFAULT_TIMEOUT_S = float(os.environ.get("MMFEAT_LEASE_TIMEOUT", "900"))
DEFAULT_TTL_S = float(os.environ.get("MMFEAT_LEASE_TTL", "60"))
_POLL_S = 0.05
LEASE_DIR = "_lease"


class LeaseLost(TransientError):
    """The lease expired or another writer took it over: the caller must not commit (a rerun can succeed)."""


class LeaseTimeout(TransientError):
    """The lease could not be acquired within the timeout; the message names the holder and how to clear it.
    Transient: the flow retries once the other writer is done."""


@dataclass
class Lease:
    """A held write lease: `token` grows with every acquisition of the workspace's lease (the fencing token)."""

    uri: str
    holder: str
    token: int
    _backend: Any = field(repr=False, default=None)

    def check(self) -> None:
        """Raise LeaseLost unless this lease is still the workspace's current one."""
        self._backend.check(self)


# ---- re-entrancy --------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    thread: int
    lease: Lease
    depth: int = 1


_HELD: dict[str, _Entry] = {}
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_REGISTRY_LOCK = threading.Lock()


def _forget_inherited() -> None:
    # A forked child holds no lease of its parent's (its heartbeat thread is gone), and must not keep the parent's
    # flock alive after the parent releases it: close the inherited lock descriptors.
    global _REGISTRY_LOCK
    for entry in _HELD.values():
        fd = getattr(entry.lease._backend, "fd", None)
        if fd is not None:
            os.close(fd)
    _HELD.clear()
    _PROCESS_LOCKS.clear()
    _REGISTRY_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_inherited)


def held_lease(ws: Any) -> Lease | None:
    """The lease this thread holds on `ws`, if any (writers that must run under a lease can assert it)."""
    entry = _HELD.get(ws.uri)
    return entry.lease if entry and entry.thread == threading.get_ident() else None


@contextmanager
def write_lease(
    ws: Any, holder: str, timeout: float | None = None, ttl: float | None = None
) -> Iterator[Lease]:
    """Hold `ws`'s write lease for the block; blocks up to `timeout` seconds (LeaseTimeout) while another writer
    holds it. Nested calls in the same thread reuse the outer lease."""
    me = threading.get_ident()
    with _REGISTRY_LOCK:
        entry = _HELD.get(ws.uri)
        if entry is not None and entry.thread == me:
            entry.depth += 1
            reentered = True
        else:
            reentered = False
            process_lock = _PROCESS_LOCKS.setdefault(ws.uri, threading.Lock())
    if reentered:
        try:
            yield entry.lease
        finally:
            entry.depth -= 1
        return

    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    # Threads of one process queue here first; the backend then arbitrates between processes.
    if not process_lock.acquire(timeout=max(timeout, 0.0)):
        holder = _HELD.get(ws.uri)
        raise LeaseTimeout(
            f"workspace {ws.uri} is being written by {holder.lease.holder if holder else 'a writer'!r} in another "
            f"thread of this process; waited {timeout:g}s (raise MMFEAT_LEASE_TIMEOUT to wait longer)"
        )
    try:
        backend = _LocalLock(ws) if ws.is_local else _ObjectLock(ws, DEFAULT_TTL_S if ttl is None else ttl)
        lease = backend.acquire(holder, deadline, timeout)
        with _REGISTRY_LOCK:
            _HELD[ws.uri] = _Entry(me, lease)
        try:
            yield lease
        finally:
            with _REGISTRY_LOCK:
                _HELD.pop(ws.uri, None)
            backend.release(lease)
    finally:
        process_lock.release()


def _holder_record(holder: str, token: int, **extra: Any) -> dict:
    return {
        "holder": holder,
        "token": token,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "acquired_at": time.time(),
        **extra,
    }


def _describe(record: dict | None) -> str:
    if not record:
        return "an unknown writer"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("acquired_at", 0)))
    return f"{record.get('holder')!r} (pid {record.get('pid')} on {record.get('host')}, since {since})"


# ---- local: flock + token file ------------------------------------------------------------------------------
class _LocalLock:
    def __init__(self, ws: Any):
        self.dir = Path(ws.uri) / LEASE_DIR
        self.lock_path = self.dir / "write.lock"
        self.token_path = self.dir / "token"
        self.uri = ws.uri
        self.fd: int | None = None

    def acquire(self, holder: str, deadline: float, timeout: float) -> Lease:
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise LeaseTimeout(
                        f"workspace {self.uri} is being written by {_describe(self._read_record())}; waited "
                        f"{timeout:g}s. Wait for it to finish (or raise MMFEAT_LEASE_TIMEOUT); a dead process "
                        f"holds no lock, so if that writer is gone the lock is on a filesystem without flock: "
                        f"delete {self.lock_path}"
                    ) from None
                time.sleep(_POLL_S)
                continue
            # The lock file may have been deleted and recreated between open and flock: lock the live one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        token = self._read_token() + 1
        _atomic_write(self.token_path, str(token))
        record = json.dumps(_holder_record(holder, token))
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return Lease(self.uri, holder, token, self)

    def check(self, lease: Lease) -> None:
        try:
            live = (
                os.stat(self.lock_path).st_ino == os.fstat(self.fd).st_ino if self.fd is not None else False
            )
            token = self._read_token()
        except (FileNotFoundError, OSError):
            live, token = False, -1
        if not live or token != lease.token:
            raise LeaseLost(
                f"write lease on {self.uri} held by {lease.holder!r} (token {lease.token}) was taken over "
                f"(current token {token}); nothing was committed, rerun the command"
            )

    def release(self, lease: Lease) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def _read_token(self) -> int:
        if not self.token_path.exists():
            return 0
        text = self.token_path.read_text().strip()
        try:
            return int(text)
        except ValueError:
            raise RuntimeError(
                f"lease token file {self.token_path} holds {text[:40]!r}, not an integer; delete it while no "
                f"writer runs"
            ) from None

    def _read_record(self) -> dict | None:
        try:
            return json.loads(self.lock_path.read_text() or "null")
        except (OSError, ValueError):
            return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- object storage: conditional puts -----------------------------------------------------------------------
class _ObjectLock:
    """The lock object is never deleted: releasing marks it released, so the token in it keeps growing."""

    def __init__(self, ws: Any, ttl: float):
        from urllib.parse import urlparse

        parsed = urlparse(ws.uri)
        if parsed.scheme != "s3":
            raise ValueError(f"write lease on {ws.uri}: only local paths and s3:// workspaces are supported")
        self.uri = ws.uri
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.key = f"{prefix}/{LEASE_DIR}/write.json" if prefix else f"{LEASE_DIR}/write.json"
        self.client = _s3_client(ws.storage_options)
        self.ttl = ttl
        self.nonce = uuid.uuid4().hex
        self.etag: str | None = None
        self.record: dict = {}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._mutex = threading.Lock()

    def acquire(self, holder: str, deadline: float, timeout: float) -> Lease:
        while True:
            current, etag = self._get()
            free = current is None or current.get("released") or current.get("expires_at", 0) < time.time()
            if free:
                token = (current or {}).get("token", 0) + 1
                record = _holder_record(holder, token, nonce=self.nonce, expires_at=time.time() + self.ttl)
                new_etag = self._put(record, etag)
                if new_etag is not None:
                    self.etag, self.record = new_etag, record
                    break
            if time.monotonic() >= deadline:
                expiry = time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime((current or {}).get("expires_at", 0))
                )
                raise LeaseTimeout(
                    f"workspace {self.uri} is being written by {_describe(current)}; waited {timeout:g}s. Wait "
                    f"for it to finish; a crashed writer's lease expires at {expiry} and is then taken over, or "
                    f"delete s3://{self.bucket}/{self.key} once you are sure that writer is gone"
                )
            time.sleep(_POLL_S * 4)
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.uri}", daemon=True)
        self._beat.start()
        return Lease(self.uri, holder, token, self)

    def check(self, lease: Lease) -> None:
        current, _ = self._get()
        ok = (
            self.lost is None
            and current is not None
            and current.get("nonce") == self.nonce
            and current.get("token") == lease.token
            and not current.get("released")
            and current.get("expires_at", 0) > time.time()
        )
        if not ok:
            why = (
                self.lost
                or f"lock object now holds {_describe(current)} (token {(current or {}).get('token')})"
            )
            raise LeaseLost(
                f"write lease on {self.uri} held by {lease.holder!r} (token {lease.token}) was lost: {why}; "
                f"nothing was committed, rerun the command"
            )

    def release(self, lease: Lease) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with self._mutex:
            if self.lost is None and self.etag is not None:
                self._put({**self.record, "released": True, "expires_at": 0}, self.etag)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if self._stop.is_set():
                    return
                record = {**self.record, "expires_at": time.time() + self.ttl}
                etag = self._put(record, self.etag)
                if etag is None:
                    self.lost = "the heartbeat found the lock object changed (expired and taken over)"
                    return
                self.etag, self.record = etag, record

    def _get(self) -> tuple[dict | None, str | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        body = obj["Body"].read()
        try:
            return json.loads(body), obj["ETag"]
        except ValueError:
            raise RuntimeError(
                f"lease object s3://{self.bucket}/{self.key} is not JSON ({body[:40]!r}); delete it while no "
                f"writer runs"
            ) from None

    def _put(self, record: dict, etag: str | None) -> str | None:
        """Conditional put: create when `etag` is None (If-None-Match: *), else replace only that version
        (If-Match). None when another writer won the race."""
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            out = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(), **cond
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {
                "PreconditionFailed",
                "ConditionalRequestConflict",
            }:
                return None
            raise
        return out["ETag"]


def _s3_client(options: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=options.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=options.get("aws_region") or os.environ.get("AWS_REGION") or None,
        aws_access_key_id=options.get("aws_access_key_id"),
        aws_secret_access_key=options.get("aws_secret_access_key"),
        aws_session_token=options.get("aws_session_token"),
    )
