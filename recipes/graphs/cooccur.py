"""Co-occurrence graphs from the train part of a split: items sharing users, users sharing items.

The products R^T R and R R^T are computed in row blocks sized by their work (the number of partial
products), so memory stays bounded by `max_block_work` however skewed the data; top-k is applied per
block. Only label == 0 rows count.

    >>> item_cooccurrence(split, k=10, weight="jaccard")    # Arrow (src, dst, weight), item ids
    >>> user_cooccurrence(split, k=200)                     # DualGNN's user-user graph (shared-item counts)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recipes.graphs.user_item import edges_table, train_matrix

Weight = Literal["count", "jaccard"]


def gram_blocks(x: sp.spmatrix, max_block_work: int = 20_000_000) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield (first_row, X[rows] @ X^T) for consecutive row blocks of X.

    A block holds as many rows as keep its partial products under max_block_work (at least one row), so a
    block's memory is O(max_block_work) even when a few rows are very dense.
    """
    x = sp.csr_matrix(x)
    xt = sp.csr_matrix(x.T)
    # Partial products of row r: sum over its columns c of the number of rows sharing c.
    col_nnz = np.diff(xt.indptr).astype(np.int64)
    ones = sp.csr_matrix((np.ones(x.nnz), x.indices, x.indptr), shape=x.shape)
    cum = np.cumsum(np.rint(ones @ col_nnz.astype(np.float64)).astype(np.int64))
    start = 0
    while start < x.shape[0]:
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + max_block_work, side="right"))
        stop = max(stop, start + 1)
        yield start, sp.csr_matrix(x[start:stop] @ xt)
        start = stop


def topk_rows(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's k largest weights; ties go to the smaller column id. Output is sorted by row, then
    descending weight."""
    order = np.lexsort((cols, -weights, rows))
    rows, cols, weights = rows[order], cols[order], weights[order]
    if len(rows) == 0:
        return rows, cols, weights
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    starts = np.flatnonzero(first)
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.append(starts, len(rows))))
    keep = rank < k
    return rows[keep], cols[keep], weights[keep]


def cooccurrence_edges(
    x: sp.spmatrix, k: int, weight: Weight = "count", max_block_work: int = 20_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k neighbours of each row of a binary matrix X by shared columns (X X^T, diagonal excluded).

    weight "count": number of shared columns; "jaccard": shared / (|row a| + |row b| - shared).
    """
    if weight not in ("count", "jaccard"):
        raise ValueError(f"weight={weight!r}; expected 'count' or 'jaccard'")
    if k < 1:
        raise ValueError(f"k={k}; expected >= 1")
    x = sp.csr_matrix(x, dtype=np.float32)
    x.data[:] = 1.0
    deg = np.diff(x.indptr).astype(np.float64)
    out_r, out_c, out_w = [], [], []
    for start, block in gram_blocks(x, max_block_work):
        coo = block.tocoo()
        r = coo.row.astype(np.int64) + start
        c = coo.col.astype(np.int64)
        w = coo.data.astype(np.float64)
        off = r != c
        r, c, w = r[off], c[off], w[off]
        if weight == "jaccard":
            w = w / (deg[r] + deg[c] - w)
        r, c, w = topk_rows(r, c, w, k)
        out_r.append(r)
        out_c.append(c)
        out_w.append(w)
    if not out_r:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float32)
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_w).astype(np.float32)


def item_cooccurrence(
    split: pa.Table, k: int = 10, weight: Weight = "count", max_block_work: int = 20_000_000
) -> pa.Table:
    """Item-item graph: each item's k items sharing the most train users. Edge ids are contiguous item ids."""
    return edges_table(*cooccurrence_edges(train_matrix(split).T, k, weight, max_block_work))


def user_cooccurrence(
    split: pa.Table, k: int = 200, weight: Weight = "count", max_block_work: int = 20_000_000
) -> pa.Table:
    """User-user graph: each user's k users sharing the most train items (DualGNN keeps 200, counts).

    Matches MMRec's `dualgnn-gen-u-u-matrix.py` (shared-item counts over x_label == 0, top-200 of the
    non-zero entries) except that ties are broken by the smaller user id instead of torch.topk's order.
    """
    return edges_table(*cooccurrence_edges(train_matrix(split), k, weight, max_block_work))
