"""The workspace secret and the deny-list as writers check it.

Deny-list and forget-log keys are HMAC-SHA256 under a per-workspace secret (`stores.schema.key_hash`), so nobody
holding the workspace but not the secret can recover an id by hashing candidates. `workspace_secret` keeps it in
`.mmfeat/secret` (32 random bytes as hex; mode 0600 in a 0700 folder locally, an object on s3), created once by the
first forget, under the write lease. `deny_list` is what ingest and extraction commits check against.

Older workspaces: deny-list rows and log entries written before keyed hashes hold unkeyed sha256 (no "hmac:"
prefix). Ingest keeps honouring those rows (`DenyList.has` tries both forms while any exists), and `verify` re-runs
such a request with the unkeyed hashes it was recorded with; there is no migration, since the ids behind them are
not known. Back the secret up with the workspace: without it the keyed deny-list cannot be checked, so ingest
refuses to run once keyed rows exist and the secret is missing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from stores.erasure.files import read_file, write_file
from stores.schema import DENY_LIST, KEYED_PREFIX, key_hash, legacy_hash
from stores.workspace import Workspace

SECRET_PATH = ".mmfeat/secret"


def workspace_secret(ws: Workspace, create: bool = False) -> bytes | None:
    """The workspace's key for `key_hash` (32 random bytes, hex in `.mmfeat/secret`); None when there is none yet
    and `create` is False. Created once, by a forget holding the write lease, with mode 0600 locally."""
    raw = read_file(ws, SECRET_PATH)
    if raw is None and create:
        fresh = secrets.token_hex(32).encode()
        if ws.is_local:
            path = Path(ws.uri, SECRET_PATH)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f"secret.{os.getpid()}.new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(fresh)
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # never replace a secret another process created first
                os.link(tmp, path)
            tmp.unlink()
        else:
            write_file(ws, SECRET_PATH, fresh)
        raw = read_file(ws, SECRET_PATH)
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(
            f"workspace secret {ws.uri}/{SECRET_PATH} is damaged ({len(raw)} bytes, expected 64 hex characters); "
            f"restore it from a backup: the deny-list cannot be checked without it"
        )
    return bytes.fromhex(text)


@dataclass(frozen=True)
class DenyList:
    """The deny-list as ingest checks it: keyed hashes under the workspace secret, plus the unkeyed sha256 rows
    of older workspaces. Falsy when empty, so `if denied and denied.has(...)` costs nothing on a clean workspace."""

    hashes: frozenset[str]
    secret: bytes | None

    def __bool__(self) -> bool:
        return bool(self.hashes)

    @property
    def legacy(self) -> bool:
        return any(not h.startswith(KEYED_PREFIX) for h in self.hashes)

    def has(self, kind: str, key: str) -> bool:
        """Whether `key` (a user, item or image id, or an interaction_user id) is denied as `kind`."""
        if self.secret is not None and key_hash(self.secret, kind, key) in self.hashes:
            return True
        return self._legacy and legacy_hash(kind, key) in self.hashes

    def has_pair(self, user: str, item: str) -> bool:
        """Whether the interactions of (`user`, `item`) are denied."""
        keys = ([self.secret] if self.secret is not None else []) + ([None] if self._legacy else [])
        for secret in keys:
            pair = f"{key_hash(secret, 'user', user)}:{key_hash(secret, 'item', item)}"
            if key_hash(secret, "interaction", pair) in self.hashes:
                return True
        return False

    def __post_init__(self) -> None:
        object.__setattr__(self, "_legacy", self.legacy)


def deny_list(ws: Workspace) -> DenyList:
    """The workspace's deny-list, ready for ingest's checks; raises when keyed rows exist but the secret is gone."""
    if not ws.exists(DENY_LIST.name):
        return DenyList(frozenset(), None)
    hashes = frozenset(ws.read(DENY_LIST.name, columns=["key_hash"])["key_hash"].to_pylist())
    secret = workspace_secret(ws)
    if secret is None and any(h.startswith(KEYED_PREFIX) for h in hashes):
        raise RuntimeError(
            f"workspace {ws.uri}: the deny-list holds keyed entries but {SECRET_PATH} is missing; restore it from a "
            f"backup before ingesting (without it forgotten users and items would come back)"
        )
    return DenyList(hashes, secret)
