"""The user-item adjacency and its normalisations, a pure function of the binary users x items matrix.

Stored user-item graphs hold that matrix's pairs only (stores/artifacts.py `write_ui_pairs`) and are normalised
here when read, so both the recipes that build them and the stores that read them use these functions.

    >>> adj = normalize(bipartite(r), "sym")     # r: users x items, 1 per train pair
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

Norm = Literal["none", "sym", "lattice"]


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


def normalize(a: sp.spmatrix, norm: Norm = "sym") -> sp.csr_matrix:
    """`a` normalised as `ui_adjacency` says for `norm`."""
    if norm == "none":
        return a
    if norm == "sym":
        return sym_normalize(a)
    if norm == "lattice":
        return rw_normalize_self_loops(a)
    raise ValueError(f"norm={norm!r}; expected 'none', 'sym' or 'lattice'")
