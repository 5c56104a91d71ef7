"""The missing-modality policy: what mmfeat does with items that lack a feature, in one place.

An item lacks a feature when the feature table has no vector for it (the `mask` that `artifacts.feature_matrix`
returns is False there; its row in the matrix is a zero placeholder, never a vector). An all-zero vector counts as
missing too: its cosine similarity is undefined (MMRec divides by its zero norm and gets NaN).

- kNN graphs (recipes/graphs/knn.py): a per-modality graph is built only among the items that have the modality.
  An item without it has no out-edges and is nobody's neighbour there. Items that have every modality get exactly
  MMRec's LATTICE/FREEDOM graph.
- Fused graphs: each item's modality weights are renormalised over the modalities it has (`modality_weights`), so
  an item without text takes its image neighbours at the full weight, keeps k neighbours, and no item becomes a hub
  because other items lack data. Items that have every modality keep the weights as given.
- Exports (`fill_missing`): "mean" (default, MMRec's preprocessing) fills an item without the feature with the
  mean vector of the items that have it, "zero" with zeros, "drop" keeps only the items that have it.
- Manifests record how many items lacked each input (`missing_counts`), and every step fingerprint covers the
  presence masks, so a change in who lacks what rebuilds the artifact.

    >>> rows, kept = fill_missing(matrix, mask, "mean")
    >>> missing_counts({"text": text_mask, "image": image_mask})   # {"image": 19, "text": 0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FILL_CHOICES: tuple[str, ...] = ("mean", "zero", "drop")
# Bumped when the policy's result changes for the same inputs; graph steps put it in their parameters.
POLICY_VERSION = "present-only-knn/renormalised-fusion/1"


def fill_missing(matrix: np.ndarray, mask: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(rows for the kept items, indices of the kept items) of `matrix` [n, d] whose items `mask` [n] marks present.

    "mean": every item kept, missing rows set to the mean of the present rows (zeros when none is present);
    "zero": every item kept, missing rows zero; "drop": only the present items.
    """
    if how not in FILL_CHOICES:
        raise ValueError(
            f"missing-feature policy {how!r} is unknown; choose one of {', '.join(FILL_CHOICES)}"
        )
    matrix = np.asarray(matrix)
    mask = np.asarray(mask, dtype=bool)
    if matrix.ndim != 2 or mask.shape != (matrix.shape[0],):
        raise ValueError(f"matrix {matrix.shape} and mask {mask.shape} disagree; expected [n, d] and [n]")
    if how == "drop":
        kept = np.flatnonzero(mask)
        return matrix[kept].copy(), kept
    out = matrix.copy()
    if how == "mean" and mask.any():
        out[~mask] = matrix[mask].mean(axis=0, dtype=np.float64).astype(matrix.dtype)
    else:
        out[~mask] = 0
    return out, np.arange(matrix.shape[0])


def present_rows(matrix: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Bool [n]: items that have the feature, i.e. `mask` (all when None) and a vector that is not all zero."""
    nonzero = np.any(np.asarray(matrix) != 0, axis=1)
    return nonzero if mask is None else nonzero & np.asarray(mask, dtype=bool)


def missing_counts(masks: Mapping[str, np.ndarray]) -> dict[str, int]:
    """How many items lack each feature, {feature: count}, from presence masks (what manifests record)."""
    return {name: int((~np.asarray(mask, dtype=bool)).sum()) for name, mask in sorted(masks.items())}


def modality_weights(masks: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """float64 [n, m]: each item's weight for each modality, renormalised over the modalities it has.

    An item with every modality gets `weights` unchanged; one lacking some gets the same total spread over the
    ones it has, in the same proportions; one with none gets zeros.
    """
    if len(masks) != len(weights) or not masks:
        raise ValueError(f"got {len(masks)} masks and {len(weights)} weights; give one weight per modality")
    have = np.stack([np.asarray(m, dtype=bool) for m in masks], axis=1)
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any():
        raise ValueError(f"modality weights {list(weights)} include a negative one; weights must be >= 0")
    raw = have * w
    share = raw.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(share > 0, raw * (w.sum() / share), 0.0)
    full = have.all(axis=1)
    out[full] = w  # exactly the given weights: MMRec's fusion for items with every modality
    return out
