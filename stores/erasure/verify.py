"""Erasure verification: the scan that proves a workspace no longer holds what a request forgot.

For every table it decodes every data file that any remaining version references, deleted rows included (a
superset of what each version shows), plus the Lance-format index files and each version's transaction; and it
reads the raw bytes of every file under the workspace for the image and vector slices (Lance stores binary and
vector columns as they are, while it compresses text, so a raw scan for text would prove nothing). It needs only
the hashes of `Targets`, so `verify(ws, request_id)` re-runs it from the log at any time.

It fails closed: a table, version, data file, index file, transaction or raw file it cannot open or decode is a
problem naming it (and `unverified` lists it), so the result is `clean: False`, never a silent zero. On s3 the raw
scan reads every object through pyarrow's S3 filesystem (stores/erasure/files.py).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from stores.erasure.files import list_files, read_blocks
from stores.erasure.keys import workspace_secret
from stores.erasure.log import FORGET_REQUESTS, logged
from stores.erasure.match import hash_mask, mentions, needed_columns
from stores.erasure.physical import parallel
from stores.erasure.targets import TableClass, Targets, anchor_digests, classify
from stores.schema import DENY_LIST, key_hash
from stores.workspace import Workspace

_SCAN_BLOCK = 64 << 20


def _data_files(ds) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """{version: data file paths} and {version: index file paths} of every remaining version."""
    tracked = ds.tracked_files().read_all().to_pylist()
    data: dict[int, list[str]] = {}
    index: dict[int, list[str]] = {}
    for row in tracked:
        if row["type"] == "data file":
            data.setdefault(row["version"], []).append(row["path"])
        elif row["type"] == "index file":
            index.setdefault(row["version"], []).append(row["path"])
    for v in ds.versions():
        data.setdefault(v["version"], [])
    return data, index


class Unreadable(Exception):
    """A file the scan could not open or decode; its message names the file and the error."""


def _guard(what: str, fn, *args):
    """fn(*args), any failure (Rust panics included, which are BaseException) turned into `Unreadable`."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - fail closed on anything the reader raises
        raise Unreadable(f"{what} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_file(path: str, columns: list[str], storage_options: dict | None) -> pa.Table | None:
    """The `columns` of one Lance data file present in it (None when it has none of them); raises `Unreadable`."""
    from lance.file import LanceFileReader

    def read() -> pa.Table | None:
        reader = LanceFileReader(path, storage_options=storage_options or None)
        have = [c for c in columns if c in reader.metadata().schema.names]
        if not have:
            return None
        return (
            LanceFileReader(path, storage_options=storage_options or None, columns=have)
            .read_all(batch_size=65536)
            .to_table()
        )

    return _guard(f"file {path}", read)


def _literals(predicate: str) -> list[str]:
    return [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", predicate or "")]


def scan_table(ws: Workspace, name: str, cls: TableClass, targets: Targets) -> dict:
    """Decode every data file any remaining version of `name` references (deleted rows included), its
    Lance-format index files and each version's transaction; count what mentions the targets. What cannot be
    read is listed in `unreadable` (a file, a version's transaction, the table itself)."""
    out = {
        "versions": 0,
        "data_files": 0,
        "rows": 0,
        "versions_with_mentions": [],
        "index_files_with_mentions": [],
        "transactions_with_mentions": [],
        "unreadable": [],
    }
    try:
        ds = _guard(f"table {name}", ws.dataset, name)
        data, index = _guard(f"the file list of table {name}", _data_files, ds)
    except Unreadable as exc:
        out["unreadable"].append(str(exc))
        return out
    columns = needed_columns(ds.schema, targets)
    per_file: dict[str, int] = {}
    bad: set[str] = set()
    # graph endpoints are matched without their kind columns first (a superset); only files with a match
    # are read again with the kinds, so a clean 16M-edge graph costs two string columns, not four
    light = [c for c in columns if c not in ("src_kind", "dst_kind")]
    if columns:
        for path in sorted({p for paths in data.values() for p in paths}):
            try:
                table = _read_file(f"{ds.uri}/{path}", light, ws.storage_options)
                hits = int(mentions(table, cls, targets).sum()) if table is not None else 0
                if hits and light != columns:
                    table = _read_file(f"{ds.uri}/{path}", columns, ws.storage_options)
                    hits = int(mentions(table, cls, targets).sum())
            except Unreadable as exc:
                out["unreadable"].append(f"data {exc}")
                bad.add(path)
                hits = 0
            per_file[path] = hits
    by_version = {v: sum(per_file.get(p, 0) for p in paths) for v, paths in sorted(data.items())}
    index_hits = {}
    if targets.users or targets.items:
        for version, paths in index.items():
            try:
                listed = _guard(
                    f"the index list of version {version}",
                    lambda v: ds.checkout_version(v).list_indices(),
                    version,
                )
            except Unreadable as exc:
                out["unreadable"].append(str(exc))
                continue
            fields = {i["uuid"]: i["fields"] for i in listed}
            for path in paths:
                if not path.endswith(".lance") or path in index_hits:
                    continue
                uuid = path.split("/")[1] if path.count("/") >= 2 else ""
                kinds = [k for f in fields.get(uuid, []) for k in ("user", "item") if f == f"{k}_id"]
                try:
                    hits = _index_strings(
                        f"{ds.uri}/{path}", kinds or ["user", "item"], targets, ws.storage_options
                    )
                except Unreadable as exc:
                    out["unreadable"].append(f"index {exc}")
                    continue
                if hits:
                    index_hits[path] = hits
    txn_hits = {}
    for v in by_version:
        try:
            op = _guard(f"the transaction of version {v}", lambda v: ds.read_transaction(v), v)
        except Unreadable as exc:
            out["unreadable"].append(str(exc))
            continue
        if op is None:  # a version committed without a transaction file: nothing written there to check
            continue
        predicate = getattr(op.operation, "predicate", None) or ""
        kinds = [k for k in ("user", "item") if f"{k}_id" in predicate] or ["user", "item"]
        if any(
            key_hash(targets.secret, k, lit) in (targets.users if k == "user" else targets.items)
            for lit in _literals(predicate)
            for k in kinds
        ):
            txn_hits[v] = "transaction predicate names a forgotten key"
    return out | {
        "versions": len(by_version),
        "data_files": len(per_file),
        "rows": sum(per_file.values()),
        "versions_with_mentions": [v for v, n in by_version.items() if n],
        "index_files_with_mentions": sorted(index_hits),
        "transactions_with_mentions": sorted(txn_hits),
    }


def _index_strings(path: str, kinds: list[str], targets: Targets, storage_options: dict | None) -> int:
    """How many string values of a Lance-format index file hash into the targets; raises `Unreadable`."""
    from lance.file import LanceFileReader

    schema = _guard(
        f"file {path}",
        lambda: LanceFileReader(path, storage_options=storage_options or None).metadata().schema,
    )
    cols = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    table = _read_file(path, cols, storage_options) if cols else None
    if table is None:
        return 0
    hits = 0
    for col in table.columns:
        for kind in kinds:
            hashes = targets.users if kind == "user" else targets.items
            hits += int(hash_mask(col, kind, hashes, secret=targets.secret).sum())
    return hits


def raw_scan(ws: Workspace, slices: list[dict]) -> dict:
    """Look for the slices in the raw bytes of every file (object, on s3) under the workspace: windows whose 8-byte
    anchor digest matches are confirmed by sha256 of the whole slice. Returns files, bytes, the files with hits
    and the files that could not be read."""
    out = {"files": 0, "bytes": 0, "slices": len(slices), "hits": [], "unreadable": []}
    if not slices:
        return out
    anchors = np.array(sorted({s["anchor"] for s in slices}), dtype=np.uint64)
    by_anchor: dict[int, list[dict]] = {}
    for s in slices:
        by_anchor.setdefault(s["anchor"], []).append(s)
    overlap = max(s["size"] for s in slices) - 1
    try:
        paths = list_files(ws)
    except OSError as exc:
        out["unreadable"].append(f"the file list of {ws.uri} cannot be read ({exc})")
        return out
    for path in paths:
        out["files"] += 1
        found = False
        carry = b""
        try:
            for chunk in read_blocks(ws, path, _SCAN_BLOCK):
                out["bytes"] += len(chunk)
                buf = carry + chunk
                if _scan_buffer(buf, anchors, by_anchor):
                    found = True
                    break
                carry = buf[-overlap:] if overlap else b""
        except FileNotFoundError:
            continue  # removed since the listing (a lease file, a temp file): nothing left to hold data
        except OSError as exc:
            out["unreadable"].append(f"raw bytes of {path} cannot be read ({exc})")
        if found:
            out["hits"].append(path)
    return out


def _scan_buffer(buf: bytes, anchors: np.ndarray, by_anchor: dict[int, list[dict]]) -> bool:
    for j in range(8):
        count = (len(buf) - j) // 8
        if count <= 0:
            continue
        words = np.frombuffer(buf, dtype="<u8", count=count, offset=j)
        digest = anchor_digests(words)
        for pos in np.flatnonzero(np.isin(digest, anchors)) * 8 + j:
            for s in by_anchor[int(digest[(pos - j) // 8])]:
                window = buf[pos : pos + s["size"]]
                if len(window) == s["size"] and hashlib.sha256(window).hexdigest() == s["sha256"]:
                    return True
    return False


def scan(ws: Workspace, targets: Targets, classes: dict[str, TableClass] | None = None) -> dict:
    """The verification scan over the whole workspace; `clean` is True only when everything could be read and
    nothing mentions the targets. `unverified` lists what could not be read."""
    classes = classes or classify(ws)
    names = [n for n in ws.table_names() if n not in (DENY_LIST.name, FORGET_REQUESTS.name)]
    tables = parallel(lambda n: scan_table(ws, n, classes.get(n, TableClass()), targets), names)
    raw = raw_scan(ws, targets.slices)
    problems = []
    unverified = []
    for name, r in tables.items():
        if r["rows"]:
            problems.append(
                f"{name}: {r['rows']} row(s) in versions {r['versions_with_mentions']} mention it"
            )
        for path in r["index_files_with_mentions"]:
            problems.append(f"{name}: index file {path} holds a forgotten key")
        for v in r["transactions_with_mentions"]:
            problems.append(f"{name}: the transaction of version {v} names a forgotten key")
        unverified += [f"{name}: {what}" for what in r["unreadable"]]
    problems += [f"raw bytes of {p} hold a slice of a forgotten image or vector" for p in raw.get("hits", [])]
    unverified += raw["unreadable"]
    problems += [f"not verified: {what}" for what in unverified]
    return {
        "clean": not problems,
        "problems": problems,
        "unverified": unverified,
        "tables": tables,
        "raw": raw,
    }


def logged_targets(ws: Workspace, params: dict) -> Targets:
    """The `Targets` of a log row's params, keyed with the workspace secret when they were stored keyed."""
    data = params["targets"]
    return Targets.from_json(data, workspace_secret(ws) if data.get("key_scheme") else None)


def verify(ws: Workspace, request_id: str) -> dict:
    """Re-run the verification of a logged request from its stored hashes: every table, every remaining version,
    every index and the raw bytes of every file. A request still pending (crashed, not resumed) is not verified."""
    done = logged(ws, request_id)
    if done is None:
        have = (
            ws.read(FORGET_REQUESTS.name, columns=["request_id"])["request_id"].to_pylist()
            if ws.exists(FORGET_REQUESTS.name)
            else []
        )
        raise KeyError(f"no forget request {request_id!r} in the log; logged: {sorted(have)[-10:] or 'none'}")
    check = scan(ws, logged_targets(ws, done["params"]))
    problems = check["problems"]
    if done["status"] == "pending":
        problems = [*problems, "the request is pending (interrupted): run `mmfeat forget --resume`"]
    return {
        "request_id": request_id,
        "status": done["status"],
        "verified": not problems,
        "problems": problems,
        "unverified": check["unverified"],
        "tables": check["tables"],
        "raw_scan": check["raw"],
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
