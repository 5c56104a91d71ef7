"""Exact cosine top-k item-item graphs from feature matrices, normalised as LATTICE and FREEDOM do in MMRec.

Similarities are computed in tiles of `block_rows` queries x at most `min(max_tile, TILE_CAP) / block_rows` items
with one float32 GEMM each (NumPy's BLAS), keeping a running top-k, so memory is O(N * k + tile) whatever N is. `block_topk` is the one exact
kernel: `knn_topk` maps it over the query blocks in process, or over Ray actors with
`map_blocks=extractors.knn_actors.ray_map_blocks` (same result); the approximate search (faiss, recall measured
on a sample) is recipes/graphs/knn_ann.py. Any search plugs into `topk_edges(..., search=)`, so the mask and the
normalisation below are the same whichever found the neighbours.

    >>> cfg = KnnConfig(k=10, norm="freedom")
    >>> mm_adj = freedom_mm_graph(image_feat, text_feat, cfg, image_weight=0.1)   # FREEDOM's mm_adj
    >>> edges = knn_edges(text_feat, KnnConfig(k=10, norm="lattice"))            # Arrow (src, dst, weight)

What MMRec computes (and this module reproduces):
- LATTICE (`build_sim`, `build_knn_neighbourhood`, `compute_normalized_laplacian`): W keeps the top-k
  cosine values of each row, the item itself included, not symmetrised; then D^-1/2 W D^-1/2 with D the
  row sums of W (out-edges only). A negative row sum gives NaN there too; we warn when it happens.
- FREEDOM (`get_knn_adj_mat`, `compute_normalized_laplacian(indices, adj_size)`): binary top-k (self
  included), value r[i]^-1/2 * r[j]^-1/2 with r = row sums + 1e-7. Row sums of a top-k graph are all k, so
  every weight is 1/k: the column (in-)degree never enters, although the code reads like D^-1/2 A D^-1/2.
  With `symmetric=True` the row sums of the union graph vary and the same formula gives a true
  symmetric normalisation.
- Fused (FREEDOM): `image_weight * image_adj + (1 - image_weight) * text_adj`, default image weight 0.1.
Missing features (the policy is stores/missing.py): a modality's graph is built only among the items that have
it (the `present` mask; an all-zero row counts as missing, where MMRec would divide by its zero norm and get NaN).
An item without the modality has no out-edges and is nobody's neighbour there; `fuse_graphs` renormalises each
item's weights over the modalities it has. Items with every modality get exactly MMRec's graphs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recipes.graphs.user_item import edges_table
from stores.missing import modality_weights, present_rows
from stores.strict import strict_config

KnnNorm = Literal["freedom", "lattice", "none"]
NORMS: tuple[str, ...] = ("freedom", "lattice", "none")


@strict_config
class KnnConfig:
    """k: neighbours per item. norm: "freedom", "lattice" or "none" (raw cosine weights).
    symmetric: add the reverse of every edge (union, cosine weight). self_loops: False picks k neighbours
    other than the item itself (MMRec keeps the item: True). block_rows / max_tile: query rows per tile and
    the cap on similarity entries held at once (memory ~ 4 bytes * max_tile)."""

    k: int = 10
    norm: KnnNorm = "freedom"
    symmetric: bool = False
    self_loops: bool = True
    block_rows: int = 512
    max_tile: int = 1 << 26

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k}; expected >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; expected one of {NORMS}")
        if self.block_rows < 1 or self.max_tile < self.block_rows:
            raise ValueError(
                f"block_rows={self.block_rows}, max_tile={self.max_tile}; need 1 <= block_rows <= max_tile"
            )


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous); all-zero rows stay zero."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features have shape {x.shape}; expected [n_items, d]")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; fix or drop those rows before building a graph")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return x / norm


TILE_CAP = 1 << 21
"""Similarity entries computed per BLAS call (8 MB of float32): large enough for an efficient GEMM, small enough
that the tile stays in cache-friendly sizes and adds little to peak memory, whatever `max_tile` allows."""


def block_topk(
    x: np.ndarray, rows: np.ndarray, k: int, exclude_self: bool = False, max_tile: int = 1 << 26
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the unit rows x[rows] against all rows of x (already L2-normalised, float32): (indices int64
    [len(rows), k], similarities float32), descending. The one exact kernel:
    `knn_topk` runs it block by block in this process, extractors/knn_actors.py on Ray actors, knn_ann.py on
    its recall sample.

    Column tiles of at most min(max_tile, TILE_CAP) entries are filled by one float32 GEMM into a reused buffer;
    only entries above each row's current k-th best leave the tile (few after the first tile), so selection
    costs a comparison per entry instead of a partial sort."""
    rows = np.asarray(rows, dtype=np.int64)
    b, n = len(rows), x.shape[0]
    cols = max(min(n, min(max_tile, TILE_CAP) // max(b, 1)), k + 1)
    query = x[rows]
    tile = np.empty((b, cols), dtype=np.float32)
    for c0 in range(0, n, cols):
        c1 = min(c0 + cols, n)
        sim = tile if c1 - c0 == cols else np.empty((b, c1 - c0), dtype=np.float32)
        np.matmul(query, x[c0:c1].T, out=sim)
        if exclude_self:
            hit = np.flatnonzero((rows >= c0) & (rows < c1))
            sim[hit, rows[hit] - c0] = -np.inf
        if c0 == 0:
            # the first tile seeds every row's top-k (a partial sort; later tiles only filter)
            top = np.argpartition(sim, -k, axis=1)[:, -k:] if c1 > k else np.indices(sim.shape)[1]
            best_sim, best_idx = np.take_along_axis(sim, top, axis=1), top.astype(np.int64)
            continue
        flat = np.flatnonzero(sim > best_sim.min(axis=1, keepdims=True))
        if not len(flat):
            continue
        r, c = np.divmod(flat, sim.shape[1])
        best_sim, best_idx = _merge_topk(best_sim, best_idx, r, sim.ravel()[flat], c + c0, k)
    order = _row_order(best_sim, best_idx)
    return np.take_along_axis(best_idx, order, axis=1), np.take_along_axis(best_sim, order, axis=1)


def _row_order(sim: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row, the positions sorted by similarity descending, then index ascending."""
    b, k = sim.shape
    row = np.repeat(np.arange(b), k)
    flat = np.lexsort((idx.ravel(), -sim.ravel(), row))
    return (flat - row * k).reshape(b, k)


def _merge_topk(
    best_sim: np.ndarray, best_idx: np.ndarray, r: np.ndarray, sim: np.ndarray, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best among its current top-k and the candidates (row r, similarity sim, index idx)."""
    b = best_sim.shape[0]
    rows = np.concatenate((np.repeat(np.arange(b), k), r))
    sims = np.concatenate((best_sim.ravel(), sim))
    idxs = np.concatenate((best_idx.ravel(), idx))
    # one float64 sort key: row first, then similarity descending (cosines lie in [-1, 1], exact in float64)
    order = np.argsort(rows * 4.0 + (1.0 - sims.astype(np.float64)))
    start = np.searchsorted(rows[order], np.arange(b))
    pick = order[(start[:, None] + np.arange(k)).ravel()]
    return sims[pick].reshape(b, k), idxs[pick].reshape(b, k)


def check_k(n: int, k: int, exclude_self: bool) -> None:
    """k must leave enough candidates among the n rows."""
    if k > n - int(exclude_self):
        raise ValueError(f"k={k} but only {n - int(exclude_self)} candidate neighbours; lower k")


BlockMap = Callable[..., Iterable[tuple[np.ndarray, np.ndarray]]]
"""map_blocks(kernel, x, blocks, **kwargs) -> kernel(x, rows, **kwargs) for each block of rows, in order:
in process by default, or extractors.knn_actors.ray_map_blocks over a Ray actor pool."""


def local_map_blocks(kernel: Callable, x: np.ndarray, blocks: list[np.ndarray], **kwargs) -> Iterator:
    """Each block in this process, on as many threads as BLAS was given, in order. Each GEMM runs on one BLAS
    thread, as on a one-CPU Ray actor: OpenBLAS's arithmetic (hence the last bit) depends on its thread count."""
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] or [1])
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        yield from pool.map(lambda rows: kernel(x, rows, **kwargs), blocks)


def knn_topk(
    features: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    block_rows: int = 512,
    max_tile: int = 1 << 26,
    map_blocks: BlockMap = local_map_blocks,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of every row against all rows: (indices int64 [N, k], similarities float32 [N, k]).

    Each row's neighbours come in descending similarity. With exclude_self the row itself is never chosen.
    `map_blocks` runs `block_topk` over the blocks of `block_rows` query rows (elsewhere: Ray actors); every
    block's result is the same wherever it runs, so the graph is too.
    """
    x = l2_normalize(features)
    n = x.shape[0]
    check_k(n, k, exclude_self)
    blocks = [np.arange(start, min(start + block_rows, n)) for start in range(0, n, block_rows)]
    out_idx = np.empty((n, k), dtype=np.int64)
    out_sim = np.empty((n, k), dtype=np.float32)
    parts = map_blocks(block_topk, x, blocks, k=k, exclude_self=exclude_self, max_tile=max_tile)
    for rows, (idx, sim) in zip(blocks, parts, strict=True):
        out_idx[rows[0] : rows[-1] + 1], out_sim[rows[0] : rows[-1] + 1] = idx, sim
    return out_idx, out_sim


TopK = Callable[[np.ndarray, int, bool], tuple[np.ndarray, np.ndarray]]
"""A top-k search (features of the present rows, k, exclude_self) -> (indices [n, k], similarities [n, k]):
exact in process (the default), knn_ann.AnnSearch, or the Ray actor pool; all feed the same normalisation."""


def _symmetrise(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Union of the edges and their reverses; a pair present both ways keeps the larger weight."""
    s = np.concatenate((src, dst))
    d = np.concatenate((dst, src))
    ww = np.concatenate((w, w))
    key = s.astype(np.int64) * n + d
    order = np.lexsort((-ww, key))
    key, s, d, ww = key[order], s[order], d[order], ww[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return s[first], d[first], ww[first]


def normalize_knn(
    src: np.ndarray, dst: np.ndarray, sim: np.ndarray, n: int, norm: KnnNorm, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge weights of a top-k edge list under the chosen normalisation (see the module docstring)."""
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    w = np.asarray(sim, dtype=np.float64)
    if norm == "freedom":
        w = np.ones_like(w)
    if symmetric:
        src, dst, w = _symmetrise(src, dst, w, n)
    if norm == "freedom":
        r = np.power(np.bincount(src, minlength=n) + 1e-7, -0.5)
        w = r[src] * r[dst]
    elif norm == "lattice":
        rowsum = np.bincount(src, weights=w, minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.power(rowsum, -0.5)
        d[np.isinf(d)] = 0.0
        w = d[src] * w * d[dst]
        if np.isnan(w).any():
            warnings.warn(
                f"{int(np.isnan(d).sum())} item(s) have a negative sum of top-k similarities; their LATTICE "
                "weights are NaN, as in MMRec. Check those feature rows.",
                stacklevel=2,
            )
    elif norm != "none":
        raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
    return src, dst, w.astype(np.float32)


def topk_edges(
    features: np.ndarray,
    cfg: KnnConfig,
    present: np.ndarray | None = None,
    k: int | None = None,
    search: TopK | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised top-k edges (src, dst, weight) over all rows' indices, searched among the present rows only.

    `present` (bool [n]; None: all) marks the items that have the feature; all-zero rows count as absent too.
    Absent rows get no edge either way. `k` overrides cfg.k (the retained graphs of unlearning shrink it).
    `search` replaces the exact in-process top-k (ANN, Ray actors); the mask and normalisation stay the same.
    """
    rows = np.flatnonzero(present_rows(features, present))
    k = cfg.k if k is None else k
    n = features.shape[0]
    if k == 0 or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    sub = features if len(rows) == n else features[rows]
    if search is None:
        idx, sim = knn_topk(
            sub, k, exclude_self=not cfg.self_loops, block_rows=cfg.block_rows, max_tile=cfg.max_tile
        )
    else:
        idx, sim = search(sub, k, not cfg.self_loops)
    return normalize_knn(np.repeat(rows, k), rows[idx.ravel()], sim.ravel(), n, cfg.norm, cfg.symmetric)


def knn_edges(
    features: np.ndarray,
    cfg: KnnConfig = KnnConfig(),
    present: np.ndarray | None = None,
    search: TopK | None = None,
) -> pa.Table:
    """The normalised top-k graph as an Arrow edge table (src, dst, weight), rows aligned to `features`; only
    the `present` items (default: rows that are not all zero) take part."""
    return edges_table(*topk_edges(features, cfg, present, search=search))


def knn_graph(
    features: np.ndarray,
    cfg: KnnConfig = KnnConfig(),
    present: np.ndarray | None = None,
    search: TopK | None = None,
) -> sp.csr_matrix:
    """The normalised top-k graph as an N x N float32 CSR matrix (absent items: empty rows and columns)."""
    src, dst, w = topk_edges(features, cfg, present, search=search)
    n = features.shape[0]
    return sp.csr_matrix((w, (src, dst)), shape=(n, n), dtype=np.float32)


def fuse_graphs(
    graphs: Sequence[sp.spmatrix], weights: Sequence[float], present: Sequence[np.ndarray] | None = None
) -> sp.csr_matrix:
    """Weighted sum of same-shaped graphs, sum_m weights[m] * graphs[m] (an edge in several graphs adds up).

    With `present` (one bool mask per graph: the items that have that modality), row i of graph m is weighed
    by `stores.missing.modality_weights`: the weights renormalised over the modalities item i has."""
    if len(graphs) != len(weights) or not graphs:
        raise ValueError(f"got {len(graphs)} graphs and {len(weights)} weights; give one weight per graph")
    shapes = {g.shape for g in graphs}
    if len(shapes) != 1:
        raise ValueError(f"graphs have different shapes {sorted(shapes)}; build them over the same item ids")
    if present is None:
        per_item = np.tile(np.asarray(weights, np.float64), (graphs[0].shape[0], 1))
    else:
        per_item = modality_weights(present, weights)
    out = sp.csr_matrix(graphs[0].shape, dtype=np.float32)
    for m, g in enumerate(graphs):
        g = sp.csr_matrix(g, dtype=np.float32)
        # w * g in float32, row by row: the product MMRec's `w * adj` computes
        scale = np.repeat(per_item[:, m].astype(np.float32), np.diff(g.indptr))
        out = out + sp.csr_matrix((g.data * scale, g.indices, g.indptr), shape=g.shape)
    out.sum_duplicates()
    return sp.csr_matrix(out, dtype=np.float32)


def multimodal_knn_graph(
    features: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    cfg: KnnConfig = KnnConfig(),
    present: Mapping[str, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """One normalised top-k graph per modality, each among the items that have it, fused with per-modality
    weights renormalised per item over the modalities it has (names must match; `present` default: non-zero
    rows)."""
    if set(features) != set(weights):
        raise ValueError(
            f"features {sorted(features)} and weights {sorted(weights)} name different modalities"
        )
    names = sorted(features)
    n = {features[m].shape[0] for m in names}
    if len(n) != 1:
        raise ValueError(f"modalities have different item counts {n}; align them to the same item ids first")
    masks = [present_rows(features[m], None if present is None else present.get(m)) for m in names]
    graphs = [knn_graph(features[m], cfg, mask) for m, mask in zip(names, masks, strict=True)]
    return fuse_graphs(graphs, [weights[m] for m in names], masks)


def freedom_mm_graph(
    image: np.ndarray,
    text: np.ndarray,
    cfg: KnnConfig = KnnConfig(),
    image_weight: float = 0.1,
    present: Mapping[str, np.ndarray] | None = None,
) -> sp.csr_matrix:
    """FREEDOM's frozen item graph `mm_adj`: image_weight * image_adj + (1 - image_weight) * text_adj, with the
    missing-modality policy (`present`: {"image": mask, "text": mask}) for items lacking one of them."""
    return multimodal_knn_graph(
        {"image": image, "text": text}, {"image": image_weight, "text": 1 - image_weight}, cfg, present
    )


def knn_recall(approx_edges: pa.Table, exact_edges: pa.Table) -> float:
    """Share of exact (src, dst) pairs that the approximate graph also has: recall of an ANN graph."""
    if exact_edges.num_rows == 0:
        raise ValueError("exact graph has no edges; recall is undefined")

    def keys(t: pa.Table) -> np.ndarray:
        return (t["src"].to_numpy().astype(np.int64) << 32) | t["dst"].to_numpy().astype(np.int64)

    exact = np.unique(keys(exact_edges))
    return float(np.isin(exact, keys(approx_edges)).sum() / len(exact))
