"""Approximate cosine top-k (faiss IVF-Flat or HNSW over inner product on unit vectors) for millions of items,
with its recall@k measured against the exact kernel on a seeded sample of query rows.

The search probes more (IVF `nprobe`, HNSW `efSearch`), doubling, until the sample's recall reaches
`target_recall` (or the index is searched exhaustively), then searches every row with that setting. The graph
built from it goes through the same mask and FREEDOM/LATTICE normalisation as the exact one (knn.topk_edges).

    >>> search = AnnSearch(AnnConfig(index="ivf_flat"))
    >>> edges = knn_edges(features, KnnConfig(k=10), search=search)
    >>> search.info   # {"index": "ivf_flat", "params": {"nlist": ..., "nprobe": ...}, "recall_at_10": 0.97, ...}

faiss is the optional dependency `[ann]`; `method="auto"` picks ANN above `AUTO_ANN_ITEMS` items.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from recipes.graphs.knn import block_topk, check_k, l2_normalize
from stores.strict import strict_config

AnnIndex = Literal["ivf_flat", "hnsw"]
AUTO_ANN_ITEMS = 200_000
"""`method="auto"` searches approximately above this many items (exact below: it is fast enough there)."""


@strict_config
class AnnConfig:
    """index: "ivf_flat" (nlist cells, default 4 * sqrt(n)) or "hnsw" (M links). target_recall: probe more
    until recall@k on `sample` seeded query rows reaches it. threads: faiss threads (0: faiss's default)."""

    index: AnnIndex = "ivf_flat"
    nlist: int = 0
    hnsw_m: int = 32
    target_recall: float = 0.95
    sample: int = 1000
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.index not in ("ivf_flat", "hnsw"):
            raise ValueError(f"index={self.index!r}; expected 'ivf_flat' or 'hnsw'")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall}; expected 0 < target_recall <= 1")
        if self.sample < 1:
            raise ValueError(f"sample={self.sample}; expected >= 1")


def import_faiss():
    """faiss, or a one-line error naming the install."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(
            "kNN --method ann needs faiss; `pip install faiss-cpu` (or `pip install mmfeat[ann]`)"
        ) from exc
    return faiss


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact top-k that the approximate top-k also holds."""
    hits = sum(len(np.intersect1d(a, e, assume_unique=True)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


class AnnSearch:
    """A `knn.TopK` search over a faiss index; after a call, `info` holds the manifest's `ann` record."""

    def __init__(self, cfg: AnnConfig = AnnConfig()) -> None:
        self.cfg = cfg
        self.info: dict = {}

    def __call__(self, features: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        if self.cfg.threads:
            faiss.omp_set_num_threads(self.cfg.threads)
        x = l2_normalize(features)
        n, d = x.shape
        check_k(n, k, exclude_self)
        kk = k + int(exclude_self)
        if self.cfg.index == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 2 * self.cfg.hnsw_m
            index.add(x)
            knob, value, limit, params = "efSearch", max(kk, 16), max(n, kk), {"M": self.cfg.hnsw_m}
        else:
            nlist = self.cfg.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(self.cfg.seed)
            train = x if n <= 64 * nlist else x[np.sort(rng.choice(n, 64 * nlist, replace=False))]
            index.train(train)
            index.add(x)
            knob, value, limit, params = "nprobe", max(1, nlist // 256), nlist, {"nlist": nlist}
        sample = np.sort(
            np.random.default_rng(self.cfg.seed).choice(n, min(self.cfg.sample, n), replace=False)
        )
        exact = np.concatenate(
            [block_topk(x, sample[s : s + 512], k, exclude_self)[0] for s in range(0, len(sample), 512)]
        )
        while True:
            set_knob(index, knob, value)
            _, got = index.search(x[sample], kk)
            recall = recall_at_k(drop_self(got, sample, k, exclude_self), exact)  # a -1 is a miss
            if recall >= self.cfg.target_recall or value >= limit:
                break
            value = min(2 * value, limit)
        _, idx = index.search(x, kk)
        idx = drop_self(idx, np.arange(n), k, exclude_self)
        short = np.flatnonzero((idx < 0).any(axis=1))  # IVF cells too small to fill k: search those exactly
        if len(short):
            idx[short] = block_topk(x, short, k, exclude_self)[0]
        self.info = {
            "index": self.cfg.index,
            "params": params | {knob: int(value)},
            f"recall_at_{k}": round(float(recall), 6),
            "sample": int(len(sample)),
            "seed": self.cfg.seed,
            "target_recall": self.cfg.target_recall,
        }
        return idx, similarities(x, idx)


def set_knob(index, knob: str, value: int) -> None:
    """How far the search probes: IVF cells (nprobe) or the HNSW candidate list (efSearch)."""
    if knob == "nprobe":
        index.nprobe = value
    else:
        index.hnsw.efSearch = value


def drop_self(idx: np.ndarray, rows: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    """The first k neighbours of each row, without the row itself when exclude_self (-1: not found, kept)."""
    if not exclude_self:
        return idx[:, :k]
    keep = idx != rows[:, None]
    # rows where self was not returned keep their first k
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1)[:, :k]


def similarities(x: np.ndarray, idx: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosine of each row with its chosen neighbours (float32 [n, k]), recomputed exactly in chunks."""
    out = np.empty(idx.shape, np.float32)
    for s in range(0, len(idx), chunk):
        out[s : s + chunk] = np.einsum("nd,nkd->nk", x[s : s + chunk], x[idx[s : s + chunk]])
    return out
