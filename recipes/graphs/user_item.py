"""User-item graphs from the train part of a split, normalised as MMRec's models expect them.

Nodes are all users then all items of the split (contiguous ids from `id_maps`, items offset by n_users),
so validation- and test-only nodes exist but carry no edge: only label == 0 rows become edges.

    >>> adj = ui_adjacency(split, norm="sym")      # FREEDOM / LightGCN input
    >>> edges = csr_to_edges(adj)                   # Arrow (src, dst, weight) for storage
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from stores.ids import sorted_codes

if TYPE_CHECKING:
    import torch

Norm = Literal["none", "sym", "lattice"]
EDGE_SCHEMA = pa.schema(
    [
        pa.field("src", pa.int32(), nullable=False),
        pa.field("dst", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
    ]
)


def train_matrix(split: pa.Table) -> sp.csr_matrix:
    """Binary users x items matrix of the train rows, shaped by all users/items of the split.

    Rows and columns are the contiguous ids of `id_maps(split)`. Repeated (user, item) pairs collapse to 1,
    as in FREEDOM's dict-built adjacency.
    """
    if "label" not in split.column_names:
        raise ValueError(
            "expected a split (a table with a 'label' column); run recipes.splits.make_split first"
        )
    u, _ = sorted_codes(split["user_id"], with_uniques=False)
    i, _ = sorted_codes(split["item_id"], with_uniques=False)
    shape = (int(u.max()) + 1 if len(u) else 0, int(i.max()) + 1 if len(i) else 0)
    train = pc.fill_null(pc.equal(split["label"], 0), False).to_numpy(zero_copy_only=False)
    mat = sp.csr_matrix(
        (np.ones(int(train.sum()), dtype=np.float32), (u[train], i[train])), shape=shape, dtype=np.float32
    )
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def bipartite(r: sp.spmatrix) -> sp.csr_matrix:
    """The (n_users + n_items)^2 symmetric adjacency [[0, R], [R^T, 0]] of a users x items matrix.

    Built from R's CSR and its transpose's directly (int32 indices, no COO triplets), so it costs the output
    and one transpose: what makes a 100M-edge graph fit."""
    n_users, n_items = r.shape
    top = sp.csr_matrix(r, dtype=np.float32)
    top.sum_duplicates()
    bottom = sp.csr_matrix(top.T)  # CSC of R read as CSR of R^T: sorted indices, no copy of the triplets
    bottom.sort_indices()
    n = n_users + n_items
    indptr = np.concatenate((top.indptr, top.indptr[-1] + bottom.indptr[1:])).astype(np.int64)
    index_type = np.int32 if n < 2**31 else np.int64
    indices = np.concatenate((top.indices.astype(index_type) + n_users, bottom.indices.astype(index_type)))
    data = np.concatenate((top.data, bottom.data))
    del top, bottom
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


_NORM_BLOCK = 1 << 22


def _row_blocks(indptr: np.ndarray):
    """(lo, hi, row of each entry) over whole rows of ~_NORM_BLOCK entries, covering every entry once."""
    nnz = int(indptr[-1])
    bounds = np.unique(
        np.searchsorted(indptr, np.arange(0, nnz + _NORM_BLOCK, _NORM_BLOCK), side="right") - 1
    )
    bounds = np.unique(np.concatenate(([0], bounds, [len(indptr) - 1])))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi > lo:
            yield lo, hi, np.repeat(np.arange(a, b), np.diff(indptr[a : b + 1]))


def sym_normalize(adj: sp.spmatrix, eps: float = 1e-7) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 with D the count of non-zeros per row plus eps, FREEDOM's / LightGCN's `get_norm_adj_mat`.

    The eps (1e-7) is added to the degree before the power, exactly as MMRec does, so isolated nodes get a
    finite (unused) scale instead of inf. Scaled a block of entries at a time, so the float64 temporaries stay
    small whatever the edge count.
    """
    csr = sp.csr_matrix(adj, dtype=np.float32, copy=True)
    csr.sum_duplicates()
    n_rows = csr.shape[0]
    deg = np.zeros(n_rows, dtype=np.float64)
    for lo, hi, rows in _row_blocks(csr.indptr):
        deg += np.bincount(rows, weights=(csr.data[lo:hi] > 0), minlength=n_rows)
    d = np.power(deg + eps, -0.5)
    for lo, hi, rows in _row_blocks(csr.indptr):
        block = csr.data[lo:hi].astype(np.float64)
        csr.data[lo:hi] = (d[rows] * block * d[csr.indices[lo:hi]]).astype(np.float32)
    return csr


def rw_normalize_self_loops(adj: sp.spmatrix) -> sp.csr_matrix:
    """D^-1 (A + I), row-normalised with self-loops: LATTICE's `get_adj_mat` (`normalized_adj_single(A + I)`)."""
    a = sp.csr_matrix(adj, dtype=np.float64) + sp.eye(adj.shape[0], dtype=np.float64, format="csr")
    rowsum = np.asarray(a.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        d_inv = np.power(rowsum, -1.0)
    d_inv[np.isinf(d_inv)] = 0.0
    return sp.csr_matrix(sp.diags(d_inv) @ a, dtype=np.float32)


def ui_adjacency(split: pa.Table, norm: Norm = "sym") -> sp.csr_matrix:
    """User-item adjacency over (n_users + n_items) nodes from the split's train rows only.

    norm: "none" raw binary bipartite A; "sym" D^-1/2 A D^-1/2 with degree + 1e-7 (FREEDOM, LightGCN,
    BM3, ... in MMRec); "lattice" D^-1 (A + I) (LATTICE).
    """
    return normalize(bipartite(train_matrix(split)), norm)


def normalize(a: sp.spmatrix, norm: Norm = "sym") -> sp.csr_matrix:
    """`a` normalised as `ui_adjacency` says for `norm`."""
    if norm == "none":
        return a
    if norm == "sym":
        return sym_normalize(a)
    if norm == "lattice":
        return rw_normalize_self_loops(a)
    raise ValueError(f"norm={norm!r}; expected 'none', 'sym' or 'lattice'")


def to_torch_sparse(mat: sp.spmatrix) -> torch.Tensor:
    """A coalesced float32 torch sparse COO tensor of a SciPy matrix (what MMRec's models hold)."""
    import torch

    coo = sp.coo_matrix(mat)
    indices = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()


def edges_table(src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> pa.Table:
    """Arrow edge table (src int32, dst int32, weight float32); raises past int32 node ids."""
    for name, arr in (("src", src), ("dst", dst)):
        if len(arr) and int(np.max(arr)) >= 2**31:
            raise ValueError(
                f"{name} node id {int(np.max(arr))} exceeds int32; graphs here hold < 2^31 nodes"
            )
    return pa.table(
        [
            pa.array(np.asarray(src, dtype=np.int32)),
            pa.array(np.asarray(dst, dtype=np.int32)),
            pa.array(np.asarray(weight, dtype=np.float32)),
        ],
        schema=EDGE_SCHEMA,
    )


def csr_to_edges(mat: sp.spmatrix) -> pa.Table:
    """Edge table of a sparse matrix, one row per stored entry, row-major order."""
    csr = sp.csr_matrix(mat)
    csr.sum_duplicates()
    src = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    return edges_table(src, csr.indices, csr.data)


def edges_to_csr(edges: pa.Table, shape: tuple[int, int] | int) -> sp.csr_matrix:
    """Sparse float32 matrix of an edge table; `shape` is (rows, cols) or the node count of a square graph.

    Repeated (src, dst) rows are summed.
    """
    if isinstance(shape, int):
        shape = (shape, shape)
    src = edges["src"].to_numpy()
    dst = edges["dst"].to_numpy()
    weight = edges["weight"].to_numpy().astype(np.float32)
    mat = sp.csr_matrix((weight, (src, dst)), shape=shape, dtype=np.float32)
    mat.sum_duplicates()
    return mat
