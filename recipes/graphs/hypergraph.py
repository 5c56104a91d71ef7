"""MMHCL-style user and item hypergraphs as sparse incidence matrices, plus their propagation operators.

An incidence matrix H is vertices x hyperedges, H[v, e] = 1 when v belongs to e. What is built here:

- user hypergraph (`user_incidence`): vertices are users, one hyperedge per item holding the item's train
  users, so H_u = R (users x items). MMHCL's u2u matrix is R R^T with the diagonal zeroed, row-normalised
  (`mmhcl_user_graph`, = `get_U2U_mat(norm_type="rw")`).
- item hypergraph from interactions (`item_incidence`): vertices are items, one hyperedge per user holding
  the user's train items, H_i = R^T.
- item hypergraph from features (`knn_incidence`), MMHCL's i2i: one hyperedge per (modality, item j)
  holding the items whose top-k in that modality contains j, H = [B_image | B_text] with B the binary
  top-k matrices (self included). MMHCL's item matrix is H H^T, symmetric-normalised (`mmhcl_item_graph`,
  = `get_I2I_Hypergraph_mul_mat(norm_type="sym")`). MMHCL binarises with `adj[adj > 0] = 1`, leaving a
  non-positive top-k similarity as is; here every top-k entry is 1.
- `hgnn_operator`: the HGNN form D_v^-1/2 H W D_e^-1 H^T D_v^-1/2.

Only label == 0 rows make hyperedges; products run in bounded row blocks (`recipes.cooccur.gram_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recipes.graphs.cooccur import gram_blocks
from recipes.graphs.user_item import train_matrix

ExpansionNorm = Literal["none", "rw", "sym"]


def user_incidence(split: pa.Table) -> sp.csr_matrix:
    """Users x items incidence: each item is a hyperedge over its train users (= the train matrix R)."""
    return train_matrix(split)


def item_incidence(split: pa.Table) -> sp.csr_matrix:
    """Items x users incidence: each user is a hyperedge over the user's train items (= R^T)."""
    return sp.csr_matrix(train_matrix(split).T)


def knn_incidence(knn_edges: Sequence[pa.Table], n_items: int) -> sp.csr_matrix:
    """Items x (modalities * items) incidence of MMHCL's i2i hypergraph from per-modality top-k edge tables.

    knn_edges: one Arrow (src, dst, ...) table per modality, e.g. `recipes.graphs.knn.knn_edges` outputs;
    column block m holds modality m, H[i, m * n_items + j] = 1 when j is in i's top-k.
    """
    if not knn_edges:
        raise ValueError("give at least one modality's top-k edge table")
    rows, cols = [], []
    for m, edges in enumerate(knn_edges):
        src = edges["src"].to_numpy().astype(np.int64)
        dst = edges["dst"].to_numpy().astype(np.int64)
        if len(src) and max(src.max(), dst.max()) >= n_items:
            raise ValueError(f"modality {m} has node id {max(src.max(), dst.max())} >= n_items={n_items}")
        rows.append(src)
        cols.append(dst + m * n_items)
    r, c = np.concatenate(rows), np.concatenate(cols)
    h = sp.csr_matrix(
        (np.ones(len(r), dtype=np.float32), (r, c)),
        shape=(n_items, n_items * len(knn_edges)),
        dtype=np.float32,
    )
    h.data[:] = 1.0
    return h


def _gram(x: sp.spmatrix, max_block_work: int) -> sp.csr_matrix:
    blocks = [b for _, b in gram_blocks(x, max_block_work)]
    if not blocks:
        return sp.csr_matrix((x.shape[0], x.shape[0]), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float64)


def clique_expansion(
    h: sp.spmatrix, norm: ExpansionNorm = "none", drop_self: bool = False, max_block_work: int = 20_000_000
) -> sp.csr_matrix:
    """H H^T: vertex-vertex weights = number of shared hyperedges, optionally without the diagonal, then
    "rw" D^-1 M or "sym" D^-1/2 M D^-1/2 with D the row sums (zero rows stay zero)."""
    m = _gram(sp.csr_matrix(h, dtype=np.float64), max_block_work)
    if drop_self:
        m.setdiag(0.0)
        m.eliminate_zeros()
    if norm == "none":
        return sp.csr_matrix(m, dtype=np.float32)
    rowsum = np.asarray(m.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        d = np.power(rowsum, -1.0 if norm == "rw" else -0.5)
    d[np.isinf(d)] = 0.0
    if norm == "rw":
        out = sp.diags(d) @ m
    elif norm == "sym":
        out = sp.diags(d) @ m @ sp.diags(d)
    else:
        raise ValueError(f"norm={norm!r}; expected 'none', 'rw' or 'sym'")
    return sp.csr_matrix(out, dtype=np.float32)


def hgnn_operator(
    h: sp.spmatrix, edge_weight: np.ndarray | None = None, max_block_work: int = 20_000_000
) -> sp.csr_matrix:
    """D_v^-1/2 H W D_e^-1 H^T D_v^-1/2 (HGNN), W = diag(edge_weight) (ones by default).

    D_v = H W 1 (weighted vertex degree), D_e = H^T 1 (hyperedge size); empty vertices and hyperedges get 0.
    """
    h = sp.csr_matrix(h, dtype=np.float64)
    n_edges = h.shape[1]
    w = np.ones(n_edges) if edge_weight is None else np.asarray(edge_weight, dtype=np.float64)
    if w.shape != (n_edges,):
        raise ValueError(f"edge_weight has shape {w.shape}; expected ({n_edges},)")
    de = np.asarray(h.sum(axis=0)).ravel()
    dv = h @ w
    with np.errstate(divide="ignore", invalid="ignore"):
        dv_is = np.where(dv > 0, np.power(dv, -0.5), 0.0)
        e_scale = np.where(de > 0, np.sqrt(w / de), 0.0)
    x = sp.diags(dv_is) @ h @ sp.diags(e_scale)
    return sp.csr_matrix(_gram(x, max_block_work), dtype=np.float32)


def mmhcl_user_graph(split: pa.Table, max_block_work: int = 20_000_000) -> sp.csr_matrix:
    """MMHCL's user-user matrix: R R^T over train rows, diagonal zeroed, row-normalised."""
    return clique_expansion(user_incidence(split), "rw", drop_self=True, max_block_work=max_block_work)


def mmhcl_item_graph(
    knn_edges: Sequence[pa.Table], n_items: int, max_block_work: int = 20_000_000
) -> sp.csr_matrix:
    """MMHCL's item-item matrix: H H^T of the multimodal top-k incidence, symmetric-normalised."""
    return clique_expansion(knn_incidence(knn_edges, n_items), "sym", max_block_work=max_block_work)
