"""Erasure targets: what a forget request makes the workspace forget, as hashes, and how each table is read.

`capture` fingerprints a `ForgetScope` before anything is deleted (`Targets`: keyed hashes of users and items as
the deny-list names them (`stores.schema.key_hash`), digests of vectors, sha256 of captions and image bytes, and anchored slices of the
image bytes for the raw scan); `classify` says which tables are image-derived. Nothing here is stored in clear.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.schema import key_hash
from stores.workspace import Workspace

if TYPE_CHECKING:
    from stores.erasure.requests import ForgetScope

SLICE_BYTES = 64
SLICES_PER_IMAGE = 3
_MUL = np.uint64(0x9E3779B97F4A7C15)


# ---- fingerprints --------------------------------------------------------------------------------------------


def anchor_digests(words: np.ndarray) -> np.ndarray:
    """32-bit multiply-shift digests of little-endian 8-byte words: the anchors a raw scan compares."""
    with np.errstate(over="ignore"):
        return (words * _MUL) >> np.uint64(32)


def anchor(head: bytes) -> int:
    """32-bit digest of 8 bytes, where a raw scan looks for a slice before hashing the window (not invertible)."""
    return int(anchor_digests(np.frombuffer(head[:8], "<u8"))[0])


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
    # The workspace secret the key hashes were made with (None: unkeyed sha256 of an older log entry); never stored.
    secret: bytes | None = field(default=None, repr=False, compare=False)

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
        } | ({"key_scheme": "hmac-sha256"} if self.secret is not None else {})

    @classmethod
    def from_json(cls, data: dict, secret: bytes | None = None) -> Targets:
        """Targets from the log; `secret` is required when they were stored as keyed hashes."""
        if data.get("key_scheme") and secret is None:
            raise ValueError(
                "these targets were hashed with the workspace secret (.mmfeat/secret), which is missing; restore it"
            )
        return cls(
            secret=secret if data.get("key_scheme") else None,
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
        return {
            k: (len(v) if isinstance(v, set | list) else v)
            for k, v in self.to_json().items()
            if k != "key_scheme"
        }


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
    from stores.features import feature_table

    image_feats = image_feature_tables(ws)
    feature_names = frozenset({t.removeprefix("feat_") for t in image_feats} | {"caption"})
    image_graphs = set()
    for info in artifacts.list_artifacts(ws, "graph") if ws.exists("artifacts") else []:
        feats = info.get("params", {}).get("features") or []
        if feats and all(feature_table(f) in image_feats for f in feats):
            image_graphs.add(info["table"])
    out = {}
    for name in ws.table_names():
        derived = name in image_feats or name in image_graphs or name in ("item_images", "captions")
        out[name] = TableClass(image_derived=derived, image_features=feature_names)
    return out


def is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def is_blob(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


# ---- capture -------------------------------------------------------------------------------------------------


def capture(ws: Workspace, scope: ForgetScope, secret: bytes) -> Targets:
    """Fingerprint a scope before anything is deleted: key hashes plus digests of the vectors, captions and
    image bytes of its items (all feature tables for whole items; image-derived ones for `image_items`).
    Content that a retained row of the same table also holds (a duplicate poster, a zero vector) is left out:
    it is checked through the keys only, since finding it again would prove nothing."""
    t = Targets(
        users={key_hash(secret, "user", u) for u in scope.users},
        items={key_hash(secret, "item", i) for i in scope.items},
        image_items={key_hash(secret, "item", i) for i in scope.image_items},
        pairs={(key_hash(secret, "user", u), key_hash(secret, "item", i)) for u, i in scope.pairs},
        before=scope.before,
        secret=secret,
        clear=clear_keys(scope),
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
            if is_vector(f.type):
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
            elif is_blob(f.type):
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


def recover_scope(ws: Workspace, targets: Targets) -> ForgetScope:
    """The scope behind logged `Targets`, re-derived from the ids still in the workspace: every distinct value of
    the id columns (user_id, item_id, src, dst) whose keyed hash is a target. What a resumed request needs, since
    the log never holds ids; ids no table holds any more have nothing left to erase."""
    from stores.erasure.requests import ForgetScope

    user_hashes = targets.users | {u for u, _ in targets.pairs}
    item_hashes = targets.items | targets.image_items | {i for _, i in targets.pairs}
    users: dict[str, str] = {}
    items: dict[str, str] = {}
    seen: dict[str, set[str]] = {"user": set(), "item": set()}  # each id hashed once, as each kind
    for name in ws.table_names():
        ds = ws.dataset(name)
        for column in ("user_id", "item_id", "src", "dst"):
            if column not in ds.schema.names or not pa.types.is_string(ds.schema.field(column).type):
                continue
            # batch by batch: the id maps, never a whole column of a large table, are in memory
            for batch in ds.to_batches(columns=[column], batch_size=1 << 16):
                for value in pc.unique(batch[column]).drop_null().to_pylist():
                    for kind, hashes, found in (("user", user_hashes, users), ("item", item_hashes, items)):
                        if column == ("item_id" if kind == "user" else "user_id") or value in seen[kind]:
                            continue
                        seen[kind].add(value)
                        h = key_hash(targets.secret, kind, value)
                        if h in hashes:
                            found[value] = h
    return ForgetScope(
        users=frozenset(u for u, h in users.items() if h in targets.users),
        items=frozenset(i for i, h in items.items() if h in targets.items),
        image_items=frozenset(i for i, h in items.items() if h in targets.image_items),
        pairs=frozenset(
            (u, i) for u, uh in users.items() for i, ih in items.items() if (uh, ih) in targets.pairs
        ),
        before=targets.before,
    )


def clear_keys(scope: ForgetScope) -> dict[str, set[str]]:
    """`Targets.clear` for a scope: the ids themselves, for direct lookups while a request runs."""
    return {
        "users": set(scope.users),
        "items": set(scope.items),
        "image_items": set(scope.image_items),
        "pairs": {f"{u}\x1f{i}" for u, i in scope.pairs},
    }
