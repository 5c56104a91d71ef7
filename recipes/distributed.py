"""Splits and user-item graphs computed by tasks over partitions of a workspace table: what `engine="ray"` runs.

Nothing here imports Ray. The driver functions hand pure, module-level task functions to a `Tasks` runner
(extractors/partition_tasks.py runs them as Ray tasks on the cluster at $RAY_ADDRESS; `LocalTasks` runs them in
this process). Tasks read their rows from the workspace URI themselves; only compact integer arrays and
per-round counts travel. Every labelling decision is made by `splits.split_owned_codes`, so the rows, labels and
order equal the local engines' exactly. A split runs in four stages:

1. ids: row-range tasks return their distinct user and item ids; the driver merges the global sorted id maps.
2. encode: row-range tasks turn their rows into int32 codes, int64 seconds and int64 row positions, bucketed by
   user partition (user code % P), and each user partition de-duplicates its rows (a pair never crosses
   partitions, and the rows stay in table order, so ties break as they do locally).
3. k-core: rounds of per-partition user and item counts over the rows still alive, summed on the driver, which
   marks every user and item below k; a round that drops no row ends it: `kcore.kcore_mask`'s rounds exactly.
4. labels: per user partition for "temporal" and "loo" (per-user decisions). "random" draws one global
   stream in canonical order and "cutoff" may take global quantiles, so they label in one task over all
   surviving rows.

The driver then holds 2 bytes a row (keep mask, labels) and streams the kept rows into Lance.

    >>> reader, keys, counts = split_partitioned(ws, version, cfg, RayTasks())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recipes.kcore import dedup_mask, pair_order
from recipes.splits import SplitConfig, split_owned_codes
from recipes.streamed import BATCH_ROWS, SCAN, labelled_rows
from stores.ids import seconds
from stores.workspace import Workspace

ROWS_PER_TASK = 4 * BATCH_ROWS
"""Row-range tasks read at most this many rows each (more tasks than CPUs for large tables)."""


class Tasks(Protocol):
    """Runs task functions: `submit` returns a handle (a list of `returns` handles when returns > 1) that may be
    passed to later tasks as an argument; `get` resolves handles on the driver."""

    cpus: int

    def put(self, value: Any) -> Any: ...

    def submit(self, fn: Callable, *args: Any, returns: int = 1) -> Any: ...

    def get(self, handles: list) -> list: ...


class LocalTasks:
    """The task runner of one process: handles are the values themselves."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable, *args: Any, returns: int = 1) -> Any:
        out = fn(*args)
        return list(out) if returns > 1 else out

    def get(self, handles: list) -> list:
        return list(handles)


# ---- tasks (module-level: a worker imports them by name) ---------------------------------------------------------


def _read(ws: Workspace, table: str, version: int | None, columns: list[str], offset: int, limit: int):
    return ws.dataset(table, version).to_batches(columns=columns, offset=offset, limit=limit, **SCAN)


def ids_task(
    ws: Workspace, table: str, version: int | None, offset: int, limit: int
) -> tuple[pa.Array, pa.Array]:
    """The distinct user and item ids of rows [offset, offset + limit)."""
    users: list[pa.Array] = []
    items: list[pa.Array] = []
    for batch in _read(ws, table, version, ["user_id", "item_id"], offset, limit):
        users.append(pc.unique(batch["user_id"].cast(pa.string())))
        items.append(pc.unique(batch["item_id"].cast(pa.string())))
    return _distinct(users), _distinct(items)


def _distinct(parts: list[pa.Array]) -> pa.Array:
    return pc.unique(pa.concat_arrays(parts)) if parts else pa.array([], pa.string())


def _codes(column: pa.Array, value_set: pa.Array) -> np.ndarray:
    return pc.index_in(column.cast(pa.string()), value_set=value_set).to_numpy(zero_copy_only=False)


def encode_task(
    ws: Workspace,
    table: str,
    version: int | None,
    offset: int,
    limit: int,
    users: pa.Array,
    items: pa.Array,
    parts: int,
) -> tuple:
    """Rows [offset, offset + limit) as (row position int64, user int32, item int32, seconds int64) codes
    against the global sorted id maps, one tuple per user partition (user % parts), rows in table order."""
    cols: list[list[np.ndarray]] = [[], [], []]
    for batch in _read(ws, table, version, ["user_id", "item_id", "timestamp"], offset, limit):
        cols[0].append(_codes(batch["user_id"], users).astype(np.int32))
        cols[1].append(_codes(batch["item_id"], items).astype(np.int32))
        cols[2].append(seconds(batch["timestamp"]))
    u, i, ts = (
        np.concatenate(c) if c else np.empty(0, t)
        for c, t in zip(cols, (np.int32, np.int32, np.int64), strict=True)
    )
    pos = np.arange(offset, offset + len(u), dtype=np.int64)
    bucket = u % parts
    out = tuple((pos[m], u[m], i[m], ts[m]) for m in (bucket == p for p in range(parts)))
    return out if parts > 1 else out[0]


def partition_task(cfg: SplitConfig, *buckets: tuple) -> dict[str, np.ndarray]:
    """One user partition's rows (buckets in row-range order, so in table order), de-duplicated as
    `split_owned_codes` does; `first` marks the first row of each (user, item) pair (what "partners" counts)."""
    pos, u, i, ts = (np.concatenate([b[c] for b in buckets]) for c in range(4))
    keep = dedup_mask(u, i, ts, cfg.dedup)
    pos, u, i, ts = pos[keep], u[keep], i[keep], ts[keep]
    first = np.ones(len(u), dtype=bool)
    if cfg.kcore_counts == "partners" and len(u):
        key, order = pair_order(u, i)
        sorted_key = key[order]
        first[order[1:][sorted_key[1:] == sorted_key[:-1]]] = False
    return {"pos": pos, "user": u, "item": i, "ts": ts, "first": first}


def _alive(part: dict, bad_users: np.ndarray | None, bad_items: np.ndarray | None) -> np.ndarray:
    if bad_users is None:
        return np.ones(len(part["user"]), dtype=bool)
    return ~(bad_users[part["user"]] | bad_items[part["item"]])


def count_task(
    part: dict, bad_users: np.ndarray | None, bad_items: np.ndarray | None, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One k-core round of a partition: user and item degrees over its rows whose user and item are not bad,
    and how many such rows there are."""
    alive = _alive(part, bad_users, bad_items)
    counted = alive & part["first"]
    return (
        np.bincount(part["user"][counted], minlength=n_users).astype(np.int32),
        np.bincount(part["item"][counted], minlength=n_items).astype(np.int32),
        int(alive.sum()),
    )


def label_task(
    cfg: SplitConfig, bad_users: np.ndarray | None, bad_items: np.ndarray | None, *parts: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row positions, labels, user codes, item codes present) of the surviving rows of `parts`, labelled by
    `split_owned_codes` with k-core off (it is done) in table order."""
    cols: list[list[np.ndarray]] = [[], [], [], []]
    for part in parts:
        alive = _alive(part, bad_users, bad_items)
        for c, name in enumerate(("pos", "user", "item", "ts")):
            cols[c].append(part[name][alive])
    pos, u, i, ts = (np.concatenate(c) for c in cols)
    if not len(pos):
        return pos, np.empty(0, np.int8), u, i
    if len(parts) > 1:
        order = np.argsort(pos, kind="stable")
        pos, u, i, ts = pos[order], u[order], i[order], ts[order]
    present_users, present_items = np.unique(u), np.unique(i)
    keep, labels = split_owned_codes([u, i, ts], dataclasses.replace(cfg, kcore=0))
    return pos[keep], labels, present_users, present_items


def train_block_task(
    ws: Workspace, table: str, version: int | None, offset: int, limit: int, users: pa.Array, items: pa.Array
) -> sp.csr_matrix:
    """The binary users x items matrix of the train rows (label 0) among rows [offset, offset + limit)."""
    u_parts: list[np.ndarray] = []
    i_parts: list[np.ndarray] = []
    for batch in _read(ws, table, version, ["user_id", "item_id", "label"], offset, limit):
        train = pc.fill_null(pc.equal(batch["label"], 0), False)
        u_parts.append(_codes(batch["user_id"].filter(train), users).astype(np.int32))
        i_parts.append(_codes(batch["item_id"].filter(train), items).astype(np.int32))
    u = np.concatenate(u_parts) if u_parts else np.empty(0, np.int32)
    i = np.concatenate(i_parts) if i_parts else np.empty(0, np.int32)
    mat = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(len(users), len(items)))
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


# ---- the driver --------------------------------------------------------------------------------------------------


def _ranges(rows: int, tasks: Tasks, partitions: int) -> list[tuple[int, int]]:
    n = max(partitions or tasks.cpus, -(-rows // ROWS_PER_TASK), 1)
    step = -(-rows // n) if rows else 1
    return [(a, min(step, rows - a)) for a in range(0, rows, step)] or [(0, 0)]


def _id_maps(ws: Workspace, table: str, version: int | None, ranges: list, tasks: Tasks) -> tuple:
    """The sorted distinct user and item ids of the table (streamed.sorted_ids' maps), merged from the ranges."""
    found = tasks.get([tasks.submit(ids_task, ws, table, version, a, n) for a, n in ranges])
    maps = []
    for column in (0, 1):
        uniques = _distinct([f[column] for f in found])
        maps.append(uniques.take(pc.sort_indices(uniques)))
    return maps[0], maps[1]


def split_partitioned(
    ws: Workspace,
    version: int | None,
    cfg: SplitConfig,
    tasks: Tasks,
    table: str = "interactions",
    partitions: int = 0,
) -> tuple[pa.RecordBatchReader, dict[str, set[str]], dict[str, int]]:
    """`streamed.split_stream(ws, version, cfg)` computed by `tasks`: the same (rows, keys, counts).
    `partitions`: row-range and user partitions (0: one per CPU of the runner, more row ranges for big tables)."""
    dataset = ws.dataset(table, version)
    rows = dataset.count_rows()
    ranges = _ranges(rows, tasks, partitions)
    users, items = _id_maps(ws, table, version, ranges, tasks)
    n_users, n_items = len(users), len(items)
    parts = max(1, partitions or tasks.cpus)
    user_ref, item_ref = tasks.put(users), tasks.put(items)
    encoded = [
        tasks.submit(encode_task, ws, table, version, a, n, user_ref, item_ref, parts, returns=parts)
        for a, n in ranges
    ]
    if parts == 1:
        encoded = [[e] for e in encoded]
    held = [tasks.submit(partition_task, cfg, *[e[p] for e in encoded]) for p in range(parts)]
    del encoded

    k_user, k_item = (cfg.kcore, cfg.kcore) if isinstance(cfg.kcore, int) else cfg.kcore
    bad_users = bad_items = None
    if k_user > 1 or k_item > 1:
        alive_before = -1
        while True:
            user_deg = np.zeros(n_users, np.int64)
            item_deg = np.zeros(n_items, np.int64)
            alive = 0
            bad_refs = (tasks.put(bad_users), tasks.put(bad_items))
            for handle in [tasks.submit(count_task, part, *bad_refs, n_users, n_items) for part in held]:
                du, di, n = tasks.get([handle])[0]
                user_deg += du
                item_deg += di
                alive += n
            if alive == alive_before:
                break
            alive_before = alive
            bad_users, bad_items = user_deg < k_user, item_deg < k_item
    bad_refs = (tasks.put(bad_users), tasks.put(bad_items))
    if cfg.scheme in ("temporal", "loo"):
        labelled = [tasks.submit(label_task, cfg, *bad_refs, part) for part in held]
    else:
        labelled = [tasks.submit(label_task, cfg, *bad_refs, *held)]
    keep = np.zeros(rows, dtype=bool)
    full = np.zeros(rows, dtype=np.int8)
    present = {"users": np.zeros(n_users, dtype=bool), "items": np.zeros(n_items, dtype=bool)}
    for handle in labelled:
        pos, labels, present_users, present_items = tasks.get([handle])[0]
        keep[pos] = True
        full[pos] = labels
        present["users"][present_users] = True
        present["items"][present_items] = True
    if not keep.any():
        raise ValueError(f"nothing left after dedup={cfg.dedup!r} and kcore={cfg.kcore!r}; lower kcore")
    labels = full[keep]
    del full
    return labelled_rows(dataset, users, items, present, keep, labels)


def train_matrix_partitioned(
    ws: Workspace, name: str, version: int | None, tasks: Tasks, partitions: int = 0
) -> tuple[sp.csr_matrix, tuple[np.ndarray, np.ndarray]]:
    """`streamed.train_matrix_stream(ws, name, version)` summed from per-range COO blocks built by `tasks`."""
    ranges = _ranges(ws.dataset(name, version).count_rows(), tasks, partitions)
    users, items = _id_maps(ws, name, version, ranges, tasks)
    user_ref, item_ref = tasks.put(users), tasks.put(items)
    handles = [tasks.submit(train_block_task, ws, name, version, a, n, user_ref, item_ref) for a, n in ranges]
    mat = sp.csr_matrix((len(users), len(items)), dtype=np.float32)
    for handle in handles:
        mat = mat + tasks.get([handle])[0]
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat, (users.to_numpy(zero_copy_only=False), items.to_numpy(zero_copy_only=False))
