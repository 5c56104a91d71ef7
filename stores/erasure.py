"""Erasure: a forget request carried out in every table and every file of the workspace, with a receipt.

`forget(ws, request)` resolves the request, fingerprints what is to be forgotten (`Targets`: sha256 key hashes of
users and items as the deny-list names them, digests of vectors, captions and image bytes, and anchored slices of
the image bytes), scans the workspace for it (what the receipt reports as found before), deletes the matching rows
from every table that holds them (interactions, users, items, item_images, captions, feat_*, extract_failures,
split_*, quarantine, ...), re-derives the splits and graphs built from them (recipes/unlearning.py), erases
physically (fragments holding deleted rows rewritten even for one row, indexes rebuilt, tags on old versions
dropped, every old version cleaned up, unreferenced and temporary files removed), adds the deny-list entries,
scans again and appends the receipt to the `forget_requests` log. The same request id twice does the work once.

The verification scan (`verify`) decodes, for every table, every data file that any remaining version references,
deleted rows included (a superset of what each version shows), plus the Lance-format index files and each
version's transaction; and it reads the raw bytes of every file under the workspace for the image and vector
slices (Lance stores binary and vector columns as they are, while it compresses text, so a raw scan for text would
prove nothing). Nothing it needs is stored in clear: the log holds only hashes (unsalted sha256, like the
deny-list: pseudonyms, not anonymity), so `verify(ws, request_id)` can be re-run at any time.

Deletes commit `_rowid IN (...)` predicates (a table losing more than 200k rows is rewritten instead), so no
transaction ever names a forgotten key. Erasure assumes it is the only writer of the tables it erases while it
runs (it deletes files no version references).

    >>> receipt = forget(ws, ForgetRequest("gdpr-0042", "user", users=("1",), reason="art. 17"))
    >>> receipt["verification"]["verified"], verify(ws, "gdpr-0042")["verified"]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.schema import DENY_LIST, TIMESTAMP, TableSpec, key_hash
from stores.workspace import Workspace

if TYPE_CHECKING:
    from recipes.unlearning import ForgetRequest, ForgetScope

FORGET_REQUESTS = TableSpec(
    "forget_requests",
    pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("requester", pa.string()),
            pa.field("created_at", TIMESTAMP),
            # JSON: the request's non-identifying parameters and its `Targets` (hashes only).
            pa.field("params", pa.string()),
            # JSON: the receipt `forget` returned.
            pa.field("receipt", pa.string()),
        ]
    ),
    key=("request_id",),
)
_BOOKKEEPING = {DENY_LIST.name, FORGET_REQUESTS.name, "artifacts"}
SLICE_BYTES = 64
SLICES_PER_IMAGE = 3
_ROWID_DELETE_MAX = 200_000
_CHUNK = 20_000
_SCAN_BLOCK = 64 << 20
_TEMP_DIRS = {".tmp", "_tmp", "tmp", ".cache", "_cache", "cache"}
_MUL = np.uint64(0x9E3779B97F4A7C15)
_JSON_ID = re.compile(r'"(user_id|item_id)":\s*"((?:[^"\\]|\\.)*)"')




# ---- fingerprints --------------------------------------------------------------------------------------------


def anchor(head: bytes) -> int:
    """32-bit digest of 8 bytes, where a raw scan looks for a slice before hashing the window (not invertible)."""
    with np.errstate(over="ignore"):
        return int((np.frombuffer(head[:8], "<u8")[0] * _MUL) >> np.uint64(32))


def vector_digests(vectors: np.ndarray) -> np.ndarray:
    """One uint64 per row of a float matrix: a multiply-xor hash of its bytes (equal bytes, equal digest)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    raw = v.view(np.uint8).reshape(len(v), -1)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(v), pad), np.uint8)], axis=1)
    words = raw.view("<u8")
    consts = np.random.default_rng(20240611).integers(
        1, 2**63, size=words.shape[1], dtype=np.uint64
    ) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (words * consts).sum(axis=1, dtype=np.uint64)
        h ^= h >> np.uint64(29)
        h *= _MUL
    return h


def image_slices(data: bytes, count: int = SLICES_PER_IMAGE, size: int = SLICE_BYTES) -> list[bytes]:
    """`count` slices of `size` bytes from the middle of a file: what the raw scan looks for."""
    if len(data) < size:
        return [data] if len(data) >= 8 else []
    mid = len(data) // 2
    starts = [min(max(0, mid + (j - count // 2) * size * 2), len(data) - size) for j in range(count)]
    return [data[s : s + size] for s in sorted(set(starts))]


@dataclass
class Targets:
    """What a request made the workspace forget, as hashes: key hashes of users and items (`image_items`: items
    whose image-derived data is forgotten), (user hash, item hash) pairs, a time cut, digests of vectors,
    sha256 of captions and of image bytes, and anchored slices of the images for the raw scan."""

    users: set[str] = field(default_factory=set)
    items: set[str] = field(default_factory=set)
    image_items: set[str] = field(default_factory=set)
    pairs: set[tuple[str, str]] = field(default_factory=set)
    before: datetime | None = None
    vectors: set[int] = field(default_factory=set)
    captions: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)
    slices: list[dict] = field(default_factory=list)
    shared: int = 0  # forgotten contents also held by retained rows, hence checked by key only
    # The clear keys behind `users`, `items` and `image_items` while a request runs (never stored): a direct
    # lookup instead of hashing every distinct id of a column.
    clear: dict[str, set[str]] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "users": sorted(self.users),
            "items": sorted(self.items),
            "image_items": sorted(self.image_items),
            "pairs": sorted([list(p) for p in self.pairs]),
            "before": self.before.isoformat() if self.before else None,
            "vectors": sorted(str(v) for v in self.vectors),
            "captions": sorted(self.captions),
            "blobs": sorted(self.blobs),
            "slices": self.slices,
            "shared": self.shared,
        }

    @classmethod
    def from_json(cls, data: dict) -> Targets:
        return cls(
            users=set(data["users"]),
            items=set(data["items"]),
            image_items=set(data["image_items"]),
            pairs={(u, i) for u, i in data["pairs"]},
            before=datetime.fromisoformat(data["before"]) if data.get("before") else None,
            vectors={int(v) for v in data["vectors"]},
            captions=set(data["captions"]),
            blobs=set(data["blobs"]),
            slices=list(data["slices"]),
            shared=int(data.get("shared", 0)),
        )

    def summary(self) -> dict[str, Any]:
        return {k: (len(v) if isinstance(v, set | list) else v) for k, v in self.to_json().items()}


# ---- table classes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableClass:
    """How erasure reads a table: image_derived = every row derives from an item's image (item_images, captions,
    image features, graphs built from image features only); image_features = the feature names counted as
    image-derived for tables with a `feature` column (extract_failures)."""

    image_derived: bool = False
    image_features: frozenset[str] = frozenset()


def _params_modality(ws: Workspace, name: str) -> str | None:
    ds = ws.dataset(name)
    if "params" not in ds.schema.names or ds.count_rows() == 0:
        return None
    raw = ds.head(1, columns=["params"])["params"][0].as_py()
    try:
        return json.loads(raw).get("modality") if raw else None
    except (ValueError, AttributeError):
        return None


def image_feature_tables(ws: Workspace) -> set[str]:
    """Feature tables derived from images: the name holds "image" or "caption", or params say modality
    "image" or "caption" (captions are generated from images)."""
    out = set()
    for name in ws.table_names():
        if name.startswith("feat_") and (
            "image" in name or "caption" in name or _params_modality(ws, name) in ("image", "caption")
        ):
            out.add(name)
    return out


def classify(ws: Workspace) -> dict[str, TableClass]:
    """The class of every table of the workspace."""
    from stores import artifacts

    image_feats = image_feature_tables(ws)
    feature_names = frozenset({t.removeprefix("feat_") for t in image_feats} | {"caption"})
    image_graphs = set()
    for info in artifacts.list_artifacts(ws, "graph") if ws.exists("artifacts") else []:
        feats = info.get("params", {}).get("features") or []
        if feats and all(artifacts.feature_table(f) in image_feats for f in feats):
            image_graphs.add(info["table"])
    out = {}
    for name in ws.table_names():
        derived = name in image_feats or name in image_graphs or name in ("item_images", "captions")
        out[name] = TableClass(image_derived=derived, image_features=feature_names)
    return out


# ---- matching ------------------------------------------------------------------------------------------------


def _hash_mask(
    values: pa.ChunkedArray | pa.Array, kind: str, hashes: set[str], clear: set[str] | None = None
) -> np.ndarray:
    """Rows whose id hashes (as `kind`) into `hashes`; `clear` (the ids themselves, when known) skips hashing."""
    n = len(values)
    if not hashes or n == 0:
        return np.zeros(n, dtype=bool)
    if clear is not None:
        hit = sorted(clear)
    else:
        hit = [v for v in pc.unique(values).drop_null().to_pylist() if key_hash(kind, str(v)) in hashes]
    if not hit:
        return np.zeros(n, dtype=bool)
    return pc.fill_null(pc.is_in(values, pa.array(hit, values.type)), False).to_numpy(zero_copy_only=False)


def _eq(values: pa.ChunkedArray, text: str) -> np.ndarray:
    return pc.fill_null(pc.equal(values, text), False).to_numpy(zero_copy_only=False)


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def _is_blob(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def needed_columns(schema: pa.Schema, targets: Targets) -> list[str]:
    """The columns of `schema` that `mentions` reads for these targets (only those, so a user request never
    reads vectors or image bytes)."""
    ends = ("src", "dst", "src_kind", "dst_kind", "record_key", "raw_excerpt", "detail")
    names = set()
    if targets.users:
        names |= {"user_id", *ends}
    if targets.items or targets.image_items:
        names |= {"item_id", "feature", *ends}
    if targets.pairs:
        names |= {"user_id", "item_id"}
    if targets.before is not None and {"user_id", "item_id", "timestamp"} <= set(schema.names):
        names |= {"user_id", "item_id", "timestamp"}
    for f in schema:
        if (
            (targets.vectors and _is_vector(f.type))
            or (targets.blobs and _is_blob(f.type))
            or (targets.captions and f.name == "caption")
        ):
            names.add(f.name)
    if not names & {
        "user_id",
        "item_id",
        "src",
        "dst",
        "record_key",
        "raw_excerpt",
        "detail",
        "timestamp",
        *(f.name for f in schema if _is_vector(f.type) or _is_blob(f.type)),
        "caption",
    }:
        return []
    return [n for n in schema.names if n in names]


def mentions(t: pa.Table, cls: TableClass, targets: Targets) -> np.ndarray:
    """Rows of `t` that mention a target: a forgotten user or item by id (in any id column, graph endpoint,
    quarantine key or excerpt), a forgotten pair, an interaction before the cut, an image-derived row of an
    item whose image is forgotten, or content equal to forgotten vectors, captions or image bytes."""
    cols = set(t.column_names)
    m = np.zeros(t.num_rows, dtype=bool)
    if t.num_rows == 0:
        return m
    c = targets.clear
    if "user_id" in cols:
        m |= _hash_mask(t["user_id"], "user", targets.users, c.get("users"))
    if "item_id" in cols:
        m |= _hash_mask(t["item_id"], "item", targets.items, c.get("items"))
        if targets.image_items:
            img = _hash_mask(t["item_id"], "item", targets.image_items, c.get("image_items"))
            if cls.image_derived:
                m |= img
            elif "feature" in cols:
                m |= img & pc.is_in(t["feature"], pa.array(sorted(cls.image_features))).to_numpy(
                    zero_copy_only=False
                )
    if targets.pairs and {"user_id", "item_id"} <= cols and c.get("pairs"):
        keys = pc.binary_join_element_wise(t["user_id"], t["item_id"], "\x1f")
        m |= pc.fill_null(pc.is_in(keys, pa.array(sorted(c["pairs"]))), False).to_numpy(zero_copy_only=False)
    elif targets.pairs and {"user_id", "item_id"} <= cols:
        pu = _hash_mask(t["user_id"], "user", {p[0] for p in targets.pairs})
        pi = _hash_mask(t["item_id"], "item", {p[1] for p in targets.pairs})
        for row in np.flatnonzero(pu & pi):
            pair = (key_hash("user", t["user_id"][row].as_py()), key_hash("item", t["item_id"][row].as_py()))
            m[row] |= pair in targets.pairs
    if targets.before is not None and {"user_id", "item_id", "timestamp"} <= cols:
        from recipes.kcore import seconds

        m |= seconds(t["timestamp"]) < int(targets.before.timestamp())
    for side in ("src", "dst"):
        if side not in cols:
            continue
        kinds = t[f"{side}_kind"] if f"{side}_kind" in cols else None
        for kind, hashes, key in (("user", targets.users, "users"), ("item", targets.items, "items")):
            hit = _hash_mask(t[side], kind, hashes, c.get(key))
            m |= hit & _eq(kinds, kind) if kinds is not None else hit
        if targets.image_items and cls.image_derived:
            hit = _hash_mask(t[side], "item", targets.image_items, c.get("image_items"))
            m |= hit & _eq(kinds, "item") if kinds is not None else hit
    if "record_key" in cols and (targets.users or targets.items):
        for row, key in enumerate(t["record_key"].to_pylist()):
            if key is None:
                continue
            for part in str(key).split("|"):
                if key_hash("user", part) in targets.users or key_hash("item", part) in targets.items:
                    m[row] = True
    for name in ("raw_excerpt", "detail"):
        if name in cols and (targets.users or targets.items):
            for row, text in enumerate(t[name].to_pylist()):
                for field_name, value in _JSON_ID.findall(text or ""):
                    kind = "user" if field_name == "user_id" else "item"
                    if key_hash(kind, value) in (targets.users if kind == "user" else targets.items):
                        m[row] = True
    for f in t.schema:
        col = t[f.name]
        if targets.vectors and _is_vector(f.type):
            flat = col.combine_chunks()
            valid = pc.is_valid(flat).to_numpy(zero_copy_only=False)
            dim = f.type.list_size
            values = flat.flatten().to_numpy(zero_copy_only=False) if not flat.null_count else None
            if values is None:  # null vectors: digest the valid rows only
                rows = np.flatnonzero(valid)
                values = flat.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            else:
                rows = np.arange(len(flat))
            digests = vector_digests(values.reshape(-1, dim))
            wanted = np.array(sorted(targets.vectors), dtype=np.uint64)
            m[rows[np.isin(digests, wanted)]] = True
        elif targets.captions and f.name == "caption":
            for row, text in enumerate(col.to_pylist()):
                if text is not None and hashlib.sha256(text.encode()).hexdigest() in targets.captions:
                    m[row] = True
        elif targets.blobs and _is_blob(f.type):
            for row, blob in enumerate(col.to_pylist()):
                if blob is not None and hashlib.sha256(blob).hexdigest() in targets.blobs:
                    m[row] = True
    return m


# ---- capture -------------------------------------------------------------------------------------------------


def capture(ws: Workspace, scope: ForgetScope) -> Targets:
    """Fingerprint a scope before anything is deleted: key hashes plus digests of the vectors, captions and
    image bytes of its items (all feature tables for whole items; image-derived ones for `image_items`).
    Content that a retained row of the same table also holds (a duplicate poster, a zero vector) is left out:
    it is checked through the keys only, since finding it again would prove nothing."""
    t = Targets(
        users={key_hash("user", u) for u in scope.users},
        items={key_hash("item", i) for i in scope.items},
        image_items={key_hash("item", i) for i in scope.image_items},
        pairs={(key_hash("user", u), key_hash("item", i)) for u, i in scope.pairs},
        before=scope.before,
        clear={
            "users": set(scope.users),
            "items": set(scope.items),
            "image_items": set(scope.image_items),
            "pairs": {f"{u}\x1f{i}" for u, i in scope.pairs},
        },
    )
    whole, image = sorted(scope.items), sorted(scope.items | scope.image_items)
    if not image:
        return t
    image_feats = image_feature_tables(ws)
    for name in ws.table_names():
        ids = whole if name.startswith("feat_") and name not in image_feats else image
        if not ids or not (name.startswith("feat_") or name in ("captions", "item_images")):
            continue
        ds = ws.dataset(name)
        if "item_id" not in ds.schema.names:
            continue
        gone = pc.is_in(pc.field("item_id"), pa.array(ids))
        rows = ds.to_table(filter=gone)
        if not rows.num_rows:
            continue
        for f in rows.schema:
            if _is_vector(f.type):
                vecs = rows[f.name].combine_chunks().drop_null()
                vecs = vecs.flatten().to_numpy(zero_copy_only=False).reshape(-1, f.type.list_size)
                kept = ds.to_table(columns=[f.name], filter=~gone)[f.name].combine_chunks().drop_null()
                shared = set(
                    vector_digests(
                        kept.flatten().to_numpy(zero_copy_only=False).reshape(-1, f.type.list_size)
                    ).tolist()
                )
                for digest, vec in zip(vector_digests(vecs).tolist(), vecs, strict=True):
                    if digest in shared:
                        t.shared += 1
                        continue
                    t.vectors.add(int(digest))
                    _add_slice(t, vec.astype(np.float32).tobytes()[:SLICE_BYTES])
            elif f.name == "caption":
                kept = ds.to_table(columns=[f.name], filter=~gone)[f.name].to_pylist()
                shared = {hashlib.sha256(c.encode()).hexdigest() for c in kept if c}
                for digest in {hashlib.sha256(c.encode()).hexdigest() for c in rows[f.name].to_pylist() if c}:
                    t.shared += digest in shared
                    if digest not in shared:
                        t.captions.add(digest)
            elif _is_blob(f.type):
                if "sha256" in ds.schema.names:  # item_images keeps the digest of its bytes beside them
                    shared = set(ds.to_table(columns=["sha256"], filter=~gone)["sha256"].to_pylist())
                else:
                    shared = {
                        hashlib.sha256(b).hexdigest()
                        for b in ds.to_table(columns=[f.name], filter=~gone)[f.name].to_pylist()
                        if b
                    }
                for blob in rows[f.name].to_pylist():
                    digest = hashlib.sha256(blob).hexdigest() if blob else None
                    if digest is None or digest in shared:
                        t.shared += digest is not None
                        continue
                    t.blobs.add(digest)
                    for piece in image_slices(blob):
                        _add_slice(t, piece)
    return t


def _add_slice(t: Targets, piece: bytes) -> None:
    if len(piece) < 8 or not any(piece):  # an all-zero slice would match padding anywhere
        return
    entry = {"anchor": anchor(piece), "size": len(piece), "sha256": hashlib.sha256(piece).hexdigest()}
    if entry not in t.slices:
        t.slices.append(entry)


# ---- scanning --------------------------------------------------------------------------------------------------


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


def _read_file(path: str, columns: list[str], storage_options: dict | None) -> pa.Table | None:
    from lance.file import LanceFileReader

    try:
        reader = LanceFileReader(path, storage_options=storage_options or None)
        have = [c for c in columns if c in reader.metadata().schema.names]
        if not have:
            return None
        return (
            LanceFileReader(path, storage_options=storage_options or None, columns=have)
            .read_all(batch_size=65536)
            .to_table()
        )
    except (OSError, ValueError, RuntimeError):
        return None


def _literals(predicate: str) -> list[str]:
    return [m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'", predicate or "")]


def scan_table(ws: Workspace, name: str, cls: TableClass, targets: Targets) -> dict:
    """Decode every data file any remaining version of `name` references (deleted rows included), its
    Lance-format index files and each version's transaction; count what mentions the targets."""
    ds = ws.dataset(name)
    data, index = _data_files(ds)
    columns = needed_columns(ds.schema, targets)
    per_file: dict[str, int] = {}
    # graph endpoints are matched without their kind columns first (a superset); only files with a match
    # are read again with the kinds, so a clean 16M-edge graph costs two string columns, not four
    light = [c for c in columns if c not in ("src_kind", "dst_kind")]
    if columns:
        for path in sorted({p for paths in data.values() for p in paths}):
            table = _read_file(f"{ds.uri}/{path}", light, ws.storage_options)
            hits = int(mentions(table, cls, targets).sum()) if table is not None else 0
            if hits and light != columns:
                table = _read_file(f"{ds.uri}/{path}", columns, ws.storage_options)
                hits = int(mentions(table, cls, targets).sum())
            per_file[path] = hits
    by_version = {v: sum(per_file.get(p, 0) for p in paths) for v, paths in sorted(data.items())}
    index_hits = {}
    if targets.users or targets.items:
        for version, paths in index.items():
            fields = {i["uuid"]: i["fields"] for i in ds.checkout_version(version).list_indices()}
            for path in paths:
                if not path.endswith(".lance") or path in index_hits:
                    continue
                uuid = path.split("/")[1] if path.count("/") >= 2 else ""
                kinds = [k for f in fields.get(uuid, []) for k in ("user", "item") if f == f"{k}_id"]
                hits = _index_strings(
                    f"{ds.uri}/{path}", kinds or ["user", "item"], targets, ws.storage_options
                )
                if hits:
                    index_hits[path] = hits
    txn_hits = {}
    for v in by_version:
        try:
            op = ds.read_transaction(v).operation
        except Exception:  # versions written before transactions were kept
            continue
        predicate = getattr(op, "predicate", None) or ""
        kinds = [k for k in ("user", "item") if f"{k}_id" in predicate] or ["user", "item"]
        if any(
            key_hash(k, lit) in (targets.users if k == "user" else targets.items)
            for lit in _literals(predicate)
            for k in kinds
        ):
            txn_hits[v] = "transaction predicate names a forgotten key"
    return {
        "versions": len(by_version),
        "data_files": len(per_file),
        "rows": sum(per_file.values()),
        "versions_with_mentions": [v for v, n in by_version.items() if n],
        "index_files_with_mentions": sorted(index_hits),
        "transactions_with_mentions": sorted(txn_hits),
    }


def _index_strings(path: str, kinds: list[str], targets: Targets, storage_options: dict | None) -> int:
    from lance.file import LanceFileReader

    try:
        schema = LanceFileReader(path, storage_options=storage_options or None).metadata().schema
    except (OSError, ValueError, RuntimeError):
        return 0
    cols = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    table = _read_file(path, cols, storage_options) if cols else None
    if table is None:
        return 0
    hits = 0
    for col in table.columns:
        for kind in kinds:
            hits += int(_hash_mask(col, kind, targets.users if kind == "user" else targets.items).sum())
    return hits


def raw_scan(root: str, slices: list[dict]) -> dict:
    """Look for the slices in the raw bytes of every file under `root`: windows whose 8-byte anchor digest
    matches are confirmed by sha256 of the whole slice. Returns files, bytes and the files with hits."""
    out = {"files": 0, "bytes": 0, "slices": len(slices), "hits": []}
    if not slices:
        return out
    anchors = np.array(sorted({s["anchor"] for s in slices}), dtype=np.uint64)
    by_anchor: dict[int, list[dict]] = {}
    for s in slices:
        by_anchor.setdefault(s["anchor"], []).append(s)
    overlap = max(s["size"] for s in slices) - 1
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        out["files"] += 1
        found = False
        with open(path, "rb") as fh:
            carry = b""
            while chunk := fh.read(_SCAN_BLOCK):
                out["bytes"] += len(chunk)
                buf = carry + chunk
                if _scan_buffer(buf, anchors, by_anchor):
                    found = True
                    break
                carry = buf[-overlap:] if overlap else b""
        if found:
            out["hits"].append(str(path.relative_to(root)))
    return out


def _scan_buffer(buf: bytes, anchors: np.ndarray, by_anchor: dict[int, list[dict]]) -> bool:
    for j in range(8):
        count = (len(buf) - j) // 8
        if count <= 0:
            continue
        words = np.frombuffer(buf, dtype="<u8", count=count, offset=j)
        with np.errstate(over="ignore"):
            digest = (words * _MUL) >> np.uint64(32)
        for pos in np.flatnonzero(np.isin(digest, anchors)) * 8 + j:
            for s in by_anchor[int(digest[(pos - j) // 8])]:
                window = buf[pos : pos + s["size"]]
                if len(window) == s["size"] and hashlib.sha256(window).hexdigest() == s["sha256"]:
                    return True
    return False


def scan(ws: Workspace, targets: Targets, classes: dict[str, TableClass] | None = None) -> dict:
    """The verification scan over the whole workspace; `clean` is True when nothing mentions the targets."""
    classes = classes or classify(ws)
    names = [n for n in ws.table_names() if n not in (DENY_LIST.name, FORGET_REQUESTS.name)]
    tables = parallel(lambda n: scan_table(ws, n, classes.get(n, TableClass()), targets), names)
    raw = raw_scan(ws.uri, targets.slices) if ws.is_local else {"skipped": "raw scan needs a local workspace"}
    problems = []
    for name, r in tables.items():
        if r["rows"]:
            problems.append(
                f"{name}: {r['rows']} row(s) in versions {r['versions_with_mentions']} mention it"
            )
        for path in r["index_files_with_mentions"]:
            problems.append(f"{name}: index file {path} holds a forgotten key")
        for v in r["transactions_with_mentions"]:
            problems.append(f"{name}: the transaction of version {v} names a forgotten key")
    problems += [f"raw bytes of {p} hold a slice of a forgotten image or vector" for p in raw.get("hits", [])]
    return {"clean": not problems, "problems": problems, "tables": tables, "raw": raw}


# ---- deletion and physical erasure ---------------------------------------------------------------------------


def delete_rows(
    ws: Workspace,
    targets: Targets,
    classes: dict[str, TableClass],
    skip: set[str] = frozenset(),
    only: set[str] | None = None,
) -> dict[str, int]:
    """Delete the rows that mention the targets from every table (or those in `only`) but `skip` and the
    bookkeeping tables. Small deletions commit `_rowid IN (...)`; large ones rewrite the table without them."""
    removed = {}
    for name in ws.table_names():
        if name in skip or name in _BOOKKEEPING or (only is not None and name not in only):
            continue
        ds = ws.dataset(name)
        columns = needed_columns(ds.schema, targets)
        if not columns:
            continue
        rows = ds.to_table(columns=columns, with_row_id=True)
        mask = mentions(rows, classes.get(name, TableClass()), targets)
        if not mask.any():
            continue
        table = ws.open(name)
        ids = rows["_rowid"].filter(pa.array(mask)).to_pylist()
        if len(ids) <= _ROWID_DELETE_MAX:
            for start in range(0, len(ids), _CHUNK):
                table.delete(f"_rowid IN ({', '.join(str(i) for i in ids[start : start + _CHUNK])})")
        else:
            keep = ds.to_table().filter(pa.array(~mask))
            table.add(keep, mode="overwrite")
        removed[name] = len(ids)
    return removed


_SCALAR = {
    "BTree": "BTREE",
    "Bitmap": "BITMAP",
    "LabelList": "LABEL_LIST",
    "Inverted": "INVERTED",
    "NGram": "NGRAM",
    "ZoneMap": "ZONEMAP",
    "BloomFilter": "BLOOMFILTER",
}


def index_specs(ds) -> list[dict]:
    """What it takes to rebuild each index of a dataset: name, column, type and the vector parameters."""
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")
    specs = []
    for idx in ds.list_indices():
        spec = {
            "name": idx["name"],
            "column": ds.schema.names[idx["fields"][0]]
            if isinstance(idx["fields"][0], int)
            else idx["fields"][0],
            "type": idx["type"],
        }
        if idx["type"] not in _SCALAR:
            stats = (ds.stats.index_stats(idx["name"]).get("indices") or [{}])[0]
            sub = stats.get("sub_index") or {}
            spec |= {
                "metric": stats.get("metric_type", "l2"),
                "num_partitions": stats.get("num_partitions"),
                "m": (sub.get("params") or {}).get("m"),
                "ef_construction": (sub.get("params") or {}).get("ef_construction"),
                "num_sub_vectors": sub.get("num_sub_vectors"),
                "num_bits": sub.get("num_bits") or sub.get("nbits"),
            }
        specs.append(spec)
    return specs


def rebuild_indices(ws: Workspace, name: str, specs: list[dict]) -> list[str]:
    """Recreate each index from the current rows (replacing the remapped one); drop it where that fails."""
    done = []
    for spec in specs:
        ds = ws.dataset(name)
        rows = ds.count_rows()
        try:
            if spec["type"] in _SCALAR:
                ds.create_scalar_index(spec["column"], _SCALAR[spec["type"]], name=spec["name"], replace=True)
            elif rows == 0:
                raise ValueError("no rows left to train on")
            else:
                extra = {
                    k: spec[k] for k in ("m", "ef_construction", "num_sub_vectors", "num_bits") if spec.get(k)
                }
                parts = max(1, min(int(spec.get("num_partitions") or 1), rows))
                try:
                    ds.create_index(
                        spec["column"],
                        spec["type"],
                        name=spec["name"],
                        metric=spec["metric"],
                        num_partitions=parts,
                        replace=True,
                        **extra,
                    )
                except (TypeError, ValueError):
                    ds.create_index(
                        spec["column"],
                        spec["type"],
                        name=spec["name"],
                        metric=spec["metric"],
                        num_partitions=parts,
                        replace=True,
                    )
            done.append(f"{spec['name']} ({spec['type']}) rebuilt")
        except Exception as exc:  # a stale index must not survive: drop it and say so
            ws.dataset(name).drop_index(spec["name"])
            done.append(f"{spec['name']} ({spec['type']}) dropped, rebuild it: {exc}")
    return done


def compact(ws: Workspace, name: str, target_rows_per_fragment: int | None = None) -> dict:
    """Rewrite every fragment that holds deleted rows (threshold 0: one deleted row is enough, where Lance's
    default 10% would leave a large fragment with a few deleted rows as it is), falling back to rewriting the
    whole table, then rebuild the indexes on the rewritten data."""
    ds = ws.dataset(name)
    if not any(f.metadata.deletion_file is not None for f in ds.get_fragments()):
        return {}
    specs = index_specs(ds)
    metrics = ds.optimize.compact_files(
        materialize_deletions=True,
        materialize_deletions_threshold=0.0,
        target_rows_per_fragment=target_rows_per_fragment,
    )
    out = {"fragments_rewritten": metrics.fragments_removed, "fragments_written": metrics.fragments_added}
    ds = ws.dataset(name)
    if any(f.metadata.deletion_file is not None for f in ds.get_fragments()):
        ws.open(name).add(ds.to_table(), mode="overwrite")
        out["rewritten_whole_table"] = True
    out["indices"] = rebuild_indices(ws, name, specs)
    return out


def purge_versions(ws: Workspace, name: str) -> dict:
    """Drop tags on old versions, delete every version but the latest (unverified files included) and any
    file no version references; afterwards the table has exactly one version."""
    ds = ws.dataset(name)
    current = ds.version
    tags = [t for t, info in ds.tags.list().items() if info.get("version") != current]
    for tag in tags:
        ds.tags.delete(tag)
    stats = ds.cleanup_old_versions(
        older_than=timedelta(0), delete_unverified=True, error_if_tagged_old_versions=False
    )
    ds = ws.dataset(name)
    tracked = set(ds.tracked_files().read_all()["path"].to_pylist())
    present = set(ds.all_files().read_all()["path"].to_pylist())
    stray = sorted(present - tracked - {"_versions/latest_version_hint.json"})
    for path in stray:
        if ws.is_local:
            Path(ds.uri, path).unlink(missing_ok=True)
    left = [v["version"] for v in ws.dataset(name).versions()]
    return {
        "versions_removed": stats.old_versions,
        "bytes_removed": stats.bytes_removed,
        "unreferenced_files_removed": len(stray),
        "tags_removed": tags,
        "versions_left": left,
    }


def remove_temp_files(ws: Workspace) -> list[str]:
    """Delete scratch files of the workspace root: *.tmp files and tmp/cache folders outside the tables."""
    if not ws.is_local:
        return []
    removed = []
    root = Path(ws.uri)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0].endswith(".lance"):
            continue
        if path.is_file() and (path.suffix == ".tmp" or any(p in _TEMP_DIRS for p in rel.parts[:-1])):
            path.unlink()
            removed.append(str(rel))
    return removed


def parallel(fn, names: list[str], workers: int = 4) -> dict:
    """{name: fn(name)} with the names run in threads: Lance and Arrow release the GIL, and compaction
    waits on I/O about half of the time."""
    if len(names) <= 1:
        return {n: fn(n) for n in names}
    with ThreadPoolExecutor(max_workers=min(workers, len(names))) as pool:
        return dict(zip(names, pool.map(fn, names), strict=True))


# ---- the request log, the deny-list, snapshots --------------------------------------------------------------


def logged(ws: Workspace, request_id: str) -> dict | None:
    """The log row of `request_id` (params and receipt decoded), None when it was never carried out."""
    if not ws.exists(FORGET_REQUESTS.name):
        return None
    rows = ws.read(FORGET_REQUESTS.name, where=f"request_id = '{request_id.replace(chr(39), chr(39) * 2)}'")
    if not rows.num_rows:
        return None
    row = rows.to_pylist()[0]
    return row | {"params": json.loads(row["params"]), "receipt": json.loads(row["receipt"])}


def _deny_rows(scope: ForgetScope, request_id: str) -> list[dict]:
    now = datetime.now(UTC)
    keys = [("user", key_hash("user", u)) for u in scope.users]
    keys += [("item", key_hash("item", i)) for i in scope.items]
    keys += [("image", key_hash("image", i)) for i in scope.image_items]
    keys += [
        ("interaction", key_hash("interaction", f"{key_hash('user', u)}:{key_hash('item', i)}"))
        for u, i in scope.pairs
    ]
    # lets ingest test only the rows of users with a forgotten pair (see recipes/ingest_interactions.py)
    keys += [("interaction_user", key_hash("interaction_user", u)) for u in {u for u, _ in scope.pairs}]
    return [{"key_hash": h, "kind": k, "request_id": request_id, "created_at": now} for k, h in keys]


def affected_snapshots(ws: Workspace, held: dict[str, set[int]]) -> list[dict]:
    """Snapshots (artifacts of kind "snapshot") pinning a version of a table that held forgotten data."""
    from stores import artifacts

    out = []
    for info in artifacts.list_artifacts(ws, "snapshot") if ws.exists("artifacts") else []:
        pins = {t: v for t, v in (info.get("tables") or {}).items() if t in held and v in held[t]}
        if pins:
            out.append({"name": info["name"], "pinned_versions_with_forgotten_data": pins})
    return out


# ---- forget ------------------------------------------------------------------------------------------------------


def forget(ws: Workspace, request: ForgetRequest) -> dict:
    """Carry out `request` everywhere and return its receipt (see the module docstring). A request id already
    in the log is not carried out again: its stored receipt comes back with `"duplicate": true`."""
    from recipes.unlearning import prepare_refresh, refresh_artifacts, resolve

    done = logged(ws, request.request_id)
    if done is not None:
        return done["receipt"] | {"duplicate": True}
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(phase: str) -> None:
        nonlocal clock, cpu_clock
        now, now_cpu = time.perf_counter(), time.process_time()
        timings[phase], cpu[phase] = round(now - clock, 3), round(now_cpu - cpu_clock, 3)
        clock, cpu_clock = now, now_cpu

    items = (
        ws.read("items", columns=["item_id", "rights", "attributes"]) if request.kind == "attribute" else None
    )
    scope = resolve(request, items)
    targets = capture(ws, scope)
    classes = classify(ws)
    before_versions = ws.versions()
    lap("resolve")
    found = scan(ws, targets, classes)
    held = {
        n: set(r["versions_with_mentions"]) | set(r["transactions_with_mentions"])
        for n, r in found["tables"].items()
        if r["versions_with_mentions"] or r["transactions_with_mentions"]
    }
    lap("scan_before")
    from stores import artifacts as art

    refreshable = {g["table"] for g in art.list_artifacts(ws, "graph")} if ws.exists("artifacts") else set()
    removed = delete_rows(ws, targets, classes, skip=refreshable)
    lap("delete")
    # Every table holding the targets in any data file, deleted rows included, is rewritten before the
    # artifacts are re-derived, so the versions their manifests pin are the ones that stay. The heavy reads of
    # the re-derivation need only the rows left, so they run meanwhile.
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(prepare_refresh, ws, set(removed), scope)
        rewrite = [n for n in sorted(set(removed) | set(held)) if ws.exists(n)]
        physical = parallel(lambda n: compact(ws, n), rewrite)
        prepared = early.result()
    lap("compact")
    excluded_whole = set(scope.items)
    image_feats = image_feature_tables(ws)

    def excluded(feature: str) -> set[str]:
        image = art.feature_table(feature) in image_feats
        return excluded_whole | (set(scope.image_items) if image else set())

    changed = set(removed) | {n for n, p in physical.items() if p}
    refreshed = refresh_artifacts(ws, changed, excluded, request.request_id, scope, prepared)
    # graphs that could not be re-derived, or held targets without being re-derived: their rows go like any
    # other table's (re-derived graphs are clean by construction, and the final scan checks them)
    derived = {g["table"] for g in refreshed["graphs"].values()}
    leftover = delete_rows(ws, targets, classify(ws), only=(refreshable & set(held)) - derived)
    for name, n in leftover.items():
        removed[name] = removed.get(name, 0) + n
        physical[name] = compact(ws, name)
        for info in art.list_artifacts(ws, "graph"):
            if info["table"] == name:  # pin the version that stays, and say the graph was not re-derived
                body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
                body["erasures"] = [*body.get("erasures", []), request.request_id]
                body["stale"] = (
                    f"rows deleted by {request.request_id} without re-deriving the graph; rebuild it"
                )
                art.record_artifact(ws, "graph", info["name"], name, ws.version(name), body)
    lap("artifacts")
    rewritten = {g["table"] for g in refreshed["graphs"].values() if not g["action"].startswith("unchanged")}
    erase = (set(held) | set(removed) | rewritten) & set(ws.table_names())
    for name in sorted(erase):
        if ws.version(name) in held.get(name, ()):
            # the latest version itself names a target (a delete predicate written by someone else): commit a
            # config-only version on top so that cleanup can remove it
            ws.dataset(name).update_config({"mmfeat.erasure": request.request_id})
    for name, done in parallel(lambda n: purge_versions(ws, n), sorted(erase)).items():
        physical[name] = physical.get(name, {}) | done
    physical["_temp_files_removed"] = remove_temp_files(ws)
    deny = _deny_rows(scope, request.request_id)
    if deny:
        ws.upsert(DENY_LIST, pa.Table.from_pylist(deny, schema=DENY_LIST.schema))
    lap("physical")
    check = scan(ws, targets, classify(ws))
    lap("verify")
    snapshots = affected_snapshots(ws, held)
    invalidated = _invalidate(ws, snapshots, request.request_id)
    after_versions = ws.versions()
    receipt = {
        "request": {
            "request_id": request.request_id,
            "kind": request.kind,
            "reason": request.reason,
            "requester": request.requester,
            "created_at": request.created_at.isoformat(),
        },
        "scope": scope.counts()
        | ({"attribute": request.attribute, "value": request.value} if request.kind == "attribute" else {}),
        "targets": targets.summary(),
        "found_before": {
            "tables": {
                n: {"rows": r["rows"], "versions": r["versions_with_mentions"]}
                for n, r in found["tables"].items()
                if r["rows"] or r["versions_with_mentions"]
            },
            "raw_files_with_slices": found["raw"].get("hits", []),
            "clean": found["clean"],
        },
        "removed": removed,
        "versions": {
            n: {"before": before_versions.get(n), "after": after_versions.get(n)}
            for n in sorted(set(before_versions) | set(after_versions))
            if before_versions.get(n) != after_versions.get(n)
        },
        "artifacts": refreshed,
        "physical": physical,
        "erased_tables": sorted(erase),
        "deny_list_added": len(deny),
        "snapshots_invalidated": snapshots,
        "snapshots_note": (
            "these snapshots pinned versions that held forgotten data; erasure removed those versions, so reading "
            "them fails instead of serving forgotten data: re-issue them"
            + (" (flagged invalidated)" if invalidated else "")
        )
        if snapshots
        else None,
        "verification": {
            "verified": check["clean"],
            "problems": check["problems"],
            "tables_checked": len(check["tables"]),
            "versions_checked": sum(r["versions"] for r in check["tables"].values()),
            "data_files_decoded": sum(r["data_files"] for r in check["tables"].values()),
            "raw_scan": {k: v for k, v in check["raw"].items() if k != "hits"},
        },
        "timings_s": timings,
        "cpu_s": cpu,
        "duplicate": False,
    }
    params = {"scope": receipt["scope"], "targets": targets.to_json(), "erased_tables": sorted(erase)}
    row = {
        "request_id": request.request_id,
        "kind": request.kind,
        "reason": request.reason,
        "requester": request.requester,
        "created_at": request.created_at,
        "params": json.dumps(params, sort_keys=True),
        "receipt": json.dumps(receipt, sort_keys=True, default=str),
    }
    ws.upsert(FORGET_REQUESTS, pa.Table.from_pylist([row], schema=FORGET_REQUESTS.schema))
    return receipt


def _invalidate(ws: Workspace, snapshots: list[dict], request_id: str) -> bool:
    """Flag affected snapshots through stores/snapshots.py when it offers `invalidate_snapshot`; each snapshot
    records whether that worked (the erasure itself is done either way, and its versions are gone)."""
    try:
        from stores.snapshots import invalidate_snapshot
    except ImportError:
        return False
    for snap in snapshots:
        try:
            invalidate_snapshot(ws, snap["name"], "pinned data erased by a forget request", request_id)
            snap["flagged"] = True
        except Exception as exc:  # a snapshot module error must not lose the receipt
            snap["flagged"] = f"not flagged: {type(exc).__name__}: {exc}"
    return any(s.get("flagged") is True for s in snapshots)


def verify(ws: Workspace, request_id: str) -> dict:
    """Re-run the verification of a logged request from its stored hashes: every table, every remaining version,
    every index and the raw bytes of every file."""
    done = logged(ws, request_id)
    if done is None:
        have = (
            ws.read(FORGET_REQUESTS.name, columns=["request_id"])["request_id"].to_pylist()
            if ws.exists(FORGET_REQUESTS.name)
            else []
        )
        raise KeyError(f"no forget request {request_id!r} in the log; logged: {sorted(have)[-10:] or 'none'}")
    targets = Targets.from_json(done["params"]["targets"])
    check = scan(ws, targets)
    return {
        "request_id": request_id,
        "verified": check["clean"],
        "problems": check["problems"],
        "tables": check["tables"],
        "raw_scan": check["raw"],
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


__all__ = [
    "FORGET_REQUESTS",
    "TableClass",
    "Targets",
    "capture",
    "classify",
    "compact",
    "delete_rows",
    "forget",
    "image_slices",
    "key_hash",
    "logged",
    "mentions",
    "purge_versions",
    "raw_scan",
    "scan",
    "verify",
]
