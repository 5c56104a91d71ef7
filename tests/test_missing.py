"""The missing-modality policy (stores/missing.py): fills for exports, counts for manifests, fusion weights."""

from __future__ import annotations

import numpy as np
import pytest

from stores.missing import fill_missing, missing_counts, modality_weights, present_rows


def test_fill_missing_mean_zero_drop():
    """The "mean" policy fills rows without the feature with the mean of the rows that have it (MMRec's
    preprocessing), "zero" with zeros, "drop" keeps only the present rows and says which; present rows never
    change; an unknown policy is refused with the valid choices named."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    x[~mask] = 0

    mean, kept = fill_missing(x, mask, "mean")
    assert mean.dtype == np.float32 and (kept == np.arange(10)).all()
    np.testing.assert_allclose(mean[~mask], np.tile(x[mask].mean(axis=0), (3, 1)), atol=1e-6)
    assert (mean[mask] == x[mask]).all() and not (mean == 0).all(axis=1).any()

    zero, kept = fill_missing(x, mask, "zero")
    assert (zero[~mask] == 0).all() and (zero[mask] == x[mask]).all() and len(kept) == 10

    dropped, kept = fill_missing(x, mask, "drop")
    assert (kept == np.flatnonzero(mask)).all() and (dropped == x[mask]).all()

    assert (fill_missing(x, np.zeros(10, bool), "mean")[0] == 0).all()  # nothing to average: zeros
    with pytest.raises(ValueError, match="mean, zero, drop"):
        fill_missing(x, mask, "median")


def test_counts_presence_and_fusion_weights():
    """missing_counts counts the False entries per feature; an all-zero row is never present; an item with
    every modality keeps the given weights exactly, one lacking some gets the same total over the ones it has,
    one with none gets zeros."""
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert missing_counts({"text": b, "image": a}) == {"image": 2, "text": 2}
    x = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    assert present_rows(x).tolist() == [True, False, True, False]
    assert present_rows(x, np.array([0, 1, 1, 1], bool)).tolist() == [False, False, True, False]
    w = modality_weights([a, b], [0.1, 0.9])
    np.testing.assert_array_equal(w, [[0.1, 0.9], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(modality_weights([a, b], [1.0, 1.0])[1], [2.0, 0.0])
