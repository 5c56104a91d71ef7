"""Semantic IDs: residual k-means (RQ-KMeans) codes over item embeddings, with a suffix that makes them unique.

Generative recommenders (TIGER, LC-Rec, MMGRec) replace an item id with a short tuple of codes. Level 1 runs
k-means on the (L2-normalised) vectors, level 2 on what level 1 leaves (the residuals), and so on; an item's code
at each level is its nearest centroid there. Items whose L codes coincide get a collision suffix 0, 1, 2, ... (in
item order), so every (codes..., suffix) tuple is unique. `rq_vae` learns the codes instead (TIGER's RQ-VAE:
encoder, residual codebooks, decoder; torch on CPU) and ends with the same suffix and metrics. No I/O here.

Metrics: `utilisation` per level (share of the codebook's codes some item uses), `collision_rate` (share of items
whose L codes another item also has, before the suffix), `reconstruction_error` (mean squared residual after the
last level over the mean squared norm of the input; per level in `reconstruction_error_per_level`).
Plain RQ-KMeans on few items in many dimensions collapses at levels >= 2 (residuals far from every centroid go to
the smallest one): on ML-100K MiniLM 3x256, 69% of items collide; `balanced` brings that to 2%.
Items sharing a first code share a genre (ML-100K MiniLM, seeds 0-3) 1.36-1.43x as often as random pairs
with balanced RQ-KMeans and 1.46-1.54x (mean 1.50) with RQ-VAE; MiniLM's own 7 nearest neighbours: 1.505x.

    >>> x = fuse_vectors([text, image], [0.5, 0.5])          # each block L2-normalised, scaled by sqrt(weight)
    >>> sid = rq_kmeans(x, SemanticIdConfig(levels=3, codebook=256, seed=0))
    >>> sid.codes.shape, sid.suffix.max(), sid.metrics["collision_rate"]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

METHODS = ("rq-kmeans", "rq-vae")
VAE_BATCH = 256  # rows per RQ-VAE step; the first batch also seeds the codebooks (k-means)
VAE_LR = 1e-3
VAE_BETA = 0.25  # commitment weight (VQ-VAE's beta)
VAE_RESET_EVERY = 50  # steps between dead-code resets


@dataclass(frozen=True)
class SemanticIdConfig:
    """levels: codes per item; codebook: centroids per level; balanced: capacity-constrained assignment (each
    centroid holds at most ceil(n / codebook) items, so codes spread evenly; rq-kmeans only); iters: k-means
    iterations. rq-vae: `steps` Adam steps of VAE_BATCH rows, an MLP of `hidden` units to a `latent`-d space.
    pca: quantise the vectors' projection on their top `pca` principal components (centred) instead of the
    vectors themselves; the metrics then describe that projection and record the variance it keeps."""

    levels: int = 3
    codebook: int = 256
    method: str = "rq-kmeans"
    balanced: bool = False
    seed: int = 0
    iters: int = 50
    steps: int = 1000
    hidden: int = 256
    latent: int = 64
    pca: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not implemented; use one of {', '.join(METHODS)}")
        if self.balanced and self.method != "rq-kmeans":
            raise ValueError(f"balanced=True is for rq-kmeans, not {self.method!r}; drop --balanced")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"pca={self.pca}; give the number of principal components to keep (>= 1)")
        if self.levels < 1 or self.codebook < 2:
            raise ValueError(
                f"levels={self.levels}, codebook={self.codebook}; expected levels >= 1 and codebook >= 2"
            )


@dataclass(frozen=True)
class SemanticIds:
    """codes int32 [n, levels]; suffix int32 [n]; codebooks: one float32 [k, d] per level; metrics for the
    manifest (utilisation per level, collision rate before the suffix, reconstruction error)."""

    codes: np.ndarray
    suffix: np.ndarray
    codebooks: list[np.ndarray] = field(repr=False)
    metrics: dict


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def fuse_vectors(blocks: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Concatenate L2-normalised blocks scaled by sqrt(weight): squared distances add up as sum_f w_f d_f^2."""
    if len(blocks) != len(weights) or not blocks:
        raise ValueError(f"{len(blocks)} features but {len(weights)} weights; give one weight per feature")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights {list(weights)} include one <= 0; weights must be positive")
    return np.concatenate(
        [l2_normalise(b) * np.float32(np.sqrt(w)) for b, w in zip(blocks, weights, strict=True)], 1
    )


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def capacity_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Each row to a column, nearest first, no column taking more than `capacity` rows (greedy over all pairs in
    order of distance; needs rows <= columns * capacity)."""
    n, k = dist.shape
    if n > k * capacity:
        raise ValueError(f"{n} items cannot fit {k} centroids of capacity {capacity}")
    out = np.full(n, -1, np.int64)
    load = np.zeros(k, np.int64)
    left = n
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if out[i] < 0 and load[j] < capacity:
            out[i], load[j] = j, load[j] + 1
            left -= 1
            if not left:
                break
    return out


def _kmeans(x: np.ndarray, k: int, cfg: SemanticIdConfig, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, d], assignment [n]) of one level; seeded by (seed, level), so a re-run gives the same."""
    from sklearn.cluster import KMeans

    seed = cfg.seed * 1000 + level
    with warnings.catch_warnings():  # fewer distinct residuals than k: some centroids stay duplicates
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=1, max_iter=cfg.iters, random_state=seed).fit(x)
    centroids = km.cluster_centers_.astype(np.float32)
    labels = km.labels_.astype(np.int64)
    if cfg.balanced:
        capacity = -(-len(x) // k)
        for _ in range(cfg.iters):
            new = capacity_assign(_sq_dist(x, centroids), capacity)
            for j in range(k):
                members = new == j
                if members.any():
                    centroids[j] = x[members].mean(0)
            if np.array_equal(new, labels):
                break
            labels = new
    return centroids, labels


def collision_suffix(codes: np.ndarray) -> np.ndarray:
    """int32 [n]: 0 for the first item (in row order) of each distinct code tuple, 1 for the second, ..."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    suffix = np.empty(len(order), np.int32)
    suffix[order] = rank
    return suffix


def rq_kmeans(x: np.ndarray, cfg: SemanticIdConfig) -> SemanticIds:
    """Residual k-means codes of the rows of `x` (float [n, d]) and their collision suffixes."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n == 0:
        raise ValueError("no item has the feature; encode it first (`mmfeat encode ...`)")
    residual = x.copy()
    codes = np.zeros((n, cfg.levels), np.int32)
    codebooks, error = [], []
    total = float((x * x).sum(1).mean()) or 1.0
    for level in range(cfg.levels):
        distinct = len(np.unique(residual, axis=0))
        k = max(1, min(cfg.codebook, distinct))
        centroids, labels = _kmeans(residual, k, cfg, level)
        codes[:, level] = labels
        residual = residual - centroids[labels]
        codebooks.append(centroids)
        error.append(round(float((residual * residual).sum(1).mean()) / total, 6))
    return _finish(codes, codebooks, error, cfg)


def _finish(
    codes: np.ndarray, codebooks: list[np.ndarray], errors: list[float], cfg: SemanticIdConfig
) -> SemanticIds:
    """The collision suffix and the manifest metrics, the same for every method."""
    n = len(codes)
    suffix = collision_suffix(codes)
    tuples, counts = np.unique(codes, axis=0, return_counts=True)
    metrics = {
        "items": n,
        "utilisation": [round(len(np.unique(c)) / cfg.codebook, 4) for c in codes.T],
        "collision_rate": round(float(counts[counts > 1].sum()) / n, 6),
        "distinct_tuples": len(tuples),
        "max_suffix": int(suffix.max()),
        "reconstruction_error": errors[-1],
        "reconstruction_error_per_level": errors,
    }
    return SemanticIds(codes, suffix, codebooks, metrics)


def rq_vae(x: np.ndarray, cfg: SemanticIdConfig) -> SemanticIds:
    """RQ-VAE codes (TIGER): an MLP encoder, `levels` residual codebooks in its latent space trained with the
    straight-through estimator and a commitment loss, and an MLP decoder reconstructing `x`. The codebooks start
    from k-means of the first batch's residuals; a code that no item of the last VAE_RESET_EVERY batches used moves
    onto a random residual of the current batch. Deterministic for a seed (torch's RNG seeded inside
    `fork_rng`, so the caller's random state is left as it was; CPU). Codebooks
    returned live in the latent space; `reconstruction_error` is the decoder's squared error over the inputs'
    mean squared norm, decoding the sum of the first 1, 2, ... levels."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _rq_vae(np.asarray(x, dtype=np.float32), cfg)


def _rq_vae(x: np.ndarray, cfg: SemanticIdConfig) -> SemanticIds:
    import torch

    n, d = x.shape
    if n == 0:
        raise ValueError("no item has the feature; encode it first (`mmfeat encode ...`)")
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(x)
    mlp = torch.nn.Sequential
    encoder = mlp(torch.nn.Linear(d, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, cfg.latent))
    decoder = mlp(torch.nn.Linear(cfg.latent, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, d))
    size = min(n, VAE_BATCH)
    with torch.no_grad():  # k-means of a first batch (>= 4 rows a code), level by level on its residuals
        first = data[torch.randperm(n, generator=gen)[: min(n, max(size, 4 * cfg.codebook))]]
        residual, books = encoder(first).numpy(), []
        for level in range(cfg.levels):
            k = max(1, min(cfg.codebook, len(np.unique(residual, axis=0))))
            centroids, labels = _kmeans(residual, k, cfg, level)
            residual = residual - centroids[labels]
            if k < cfg.codebook:  # fewer distinct residuals than codes: the rest start on random residuals
                rows = np.random.default_rng(cfg.seed * 1000 + level).integers(
                    0, len(residual), cfg.codebook - k
                )
                centroids = np.concatenate([centroids, residual[rows]])
            books.append(torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(centroids, np.float32))))
    params = [*encoder.parameters(), *decoder.parameters(), *books]
    optimiser = torch.optim.Adam(params, lr=VAE_LR)

    def assign(z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantised vector per level, codes [n, levels], codebook + commitment loss, last residual)."""
        residual, quants, codes, loss = z, [], [], z.new_zeros(())
        for book in books:
            idx = torch.cdist(residual.detach(), book.detach()).argmin(1)
            q = book[idx]
            loss = (
                loss
                + ((residual.detach() - q) ** 2).mean()
                + VAE_BETA * ((residual - q.detach()) ** 2).mean()
            )
            quants.append(q)
            codes.append(idx)
            residual = residual - q.detach()
        return quants, torch.stack(codes, 1), loss, residual

    used = torch.zeros(cfg.levels, cfg.codebook, dtype=torch.bool)
    for step in range(1, cfg.steps + 1):
        batch = data[torch.randperm(n, generator=gen)[:size]]
        z = encoder(batch)
        quants, codes, vq_loss, _ = assign(z)
        zq = z + (sum(quants) - z).detach()  # straight-through: the decoder's gradient reaches the encoder
        loss = ((decoder(zq) - batch) ** 2).mean() + vq_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        for level in range(cfg.levels):
            used[level, codes[:, level]] = True
        if step % VAE_RESET_EVERY == 0 and step < cfg.steps:
            with torch.no_grad():  # dead codes move onto residuals the current codebooks serve
                residual = z.detach()
                for level, book in enumerate(books):
                    dead = (~used[level]).nonzero().flatten()
                    if len(dead):
                        rows = torch.randint(0, len(residual), (len(dead),), generator=gen)
                        book[dead] = residual[rows]
                    residual = residual - book[torch.cdist(residual, book).argmin(1)]
            used[:] = False
    with torch.no_grad():
        quants, codes, _, _ = assign(encoder(data))
        total = float((data * data).sum(1).mean()) or 1.0
        errors = [
            round(float(((decoder(sum(quants[: level + 1])) - data) ** 2).sum(1).mean()) / total, 6)
            for level in range(cfg.levels)
        ]
    return _finish(codes.numpy().astype(np.int32), [b.detach().numpy().copy() for b in books], errors, cfg)


def principal_components(x: np.ndarray, d: int) -> tuple[np.ndarray, float]:
    """(float32 [n, min(d, rank)] projection of the centred rows of `x` on their top principal components, the
    share of the variance it keeps). Each component's sign is fixed (largest loading positive), so the same
    input gives the same projection."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    d = min(d, len(sing))
    basis = vt[:d] * np.sign(vt[:d][np.arange(d), np.abs(vt[:d]).argmax(1)])[:, None]
    kept = float((sing[:d] ** 2).sum() / max((sing**2).sum(), 1e-30))
    return (centred @ basis.T).astype(np.float32), kept


def quantise(x: np.ndarray, cfg: SemanticIdConfig) -> SemanticIds:
    """Semantic IDs of the rows of `x` by `cfg.method` (on their top `cfg.pca` principal components if set)."""
    kept = None
    if cfg.pca is not None:
        x, kept = principal_components(x, cfg.pca)
    sid = rq_vae(x, cfg) if cfg.method == "rq-vae" else rq_kmeans(x, cfg)
    if kept is not None:
        sid.metrics["pca"] = {"components": x.shape[1], "variance_kept": round(kept, 4)}
    return sid


__all__ = [
    "METHODS",
    "SemanticIdConfig",
    "SemanticIds",
    "capacity_assign",
    "collision_suffix",
    "fuse_vectors",
    "l2_normalise",
    "principal_components",
    "quantise",
    "rq_kmeans",
    "rq_vae",
]
