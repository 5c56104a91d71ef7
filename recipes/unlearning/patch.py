"""Retained-graph patching, the pure part: a graph without some nodes, computed from the stored one.

The retained kNN graph is patched (`knn_patch`): items whose top-k held a removed item are recomputed against the
retained items, every other item keeps its neighbours (re-weighted), which equals `knn_retained`, a rebuild on the
retained items. (A user-item graph needs no patch math: it is stored as its train pairs and normalised on read,
so losing nodes only deletes their rows.) The store steps that read and write graphs are in graphs.py.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recipes.graphs.knn import KnnConfig, l2_normalize, normalize_knn, topk_edges
from stores.missing import present_rows

# ---- retained kNN graphs -------------------------------------------------------------------------------------


def _k_eff(cfg: KnnConfig, n_kept: int) -> int:
    return max(0, min(cfg.k, n_kept - (0 if cfg.self_loops else 1)))


def knn_retained(features: np.ndarray, keep: np.ndarray, cfg: KnnConfig) -> tuple[np.ndarray, ...]:
    """The kNN graph rebuilt on the kept rows only, as (src, dst, weight) over all rows' indices: removed rows
    have no edge. k shrinks to the kept count when fewer rows remain. `keep` should already exclude the items
    without the feature (stores/missing.py); all-zero rows are left out here as in every kNN graph."""
    keep = present_rows(features, keep)
    return topk_edges(features, cfg, keep, k=_k_eff(cfg, int(keep.sum())))


def _topk_rows(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int, exclude_self: bool, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours (global indices, similarities) of `rows` among `cols` of unit-norm `x`."""
    import torch

    xc = torch.from_numpy(x[cols])
    out_idx = np.empty((len(rows), k), dtype=np.int64)
    out_sim = np.empty((len(rows), k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), block):
            q = rows[start : start + block]
            sim = torch.mm(torch.from_numpy(x[q]), xc.T)
            if exclude_self:
                pos = np.searchsorted(cols, q)
                hit = (pos < len(cols)) & (cols[np.minimum(pos, len(cols) - 1)] == q)
                r = np.flatnonzero(hit)
                sim[torch.from_numpy(r), torch.from_numpy(pos[r])] = -torch.inf
            val, idx = torch.topk(sim, k, dim=1)
            out_idx[start : start + len(q)] = cols[idx.numpy()]
            out_sim[start : start + len(q)] = val.numpy()
    return out_idx, out_sim


def knn_patch(
    old_src: np.ndarray, old_dst: np.ndarray, features: np.ndarray, keep: np.ndarray, cfg: KnnConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The retained kNN graph from the stored one: (src, dst, weight, rows recomputed).

    `old_src`/`old_dst` are the stored edges in the new row order (-1 for a node that no longer exists). A kept
    row keeps its stored top-k (re-scored) unless one of its stored neighbours was removed or it has fewer than k
    of them; only those rows are searched again among the kept rows. Weights are re-normalised globally (LATTICE
    weights depend on neighbours' degrees). Equals `knn_retained(features, keep, cfg)`.
    """
    n = len(features)
    keep = present_rows(features, keep)  # an all-zero row has no neighbours, as in knn_retained
    kept = np.flatnonzero(keep)
    k = _k_eff(cfg, len(kept))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    x = l2_normalize(features)
    old_src, old_dst = np.asarray(old_src, np.int64), np.asarray(old_dst, np.int64)
    live = old_src >= 0
    src, dst = old_src[live], old_dst[live]
    gone = (dst < 0) | ~keep[np.maximum(dst, 0)]
    affected = np.zeros(n, dtype=bool)
    affected[src[gone]] = True
    src, dst = src[~gone], dst[~gone]
    affected |= np.bincount(src, minlength=n) < k
    affected &= keep
    stay = ~affected[src] & keep[src]
    src, dst = src[stay], dst[stay]
    sim = np.einsum("ij,ij->i", x[src], x[dst])
    order = np.lexsort((-sim, src))
    src, dst, sim = src[order], dst[order], sim[order]
    starts = np.searchsorted(src, src, side="left")
    first_k = (np.arange(len(src)) - starts) < k
    src, dst, sim = src[first_k], dst[first_k], sim[first_k]
    redo = np.flatnonzero(affected)
    if len(redo):
        idx, s = _topk_rows(x, redo, kept, k, exclude_self=not cfg.self_loops)
        src = np.concatenate((src, np.repeat(redo, k)))
        dst = np.concatenate((dst, idx.ravel()))
        sim = np.concatenate((sim, s.ravel()))
    src, dst, w = normalize_knn(src, dst, sim, n, cfg.norm, cfg.symmetric)
    return src, dst, w, len(redo)


def edges_matrix(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n: int) -> sp.csr_matrix:
    """Square float32 CSR of an edge list (explicit zero weights kept, as `knn_graph` keeps them)."""
    return sp.csr_matrix((np.asarray(w, np.float32), (src, dst)), shape=(n, n), dtype=np.float32)
