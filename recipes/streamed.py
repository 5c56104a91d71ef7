"""Splits and user-item graphs of a workspace table read in record batches: memory bounded by the id maps and
integer columns, never the string table.

The in-memory recipes (`splits.make_split`, `user_item.ui_adjacency`) take a whole Arrow table; at 100M
interactions its strings alone are several GB. Here the table is scanned three times in batches: once for the
distinct ids (the sorted id maps, ~1.4M users for H&M), once for int32 codes and int64 seconds (16 bytes a row:
what `splits.split_owned_codes` needs), once to stream the kept rows with their label into Lance. Every decision is
made by the same `split_codes`, so the rows, labels and order equal `make_split`'s exactly.

    >>> stream, keys, counts = split_stream(ws, version, cfg)
    >>> artifacts.write_split(ws, "main", stream, keys)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recipes.splits import SplitConfig, split_owned_codes
from stores.ids import seconds
from stores.workspace import Workspace

BATCH_ROWS = 1 << 20
SCAN = {"batch_size": BATCH_ROWS, "batch_readahead": 2, "fragment_readahead": 1, "io_buffer_size": 64 << 20}
"""Lance scan settings: a few batches in flight, not Lance's default GB-sized read-ahead buffer."""
STREAM_ABOVE_ROWS = 2_000_000
"""`engine="auto"` streams tables with more rows than this; below it the in-memory recipe is faster."""


def scan(ws: Workspace, name: str, version: int | None, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` of a table at `version`, in the table's row order."""
    yield from ws.dataset(name, version).to_batches(columns=columns, **SCAN)


def sorted_ids(
    ws: Workspace, name: str, version: int | None, column: str, where: str | None = None
) -> pa.Array:
    """The sorted distinct strings of a column (an id map: position = contiguous id), read batch by batch."""
    seen: list[pa.Array] = []
    for batch in ws.dataset(name, version).to_batches(columns=[column], filter=where, **SCAN):
        seen.append(pc.unique(batch[column].cast(pa.string())))
        if len(seen) > 16:
            seen = [pc.unique(pa.concat_arrays(seen))]
    if not seen:
        return pa.array([], pa.string())
    uniques = pc.unique(pa.concat_arrays(seen))
    return uniques.take(pc.sort_indices(uniques))


def _codes(column: pa.Array, value_set: pa.Array) -> np.ndarray:
    return pc.index_in(column.cast(pa.string()), value_set=value_set).to_numpy(zero_copy_only=False)


def _code_columns(dataset, table: str, users: pa.Array, items: pa.Array) -> list[np.ndarray]:
    """int32 user and item codes (positions in the sorted id maps) and int64 seconds of every row, in order."""
    n = dataset.count_rows()
    user = np.empty(n, np.int32)
    item = np.empty(n, np.int32)
    ts = np.empty(n, np.int64)
    at = 0
    for batch in dataset.to_batches(columns=["user_id", "item_id", "timestamp"], **SCAN):
        m = batch.num_rows
        user[at : at + m] = _codes(batch["user_id"], users)
        item[at : at + m] = _codes(batch["item_id"], items)
        ts[at : at + m] = seconds(batch["timestamp"])
        at += m
    return [user, item, ts]


def split_stream(
    ws: Workspace, version: int | None, cfg: SplitConfig, table: str = "interactions"
) -> tuple[pa.RecordBatchReader, dict[str, set[str]], dict[str, int]]:
    """(rows, keys, counts) of `make_split(ws.read(table, version=version), cfg)` without reading the table whole:
    rows a RecordBatchReader of the kept rows plus `label` in input order, keys the users and items they name
    (for `write_split`'s deny-list check), counts what `split_counts` would say."""
    dataset = ws.dataset(table, version)
    users = sorted_ids(ws, table, version, "user_id")
    items = sorted_ids(ws, table, version, "item_id")
    present: dict = {}
    # the code arrays are made inside the call so no reference outlives their first filtering in split_codes
    keep, labels = split_owned_codes(_code_columns(dataset, table, users, items), cfg, present)
    return labelled_rows(dataset, users, items, present, keep, labels)


def labelled_rows(
    dataset, users: pa.Array, items: pa.Array, present: dict, keep: np.ndarray, labels: np.ndarray
) -> tuple[pa.RecordBatchReader, dict[str, set[str]], dict[str, int]]:
    """`split_stream`'s (rows, keys, counts) from a decided split: `keep` a mask of the dataset's rows, `labels`
    the kept rows' labels in row order, `present` the "users"/"items" code masks of the kept rows (as
    `split_codes` fills them; shorter than the id maps when the last ids are gone). Shared by the Ray engine."""
    kept_users = np.zeros(len(users), dtype=bool)
    kept_users[: len(present["users"])] = present["users"]
    kept_items = np.zeros(len(items), dtype=bool)
    kept_items[: len(present["items"])] = present["items"]
    keys = {
        "user": set(users.filter(pa.array(kept_users)).to_pylist()),
        "item": set(items.filter(pa.array(kept_items)).to_pylist()),
    }
    counts = {"rows": int(keep.sum()), "users": int(kept_users.sum()), "items": int(kept_items.sum())}
    for label_name, value in (("train", 0), ("valid", 1), ("test", 2)):
        counts[label_name] = int(np.count_nonzero(labels == value))
    del users, items

    def rows() -> Iterator[pa.RecordBatch]:
        at, out = 0, 0
        for batch in dataset.to_batches(**SCAN):
            m = batch.num_rows
            mask = keep[at : at + m]
            kept = batch.filter(pa.array(mask))
            k = kept.num_rows
            yield kept.append_column("label", pa.array(labels[out : out + k], pa.int8()))
            at, out = at + m, out + k

    schema = dataset.schema.append(pa.field("label", pa.int8()))
    return pa.RecordBatchReader.from_batches(schema, rows()), keys, counts


def split_id_maps(ws: Workspace, name: str, version: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`id_maps` of a stored split table, read in batches: (users, items) sorted string ids."""
    users = sorted_ids(ws, name, version, "user_id")
    items = sorted_ids(ws, name, version, "item_id")
    return users.to_numpy(zero_copy_only=False), items.to_numpy(zero_copy_only=False)


def train_matrix_stream(ws: Workspace, name: str, version: int | None) -> tuple[sp.csr_matrix, tuple]:
    """(`user_item.train_matrix` of a stored split, its id maps), reading the split in batches: only the train
    rows' int32 codes are held (8 bytes an edge) besides the id maps."""
    users = sorted_ids(ws, name, version, "user_id")
    items = sorted_ids(ws, name, version, "item_id")
    u_parts: list[np.ndarray] = []
    i_parts: list[np.ndarray] = []
    for batch in ws.dataset(name, version).to_batches(
        columns=["user_id", "item_id"], filter="label = 0", **SCAN
    ):
        u_parts.append(_codes(batch["user_id"], users).astype(np.int32))
        i_parts.append(_codes(batch["item_id"], items).astype(np.int32))
    u = np.concatenate(u_parts) if u_parts else np.empty(0, np.int32)
    del u_parts
    i = np.concatenate(i_parts) if i_parts else np.empty(0, np.int32)
    del i_parts
    mat = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(len(users), len(items)))
    del u, i
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat, (users.to_numpy(zero_copy_only=False), items.to_numpy(zero_copy_only=False))
