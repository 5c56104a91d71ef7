"""The split's decisions are made per user range (recipes/splits.py `PART_ROWS`) and the k-core on a row mask
(recipes/kcore.py `kcore_alive`): the result must not depend on the partition size, the masked k-core must equal
`kcore_mask`'s rounds, and the working memory must stay a few bytes a row (no sort or copy of all rows)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from recipes import splits
from recipes.kcore import dedup_mask, kcore_alive, kcore_mask
from recipes.splits import SplitConfig, split_owned_codes


def _codes(n: int, seed: int = 1) -> list[np.ndarray]:
    """Skewed users/items with ~20% repeated pairs and day-resolution times (many ties)."""
    rng = np.random.default_rng(seed)
    user = (rng.pareto(1.5, n) * 40).astype(np.int32) % max(1, n // 20)
    item = rng.integers(0, max(2, n // 60), n).astype(np.int32)
    rep = np.flatnonzero(rng.random(n) < 0.2)[1:]
    user[rep], item[rep] = user[rep - 1], item[rep - 1]
    ts = 1_500_000_000 + rng.integers(0, 60, n).astype(np.int64) * 86_400
    return [user, item, ts]


CONFIGS = [
    SplitConfig(scheme="random", kcore=3, seed=7),
    SplitConfig(scheme="temporal", kcore=(4, 2), dedup="last"),
    SplitConfig(scheme="temporal", kcore=3, dedup="all", kcore_counts="partners"),
    SplitConfig(scheme="loo", kcore=3, dedup="all", kcore_counts="rows"),
    SplitConfig(scheme="cutoff", kcore=2, cutoff_quantiles=(0.7, 0.9)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.dedup}-{c.kcore_counts}")
def test_split_does_not_depend_on_partition_size(cfg: SplitConfig, monkeypatch):
    """Keep mask, labels and the present-id masks are identical with one partition and with many (37 rows each,
    so users straddle nothing and the random draws are taken in many pieces)."""
    columns = _codes(30_000)
    one: dict = {}
    keep1, labels1 = split_owned_codes([c.copy() for c in columns], cfg, one)
    monkeypatch.setattr(splits, "PART_ROWS", 37)
    many: dict = {}
    keep2, labels2 = split_owned_codes([c.copy() for c in columns], cfg, many)
    assert 0 < keep1.sum() < len(keep1)
    assert np.array_equal(keep1, keep2)
    assert np.array_equal(labels1, labels2)
    assert set(np.unique(labels1)) == {0, 1, 2}
    for name in ("users", "items"):
        assert np.array_equal(one[name], many[name])


@pytest.mark.parametrize("counts", ["partners", "rows"])
def test_masked_kcore_equals_kcore_mask(counts: str):
    """`kcore_alive` over a mask of deduplicated-or-not rows drops exactly the rows `kcore_mask` drops."""
    user, item, ts = _codes(50_000, seed=3)
    expected = kcore_mask(user, item, 5, 3, counts)
    alive = np.ones(len(user), dtype=bool)
    first = np.ones(len(user), dtype=bool)
    if counts == "partners":
        first = dedup_mask(user, item, ts, "first")  # one row per pair: a pair's first row
    kcore_alive(user, item, alive, first, 5, 3)
    assert 0 < expected.sum() < len(expected)
    assert np.array_equal(alive, expected)


def test_split_working_memory_is_a_few_bytes_a_row(monkeypatch):
    """Beyond its inputs, a split of 1M rows allocates at most ~10 bytes a row plus one partition's temporaries
    (the former whole-table sorts took ~60): masks and labels only, the sorts bounded by PART_ROWS."""
    n = 1_000_000
    columns = _codes(n, seed=5)
    monkeypatch.setattr(splits, "PART_ROWS", 1 << 16)
    tracemalloc.start()
    try:
        keep, labels = split_owned_codes(columns, SplitConfig(scheme="temporal", kcore=5))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keep.sum() == len(labels) > 0
    assert peak < 10 * n + 80 * (1 << 16) + (8 << 20), f"peak {peak / n:.1f} bytes a row"
