"""Id maps and time columns: the contiguous ids every artifact shares, and epoch seconds of any timestamp.

Ids are strings end to end ("0108775015" keeps its zeros); the position of an id in the sorted distinct ids is
its contiguous id in every graph, export and reader.

    >>> users, items = id_maps(interactions)        # sorted string ids; index = contiguous id
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def sorted_codes(
    column: pa.ChunkedArray | pa.Array, with_uniques: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode a string column as int32 codes whose order is the sorted order of the distinct strings.

    Returns (codes, uniques) with uniques[codes] == column (uniques is None when not asked for).
    Dictionary-encode first, then sort only the distinct values: far cheaper than sorting the column.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    encoded = column.dictionary_encode()
    dictionary = encoded.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    if not with_uniques:
        return codes, None
    return codes, dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False)


def id_maps(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The contiguous id maps of a table: (users, items), each the sorted distinct string ids.

    Index in the array = contiguous id (0..n-1). Every graph and export uses these, so a user's row in any
    artifact is the position of its id here. Ids are strings and keep leading zeros ("0108775015").
    """
    _, users = sorted_codes(table["user_id"])
    _, items = sorted_codes(table["item_id"])
    return users, items


def index_ids(table: pa.Table, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the table's user_id/item_id strings to their positions in `users`/`items` (int64 arrays).

    Raises when an id is absent from the maps: that is a stale map, never something to guess around.
    """
    out = []
    for name, values in (("user_id", users), ("item_id", items)):
        idx = pc.index_in(table[name], value_set=pa.array(values, type=pa.string()))
        if idx.null_count:
            first = table[name].filter(pc.is_null(idx)).to_pylist()[:3]
            raise KeyError(f"{name} values {first} are not in the id map; rebuild the map from this table")
        out.append(idx.to_numpy(zero_copy_only=False).astype(np.int64))
    return out[0], out[1]


def seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Epoch seconds (int64) of a timestamp column of any unit; ints pass through as seconds."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"timestamp has {column.null_count} null value(s); every interaction needs a time")
    if pa.types.is_timestamp(column.type):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[column.type.unit]
        raw = column.cast(pa.int64()).to_numpy()
        return raw // per_second if per_second > 1 else raw
    if pa.types.is_integer(column.type):
        return column.cast(pa.int64()).to_numpy()
    raise TypeError(f"timestamp column has type {column.type}; expected a timestamp or integer seconds")
