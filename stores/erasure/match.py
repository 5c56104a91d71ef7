"""Erasure matching: which rows of a table mention a request's `Targets`, and which columns that takes.

A row mentions a target when it names a forgotten user or item by id (any id column, graph endpoint, quarantine
key or excerpt), holds a forgotten pair, is an interaction before the cut, is an image-derived row of an item
whose image is forgotten, or holds content equal to forgotten vectors, captions or image bytes.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.erasure.targets import TableClass, Targets, is_blob, is_vector, vector_digests
from stores.schema import key_hash

_JSON_ID = re.compile(r'"(user_id|item_id)":\s*"((?:[^"\\]|\\.)*)"')


def hash_mask(
    values: pa.ChunkedArray | pa.Array,
    kind: str,
    hashes: set[str],
    clear: set[str] | None = None,
    secret: bytes | None = None,
    memo: dict[tuple[str, str], str] | None = None,
) -> np.ndarray:
    """Rows whose id hashes (as `kind`, keyed with `secret`) into `hashes`; `clear` (the ids themselves, when
    known) skips hashing. `memo` ({(kind, id): hash}) keeps the hashes across calls, so a table read batch by
    batch hashes each id once."""
    n = len(values)
    if not hashes or n == 0:
        return np.zeros(n, dtype=bool)
    if clear is not None:
        hit = sorted(clear)
    else:
        memo = {} if memo is None else memo
        hit = []
        for v in pc.unique(values).drop_null().to_pylist():
            h = memo.get((kind, v))
            if h is None:
                h = memo[(kind, v)] = key_hash(secret, kind, str(v))
            if h in hashes:
                hit.append(v)
    if not hit:
        return np.zeros(n, dtype=bool)
    return pc.fill_null(pc.is_in(values, pa.array(hit, values.type)), False).to_numpy(zero_copy_only=False)


def _eq(values: pa.ChunkedArray, text: str) -> np.ndarray:
    return pc.fill_null(pc.equal(values, text), False).to_numpy(zero_copy_only=False)


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
            (targets.vectors and is_vector(f.type))
            or (targets.blobs and is_blob(f.type))
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
        *(f.name for f in schema if is_vector(f.type) or is_blob(f.type)),
        "caption",
    }:
        return []
    return [n for n in schema.names if n in names]


def mentions(
    t: pa.Table, cls: TableClass, targets: Targets, memo: dict[tuple[str, str], str] | None = None
) -> np.ndarray:
    """Rows of `t` that mention a target: a forgotten user or item by id (in any id column, graph endpoint,
    quarantine key or excerpt), a forgotten pair, an interaction before the cut, an image-derived row of an
    item whose image is forgotten, or content equal to forgotten vectors, captions or image bytes. `memo`: see
    `hash_mask` (for `t` read batch by batch)."""
    cols = set(t.column_names)
    m = np.zeros(t.num_rows, dtype=bool)
    if t.num_rows == 0:
        return m
    c, key = targets.clear, targets.secret
    if "user_id" in cols:
        m |= hash_mask(t["user_id"], "user", targets.users, c.get("users"), key, memo)
    if "item_id" in cols:
        m |= hash_mask(t["item_id"], "item", targets.items, c.get("items"), key, memo)
        if targets.image_items:
            img = hash_mask(t["item_id"], "item", targets.image_items, c.get("image_items"), key, memo)
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
        pu = hash_mask(t["user_id"], "user", {p[0] for p in targets.pairs}, secret=key, memo=memo)
        pi = hash_mask(t["item_id"], "item", {p[1] for p in targets.pairs}, secret=key, memo=memo)
        for row in np.flatnonzero(pu & pi):
            pair = (
                key_hash(key, "user", t["user_id"][row].as_py()),
                key_hash(key, "item", t["item_id"][row].as_py()),
            )
            m[row] |= pair in targets.pairs
    if targets.before is not None and {"user_id", "item_id", "timestamp"} <= cols:
        from stores.ids import seconds

        m |= seconds(t["timestamp"]) < int(targets.before.timestamp())
    for side in ("src", "dst"):
        if side not in cols:
            continue
        kinds = t[f"{side}_kind"] if f"{side}_kind" in cols else None
        for kind, hashes, known in (("user", targets.users, "users"), ("item", targets.items, "items")):
            hit = hash_mask(t[side], kind, hashes, c.get(known), key, memo)
            m |= hit & _eq(kinds, kind) if kinds is not None else hit
        if targets.image_items and cls.image_derived:
            hit = hash_mask(t[side], "item", targets.image_items, c.get("image_items"), key, memo)
            m |= hit & _eq(kinds, "item") if kinds is not None else hit
    if "record_key" in cols and (targets.users or targets.items):
        for row, record in enumerate(t["record_key"].to_pylist()):
            if record is None:
                continue
            for part in str(record).split("|"):
                if (
                    key_hash(key, "user", part) in targets.users
                    or key_hash(key, "item", part) in targets.items
                ):
                    m[row] = True
    for name in ("raw_excerpt", "detail"):
        if name in cols and (targets.users or targets.items):
            for row, text in enumerate(t[name].to_pylist()):
                for field_name, value in _JSON_ID.findall(text or ""):
                    kind = "user" if field_name == "user_id" else "item"
                    if key_hash(key, kind, value) in (targets.users if kind == "user" else targets.items):
                        m[row] = True
    for f in t.schema:
        col = t[f.name]
        if targets.vectors and is_vector(f.type):
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
        elif targets.blobs and is_blob(f.type):
            for row, blob in enumerate(col.to_pylist()):
                if blob is not None and hashlib.sha256(blob).hexdigest() in targets.blobs:
                    m[row] = True
    return m
