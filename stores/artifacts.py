"""Versioned training artifacts: splits and graphs as LanceDB tables, each with a manifest in `artifacts`.

A split named N lives in table `split_N` (the interactions plus `label`: 0 train, 1 validation, 2 test). A graph
named G lives in `graph_G` as an edge table over string ids (`src`, `dst`, `src_kind`, `dst_kind`, `weight`), so
erasure and verification can find a user or item by its key. A user-item graph whose manifest says `layout: pairs`
holds only its train pairs (user -> item, weight 1) and is normalised on read (`ui_pairs_matrix`). Its nodes are the split's contiguous id maps (sorted
string ids: users first, then items, for user-item graphs), so `load_graph` rebuilds the exact matrix.
Each write is a new Lance version of the table; the manifest pins it together with the input versions.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from stores.features import denied_keys, feature_table
from stores.lease import write_lease
from stores.schema import ARTIFACTS, INTERACTIONS, TIMESTAMP, sql_string
from stores.workspace import Workspace

SPLIT_SCHEMA = pa.schema(
    [*[INTERACTIONS.schema.field(n) for n in INTERACTIONS.schema.names], pa.field("label", pa.int8())]
)
GRAPH_SCHEMA = pa.schema(
    [
        pa.field("src", pa.string(), nullable=False),
        pa.field("dst", pa.string(), nullable=False),
        pa.field("src_kind", pa.string(), nullable=False),
        pa.field("dst_kind", pa.string(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)
VECTOR_PREFIX = "feat_"


def write_table(
    ws: Workspace,
    name: str,
    data: pa.Table | pa.RecordBatchReader,
    keys: dict[str, set[str]] | None = None,
) -> int:
    """Replace a table's rows with `data` as a new Lance version (older versions stay readable). Under the write
    lease, and refused when `data` names a user or item forgotten while it was built.

    `data` may be a RecordBatchReader, streamed into Lance without ever being whole in memory; then `keys`
    ({"user": ids, "item": ids}: every user and item it names) must be given, as the stream is read only once."""
    with write_lease(ws, f"artifact:{name}") as lease:
        if isinstance(data, pa.RecordBatchReader):
            if keys is None:
                raise ValueError(f"writing {name} from a stream needs keys={{'user': ..., 'item': ...}}")
            _refuse_keys(ws, name, keys)
        else:
            _refuse_forgotten(ws, name, data)
        lease.check()
        if ws.exists(name):
            table = ws.open(name)
            table.add(data, mode="overwrite")
        else:
            table = ws.db.create_table(name, data=data, schema=data.schema)
        return table.version


def _refuse_forgotten(ws: Workspace, name: str, data: pa.Table) -> None:
    """Raise when `data` (split rows: user_id/item_id; graph edges: src/dst with their kinds) names a denied key."""
    keys: dict[str, set[str]] = {"user": set(), "item": set()}
    for col in ("user_id", "item_id"):
        if col in data.column_names:
            keys[col.removesuffix("_id")].update(pc.unique(data[col]).drop_null().to_pylist())
    for col in ("src", "dst"):
        if col in data.column_names and f"{col}_kind" in data.column_names:
            pairs = pa.table({"k": data[col], "t": data[f"{col}_kind"]}).group_by(["k", "t"]).aggregate([])
            for key, kind in zip(pairs["k"].to_pylist(), pairs["t"].to_pylist(), strict=True):
                if kind in keys:
                    keys[kind].add(key)
    _refuse_keys(ws, name, keys)


def _refuse_keys(ws: Workspace, name: str, keys: dict[str, set[str]]) -> None:
    gone = {kind: denied_keys(ws, kind, ids) for kind, ids in keys.items()}
    if any(gone.values()):
        counts = ", ".join(f"{len(v)} {k}s" for k, v in gone.items() if v)
        raise ValueError(
            f"not writing {name}: it names {counts} forgotten while it was built (a forget ran meanwhile); "
            f"rebuild it from the current tables"
        )


def record_artifact(
    ws: Workspace, kind: str, name: str, table_name: str, version: int, manifest: dict
) -> dict:
    manifest = {"kind": kind, "name": name, "table": table_name, "table_version": version} | manifest
    row = {
        "name": name,
        "kind": kind,
        "table_name": table_name,
        "table_version": version,
        "manifest": json.dumps(manifest, sort_keys=True, default=str),
        "created_at": datetime.now(UTC),
    }
    ws.upsert(ARTIFACTS, pa.Table.from_pylist([row], schema=ARTIFACTS.schema))
    return manifest


def manifest(ws: Workspace, kind: str, name: str) -> dict:
    rows = ws.read("artifacts", where=f"kind = {sql_string(kind)} AND name = {sql_string(name)}").to_pylist()
    if not rows:
        have = ws.read("artifacts", columns=["name"], where=f"kind = '{kind}'")["name"].to_pylist()
        raise KeyError(
            f"no {kind} named {name!r}; existing: {sorted(have) or 'none'} (create it with `mmfeat {kind} ...`)"
        )
    return json.loads(rows[0]["manifest"])


def list_artifacts(ws: Workspace, kind: str | None = None) -> list[dict]:
    rows = ws.read("artifacts").to_pylist()
    return [json.loads(r["manifest"]) for r in rows if kind is None or r["kind"] == kind]


# ---- splits ------------------------------------------------------------------------------------------------


def write_split(
    ws: Workspace,
    name: str,
    split: pa.Table | pa.RecordBatchReader,
    keys: dict[str, set[str]] | None = None,
) -> int:
    """Write `split_<name>` (a new version); the caller records its manifest (stores/steps.py `run_step`).
    A RecordBatchReader is streamed batch by batch (then `keys` as in `write_table`)."""
    if isinstance(split, pa.RecordBatchReader):
        batches = (_conform_split(pa.Table.from_batches([b])).to_batches()[0] for b in split if b.num_rows)
        stream = pa.RecordBatchReader.from_batches(SPLIT_SCHEMA, batches)
        return write_table(ws, f"split_{name}", stream, keys)
    return write_table(ws, f"split_{name}", _conform_split(split))


def _conform_split(split: pa.Table) -> pa.Table:
    return pa.Table.from_arrays(
        [
            split[f.name].cast(f.type) if f.name in split.column_names else pa.nulls(split.num_rows, f.type)
            for f in SPLIT_SCHEMA
        ],
        schema=SPLIT_SCHEMA,
    ).combine_chunks()


def save_split(ws: Workspace, name: str, split: pa.Table, info: dict) -> dict:
    version = write_split(ws, name, split)
    return record_artifact(ws, "split", name, f"split_{name}", version, info)


def load_split(ws: Workspace, name: str, version: int | None = None) -> pa.Table:
    """A split's rows; by default at the version its manifest pins."""
    if version is None:
        version = manifest(ws, "split", name)["table_version"]
    return ws.read(f"split_{name}", version=version)


# ---- features ----------------------------------------------------------------------------------------------


def feature_matrix(
    ws: Workspace, feature: str, items: np.ndarray, version: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Vectors of `feature` aligned to `items` (float32 [n, d]; zero rows where missing), the presence mask, and
    provenance (table version, model, content hash of the vectors and the mask). A zero row is a placeholder,
    not a vector: what to do with it is stores/missing.py's policy (graphs skip it, exports fill it)."""
    name = feature_table(feature)
    version = ws.version(name) if version is None else version
    table = ws.read(name, columns=["item_id", "vector", "model", "revision"], version=version)
    dim = table.schema.field("vector").type.list_size
    vectors = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    pos = pc.index_in(pa.array(items, pa.string()), value_set=table["item_id"].combine_chunks())
    mask = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    out = np.zeros((len(items), dim), dtype=np.float32)
    out[mask] = vectors[pos.drop_null().to_numpy()]
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(out).tobytes() + mask.tobytes()).hexdigest()
    models = sorted(set(table["model"].to_pylist()))
    return (
        out,
        mask,
        {
            "table": name,
            "version": version,
            "content_hash": digest,
            "models": models,
            "revisions": sorted(set(table["revision"].to_pylist())),
        },
    )


# ---- graphs ------------------------------------------------------------------------------------------------


def node_ids(split: pa.Table, kind: str) -> tuple[np.ndarray, list[str]]:
    """The node order of a graph built from `split`: sorted user ids, sorted item ids, or users then items."""
    from stores.ids import id_maps

    users, items = id_maps(split)
    return _nodes_of(users, items, kind)


def _nodes_of(users: np.ndarray, items: np.ndarray, kind: str) -> tuple[np.ndarray, list[str]]:
    if kind == "item":
        return items, ["item"] * len(items)
    if kind == "user":
        return users, ["user"] * len(users)
    return np.concatenate([users, items]), ["user"] * len(users) + ["item"] * len(items)


def save_graph(
    ws: Workspace, name: str, matrix: sp.spmatrix, split: pa.Table, node_kind: str, info: dict
) -> dict:
    """Store `matrix` (square, over `node_ids(split, node_kind)`) as a string-keyed edge table + manifest."""
    version, shape = write_graph(ws, name, matrix, split, node_kind)
    return record_artifact(ws, "graph", name, f"graph_{name}", version, info | shape)


def write_graph(
    ws: Workspace,
    name: str,
    matrix: sp.spmatrix,
    split: pa.Table | tuple[np.ndarray, np.ndarray],
    node_kind: str,
) -> tuple[int, dict]:
    """Write `graph_<name>` as a string-keyed edge table; returns its version and {node_kind, nodes, edges} for
    the manifest the caller records. `split` orders the nodes: the split itself, or its id maps (users, items)
    from `id_maps`. Edges stream out in row-major order, a block of rows at a time, so the string columns are
    never whole in memory."""
    if isinstance(split, tuple):
        users, items = split
        ids, kinds = _nodes_of(users, items, node_kind)
    else:
        ids, kinds = node_ids(split, node_kind)
    csr = sp.csr_matrix(matrix)
    if csr.shape != (len(ids), len(ids)):
        raise ValueError(
            f"graph shape {csr.shape} does not match the {len(ids)} {node_kind} nodes of the split"
        )
    ids_arr = pa.array(ids, pa.string())
    kinds_arr = pa.array(kinds, pa.string())
    used = np.diff(csr.indptr) > 0
    used[csr.indices] = True
    keys: dict[str, set[str]] = {"user": set(), "item": set()}
    for kind in keys:
        mask = used & pc.equal(kinds_arr, kind).to_numpy(zero_copy_only=False)
        keys[kind] = set(ids_arr.filter(pa.array(mask)).to_pylist())
    stream = _edge_stream(csr, (ids_arr, kinds_arr), (ids_arr, kinds_arr))
    version = write_table(ws, f"graph_{name}", stream, keys)
    return version, {"node_kind": node_kind, "nodes": len(ids), "edges": int(csr.nnz)}


def _edge_stream(
    csr: sp.csr_matrix, rows: tuple[pa.Array, pa.Array], cols: tuple[pa.Array, pa.Array]
) -> pa.RecordBatchReader:
    """The entries of `csr` as GRAPH_SCHEMA rows in row-major order, `rows`/`cols` the (ids, kinds) of its rows
    and columns, a block of rows at a time, so the string columns are never whole in memory."""

    def blocks():
        start = 0
        while start < csr.shape[0]:
            # rows until ~_EDGE_BLOCK edges (at least one row)
            stop = int(np.searchsorted(csr.indptr, csr.indptr[start] + _EDGE_BLOCK, side="right")) - 1
            stop = min(max(stop, start + 1), csr.shape[0])
            lo, hi = int(csr.indptr[start]), int(csr.indptr[stop])
            if hi > lo:
                src = pa.array(
                    np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(csr.indptr[start : stop + 1]))
                )
                dst = pa.array(csr.indices[lo:hi].astype(np.int64))
                yield pa.record_batch(
                    [
                        rows[0].take(src),
                        cols[0].take(dst),
                        rows[1].take(src),
                        cols[1].take(dst),
                        pa.array(csr.data[lo:hi].astype(np.float32)),
                    ],
                    schema=GRAPH_SCHEMA,
                )
            start = stop

    return pa.RecordBatchReader.from_batches(GRAPH_SCHEMA, blocks())


UI_PAIRS = "pairs"
"""The `layout` of a user-item graph stored as its train pairs (user -> item, weight 1) and normalised on read."""


def write_ui_pairs(
    ws: Workspace, name: str, train: sp.spmatrix, users: np.ndarray, items: np.ndarray, norm: str
) -> tuple[int, dict]:
    """Write user-item graph `graph_<name>` as the pairs of `train` (binary users x items over the split's id
    maps): one row (src user, dst item, weight 1) per pair, users in id order, each user's items in id order
    (a set of rows to its readers: a forget's compaction appends the fragments it rewrites).
    The normalised adjacency is derived on read (`ui_pairs_matrix`), so erasing a user deletes that user's rows
    only (a few fragments) and erasing an item its rows: no stored weight depends on another node's degree.
    Returns the version and the manifest's {node_kind, nodes, edges (of the normalised matrix), layout, pairs}."""
    csr = sp.csr_matrix(train, dtype=np.float32)
    csr.sum_duplicates()
    csr.data[:] = 1.0
    if csr.shape != (len(users), len(items)):
        raise ValueError(
            f"train matrix shape {csr.shape} does not match {len(users)} users x {len(items)} items"
        )
    user_ids, item_ids = pa.array(users, pa.string()), pa.array(items, pa.string())
    keys = {
        "user": set(user_ids.filter(pa.array(np.diff(csr.indptr) > 0)).to_pylist()),
        "item": set(
            item_ids.filter(pa.array(np.bincount(csr.indices, minlength=len(items)) > 0)).to_pylist()
        ),
    }
    rows = (user_ids, pa.array(np.full(len(users), "user", dtype=object), pa.string()))
    cols = (item_ids, pa.array(np.full(len(items), "item", dtype=object), pa.string()))
    version = write_table(ws, f"graph_{name}", _edge_stream(csr, rows, cols), keys)
    return version, ui_pairs_shape(int(csr.nnz), len(users) + len(items), norm)


def ui_pairs_shape(pairs: int, nodes: int, norm: str) -> dict:
    """The manifest's shape of a pairs-layout user-item graph: `edges` counts the normalised matrix's entries
    (both directions, plus the self-loops of "lattice"), as for a graph stored normalised."""
    edges = 2 * pairs + (nodes if norm == "lattice" else 0)
    return {"node_kind": "user+item", "nodes": nodes, "edges": edges, "layout": UI_PAIRS, "pairs": pairs}


def ui_pairs_matrix(edges: pa.Table, users: np.ndarray, items: np.ndarray, norm: str) -> sp.csr_matrix:
    """The normalised (n_users + n_items)^2 adjacency of a pairs-layout graph's rows (`src` user ids, `dst` item
    ids) over the split's id maps: the matrix `user_item.ui_adjacency` gives on that split."""
    from stores.bipartite import bipartite, normalize

    u = pc.index_in(edges["src"], value_set=pa.array(users, pa.string()))
    i = pc.index_in(edges["dst"], value_set=pa.array(items, pa.string()))
    if u.null_count or i.null_count:
        raise ValueError(
            "user-item graph names a user or item its split does not hold; rebuild it "
            "(`mmfeat graph ui` / recipes.pipeline.build_ui_graph(..., force=True))"
        )
    u, i = u.to_numpy(zero_copy_only=False), i.to_numpy(zero_copy_only=False)
    train = sp.csr_matrix(
        (np.ones(len(u), np.float32), (u, i)), shape=(len(users), len(items)), dtype=np.float32
    )
    train.sum_duplicates()
    train.data[:] = 1.0
    return sp.csr_matrix(normalize(bipartite(train), norm))


_EDGE_BLOCK = 1 << 21
"""Edges per streamed block of a graph write: ~100 MB of string columns."""


def load_graph(ws: Workspace, name: str, version: int | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """A stored graph as SciPy CSR over its node ids (from the split it was built on, at the pinned versions)."""
    info = manifest(ws, "graph", name)
    version = info["table_version"] if version is None else version
    split = load_split(ws, info["split"], info["split_version"])
    ids, _ = node_ids(split, info["node_kind"])
    if info.get("layout") == UI_PAIRS:
        from stores.ids import id_maps

        pairs = ws.read(f"graph_{name}", columns=["src", "dst"], version=version)
        return ui_pairs_matrix(pairs, *id_maps(split), info["params"]["norm"]), ids
    edges = ws.read(f"graph_{name}", version=version)
    value_set = pa.array(ids, pa.string())
    if info["node_kind"] == "user+item":  # user and item ids may collide: index each kind in its own range
        from stores.ids import id_maps

        users, items = id_maps(split)
        src = _index_kind(edges, "src", users, items)
        dst = _index_kind(edges, "dst", users, items)
    else:
        src = pc.index_in(edges["src"], value_set=value_set).to_numpy(zero_copy_only=False)
        dst = pc.index_in(edges["dst"], value_set=value_set).to_numpy(zero_copy_only=False)
    weight = edges["weight"].to_numpy().astype(np.float32)
    mat = sp.csr_matrix((weight, (src, dst)), shape=(len(ids), len(ids)), dtype=np.float32)
    return mat, ids


def _index_kind(edges: pa.Table, side: str, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    is_user = pc.equal(edges[f"{side}_kind"], "user").to_numpy(zero_copy_only=False)
    u = pc.index_in(edges[side], value_set=pa.array(users, pa.string())).to_numpy(zero_copy_only=False)
    i = pc.index_in(edges[side], value_set=pa.array(items, pa.string())).to_numpy(zero_copy_only=False)
    return np.where(is_user, u, len(users) + np.nan_to_num(i, nan=0)).astype(np.int64)


# ---- semantic IDs ------------------------------------------------------------------------------------------


def load_semantic_ids(ws: Workspace, name: str) -> pa.Table:
    """Semantic-ID artifact `name` (item_id, codes [levels], suffix) at the version its manifest pins. When
    erasure has purged that version, the latest is read: erasure only deletes forgotten items' rows from it, and
    a rebuild would have re-pinned the manifest."""
    info = manifest(ws, "semantic_ids", name)
    kept = {v["version"] for v in ws.dataset(info["table"]).versions()}
    version = info["table_version"] if info["table_version"] in kept else None
    return ws.read(info["table"], columns=["item_id", "codes", "suffix"], version=version)


def semantic_id_matrix(semantic_ids: pa.Table, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [n, levels + 1]: codes then collision suffix, -1 where an item has none; bool [n]: has codes) of
    `items` from a semantic-ID table."""
    levels = semantic_ids.schema.field("codes").type.list_size
    pos = pc.index_in(pa.array(items, pa.string()), value_set=semantic_ids["item_id"].combine_chunks())
    mask = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    codes = semantic_ids["codes"].combine_chunks().flatten().to_numpy().reshape(-1, levels)
    both = np.concatenate([codes, semantic_ids["suffix"].to_numpy()[:, None]], axis=1).astype(np.int64)
    out = np.full((len(items), levels + 1), -1, np.int64)
    out[mask] = both[pos.drop_null().to_numpy()]
    return out, mask


def now() -> datetime:
    return datetime.now(UTC)


__all__ = [
    "GRAPH_SCHEMA",
    "SPLIT_SCHEMA",
    "TIMESTAMP",
    "UI_PAIRS",
    "feature_matrix",
    "list_artifacts",
    "load_graph",
    "load_semantic_ids",
    "load_split",
    "manifest",
    "node_ids",
    "record_artifact",
    "save_graph",
    "save_split",
    "semantic_id_matrix",
    "ui_pairs_matrix",
    "ui_pairs_shape",
    "write_graph",
    "write_ui_pairs",
    "write_split",
    "write_table",
]
