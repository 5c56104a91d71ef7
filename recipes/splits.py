"""Train / validation / test splits of an interaction table: a frozen config and one pure function.

A split is the interactions (after de-duplication and k-core) plus an int8 `label` column, 0 train,
1 validation, 2 test, MMRec's `x_label`. Row order of the input is kept.

    >>> cfg = SplitConfig(scheme="random", kcore=5, seed=7)
    >>> split = make_split(interactions, cfg)
    >>> pc.value_counts(split["label"])
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import field_validator

from recipes.kcore import (
    DEDUP_POLICIES,
    KCORE_COUNTS,
    DedupPolicy,
    KcoreCounts,
    check_interactions,
    dedup_mask,
    kcore_alive,
    masked_bincount,
    pair_order,
)
from stores.ids import id_maps, seconds, sorted_codes
from stores.strict import strict_config

Scheme = Literal["random", "temporal", "loo", "cutoff"]
SCHEMES: tuple[str, ...] = ("random", "temporal", "loo", "cutoff")
TRAIN, VALID, TEST = 0, 1, 2

__all__ = ["SplitConfig", "holdout_counts", "make_split", "split_codes", "split_counts", "split_owned_codes"]


@strict_config
class SplitConfig:
    """How to split. Fields:

    scheme: "random" (per-user random ratio), "temporal" (per-user chronological ratio), "loo"
        (leave-one-out by time) or "cutoff" (global time cut).
    kcore: minimum interactions per user and item, iterated to a fixed point; an int for both or
        (k_user, k_item); 0 or 1 = no filter.
    kcore_counts: what k counts where a (user, item) pair repeats (dedup="all"): "partners" (default: distinct
        items of a user, distinct users of an item, what MMRec and RecBole see after de-duplication) or "rows"
        (every row, so five purchases of one item make a 5-core user). With dedup "first"/"last" both agree.
    ratios: (train, valid, test), summing to 1; used by "random" and "temporal" (see `holdout_counts`).
    seed: seed of numpy's PCG64 Generator (`np.random.default_rng(seed)`), used by "random" only.
    cutoff: (valid_start, test_start) as timezone-aware datetimes, for "cutoff"; a date (or an ISO date string)
        means midnight UTC.
    cutoff_quantiles: (q_valid, q_test) quantiles of all timestamps, for "cutoff" when `cutoff` is unset.
    dedup: "first" | "last" | "all": which row to keep for a repeated (user, item) pair, by timestamp.
        "first" is the default because a repeated pair split across train and test is a leak, and MMRec's
        evaluation masks train items anyway.
    min_ratio_inters: users with fewer interactions get 1 validation + 1 test row instead of the ratio
        (MMRec uses 10).
    """

    scheme: Scheme = "random"
    kcore: int | tuple[int, int] = 0
    kcore_counts: KcoreCounts = "partners"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    cutoff: tuple[datetime, datetime] | None = None
    cutoff_quantiles: tuple[float, float] | None = None
    dedup: DedupPolicy = "first"
    min_ratio_inters: int = 10

    @field_validator("cutoff", mode="before")
    @classmethod
    def _dates_are_utc_midnight(cls, value):
        if value is None:
            return None
        return tuple(_utc_midnight(v) for v in value)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}; expected one of {SCHEMES}")
        if self.dedup not in DEDUP_POLICIES:
            raise ValueError(f"dedup={self.dedup!r}; expected one of {DEDUP_POLICIES}")
        if self.kcore_counts not in KCORE_COUNTS:
            raise ValueError(f"kcore_counts={self.kcore_counts!r}; expected one of {KCORE_COUNTS}")
        k = (self.kcore, self.kcore) if isinstance(self.kcore, int) else tuple(self.kcore)
        if len(k) != 2 or any((not isinstance(v, int)) or v < 0 for v in k):
            raise ValueError(f"kcore={self.kcore!r}; expected an int >= 0 or a pair (k_user, k_item)")
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise ValueError(f"ratios={self.ratios!r}; expected three non-negative numbers summing to 1")
        if self.scheme == "cutoff":
            if (self.cutoff is None) == (self.cutoff_quantiles is None):
                raise ValueError(
                    "scheme='cutoff' needs exactly one of cutoff=(valid_start, test_start) "
                    "or cutoff_quantiles=(q_valid, q_test)"
                )
            if self.cutoff is not None:
                a, b = self.cutoff
                if a.tzinfo is None or b.tzinfo is None:
                    raise ValueError(f"cutoff={self.cutoff!r}; give timezone-aware datetimes (UTC)")
                if a > b:
                    raise ValueError(f"cutoff valid_start {a} is after test_start {b}")
            else:
                qa, qb = self.cutoff_quantiles
                if not 0 <= qa <= qb <= 1:
                    raise ValueError(
                        f"cutoff_quantiles={self.cutoff_quantiles!r}; expected 0 <= q_valid <= q_test <= 1"
                    )
        if self.min_ratio_inters < 0:
            raise ValueError(f"min_ratio_inters={self.min_ratio_inters}; expected >= 0")


def _utc_midnight(value):
    """A date (or a date-only ISO string, as YAML configs write them) as midnight UTC; anything else unchanged."""
    if isinstance(value, str) and len(value) == 10:
        value = date.fromisoformat(value)
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value


def holdout_counts(
    n: np.ndarray, ratios: tuple[float, float, float], min_ratio_inters: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (n_valid, n_test) for the ratio schemes, MMRec's `1splitting.ipynb` rule generalised.

    Users with n >= min_ratio_inters: held = int(n * (r_valid + r_test)); n_valid = int(held * r_valid /
    (r_valid + r_test)); n_test = held - n_valid. With the default (0.8, 0.1, 0.1) that is exactly MMRec's
    `val_test_len = int(n * 0.2); val_len = val_test_len // 2; test_len = val_test_len - val_len`, so the
    odd row goes to test. Users with fewer get 1 validation + 1 test row (MMRec's `[0]*(n-2) + [1] + [2]`)
    when n >= 3; where MMRec would leave no train row we keep one: n == 2 gives 1 train + 1 test, n == 1
    stays in train. A zero ratio gives zero rows of that label for everyone.
    """
    n = np.asarray(n, dtype=np.int64)
    r_valid, r_test = float(ratios[1]), float(ratios[2])
    held_ratio = r_valid + r_test
    if held_ratio <= 0:
        zero = np.zeros_like(n)
        return zero, zero.copy()
    # 1e-9 absorbs float error (e.g. 0.7 + 0.1) so the counts equal exact arithmetic.
    held = np.floor(n * held_ratio + 1e-9).astype(np.int64)
    n_valid = np.floor(held * (r_valid / held_ratio) + 1e-9).astype(np.int64)
    n_test = held - n_valid
    small = n < min_ratio_inters
    n_valid[small] = ((n[small] >= 3) & (r_valid > 0)).astype(np.int64)
    n_test[small] = ((n[small] >= 2) & (r_test > 0)).astype(np.int64)
    return n_valid, n_test


def _canonical_order(keep: np.ndarray, key: np.ndarray, order: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Order of the kept rows (as positions among them) by (user, item), then time: independent of how the
    caller ordered the rows. Re-uses the pair sort made for de-duplication."""
    kept_order = order[keep[order]]
    sorted_key = key[kept_order]
    if len(sorted_key) > 1 and np.any(sorted_key[1:] == sorted_key[:-1]):
        return np.lexsort((ts[keep], key[keep]))  # repeated pairs kept: order them by time, then as given
    return (np.cumsum(keep) - 1)[kept_order]


def _labels_by_position(user_sorted: np.ndarray, n_valid: np.ndarray, n_test: np.ndarray) -> np.ndarray:
    """Labels for rows already sorted by user (each user's rows in hold-out order): last n_test -> test,
    the n_valid before them -> validation, the rest train."""
    counts = np.bincount(user_sorted, minlength=len(n_valid))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    from_end = starts[user_sorted] + counts[user_sorted] - np.arange(len(user_sorted))  # 1 = last row
    labels = np.zeros(len(user_sorted), dtype=np.int8)
    labels[from_end <= n_test[user_sorted] + n_valid[user_sorted]] = VALID
    labels[from_end <= n_test[user_sorted]] = TEST
    return labels


def _chronological(user: np.ndarray, ts: np.ndarray, canonical: np.ndarray) -> np.ndarray:
    """Row order by (user, time), ties by item id (stable over the canonical order)."""
    t = ts[canonical]
    span = int(t.max() - t.min()) if len(t) else 0
    if span < 2**32:
        t_key = t - t.min()
    else:
        t_key = np.unique(t, return_inverse=True)[1].astype(np.int64)
    key = (user[canonical].astype(np.int64) << 32) | t_key
    return canonical[np.argsort(key, kind="stable")]


def _cutoff_labels(ts: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    if cfg.cutoff is not None:
        t_valid, t_test = (int(d.timestamp()) for d in cfg.cutoff)
    else:
        # method="higher": with q=0.8 and no ties, exactly 80% of rows fall before the valid cut.
        t_valid, t_test = (int(np.quantile(ts, q, method="higher")) for q in cfg.cutoff_quantiles)
    labels = np.zeros(len(ts), dtype=np.int8)
    labels[ts >= t_valid] = VALID
    labels[ts >= t_test] = TEST
    return labels


def split_codes(
    user: np.ndarray, item: np.ndarray, ts: np.ndarray, cfg: SplitConfig, present: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(keep, labels) of `make_split` from integer columns alone: keep is a row mask of the input (dedup, then
    k-core), labels the int8 label of each kept row in input order. `user`/`item` are codes whose order is the
    sorted order of the string ids (`stores.ids.sorted_codes`), `ts` epoch seconds. `present`, when given, is
    filled with the "users" and "items" code masks of the kept rows."""
    return split_owned_codes([user, item, ts], cfg, present)


PART_ROWS = 1 << 22
"""Rows per user-range partition in `split_owned_codes`: the sorts and per-row temporaries (~80 bytes a row)
are made for one partition at a time, so the whole split holds ~19 bytes a row plus one partition's."""


def _user_parts(user: np.ndarray, n_users: int) -> list[tuple[int, int]]:
    """Contiguous user-code ranges [lo, hi) of about PART_ROWS rows each (a heavier user gets a range alone)."""
    ends = np.cumsum(np.bincount(user, minlength=n_users))
    parts, lo, base = [], 0, 0
    while lo < n_users:
        hi = max(lo + 1, int(np.searchsorted(ends, base + PART_ROWS, side="right")))
        hi = min(hi, n_users)
        parts.append((lo, hi))
        base, lo = int(ends[hi - 1]), hi
    return parts


def _part_rows(user: np.ndarray, lo: int, hi: int, whole: bool) -> np.ndarray | slice:
    """The rows of users [lo, hi), ascending (row order kept); all rows as a slice when there is one part."""
    if whole:
        return slice(None)
    return np.flatnonzero((user >= lo) & (user < hi))


def _kept_rows(user: np.ndarray, keep: np.ndarray, lo: int, hi: int, whole: bool) -> np.ndarray:
    """The kept rows of users [lo, hi), ascending."""
    if whole:
        return np.flatnonzero(keep)
    rows = _part_rows(user, lo, hi, whole)
    return rows[keep[rows]]


def split_owned_codes(
    columns: list[np.ndarray], cfg: SplitConfig, present: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`split_codes` of [user, item, ts] in a list it empties.

    Every decision but the k-core is per user (a pair has one user; hold-outs are per user; the canonical order
    is by user first), so dedup and labels run on contiguous user-code ranges of PART_ROWS rows one at a time, in
    user order (so the random scheme's draws come in the same sequence as one draw over all rows). The k-core
    works on a row mask with masked bincounts (`kcore.kcore_alive`). Memory: the three columns (16 bytes a row),
    three masks and the labels (~4 bytes a row), and one partition's sorts; nothing the size of all rows is
    sorted or copied. The result does not depend on PART_ROWS (tests/test_splits_partitioned.py)."""
    user, item, ts = columns
    columns.clear()
    n = len(user)
    n_users = int(user.max()) + 1 if n else 0
    parts = _user_parts(user, n_users)
    whole = len(parts) <= 1
    keep = np.ones(n, dtype=bool)
    if cfg.dedup != "all":
        for lo, hi in parts:
            rows = _part_rows(user, lo, hi, whole)
            keep[rows] = dedup_mask(user[rows], item[rows], ts[rows], cfg.dedup)
    k_user, k_item = (cfg.kcore, cfg.kcore) if isinstance(cfg.kcore, int) else cfg.kcore
    if (k_user > 1 or k_item > 1) and n:
        first = np.ones(n, dtype=bool)
        if cfg.kcore_counts == "partners" and cfg.dedup == "all":
            # A pair's rows live or die together, so the first row of each pair is fixed once.
            for lo, hi in parts:
                rows = _kept_rows(user, keep, lo, hi, whole)
                key, order = pair_order(user[rows], item[rows])
                sorted_key = key[order]
                first[rows[order[1:][sorted_key[1:] == sorted_key[:-1]]]] = False
                del key, order, sorted_key, rows
        kcore_alive(user, item, keep, first, k_user, k_item)
        del first
    if not keep.any():
        raise ValueError(f"nothing left after dedup={cfg.dedup!r} and kcore={cfg.kcore!r}; lower kcore")
    if present is not None:
        for name, codes in (("users", user), ("items", item)):
            seen = masked_bincount(codes, keep, int(codes.max()) + 1) > 0
            present[name] = seen[: int(np.flatnonzero(seen)[-1]) + 1]
    if cfg.scheme == "cutoff":
        return keep, _cutoff_labels(ts[keep], cfg)

    rng = np.random.default_rng(cfg.seed) if cfg.scheme == "random" else None
    every = np.zeros(n, dtype=np.int8)
    for lo, hi in parts:
        rows = _kept_rows(user, keep, lo, hi, whole)
        if not len(rows):
            continue
        every[rows] = _part_labels(user[rows] - lo, item[rows], ts[rows], hi - lo, cfg, rng)
        del rows
    labels = every[keep]
    return keep, labels


def _part_labels(
    user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_users: int, cfg: SplitConfig, rng
) -> np.ndarray:
    """Labels (input order) of the kept rows of one user range, `user` its codes from 0: the ratio/loo schemes."""
    key, order = pair_order(user, item)
    canonical = _canonical_order(np.ones(len(user), dtype=bool), key, order, ts)
    del key, order, item
    if cfg.scheme == "random":
        draw = rng.integers(0, 2**32, size=len(canonical), dtype=np.int64)
        order = canonical[np.argsort((user[canonical].astype(np.int64) << 32) | draw)]
        del draw
    else:
        order = _chronological(user, ts, canonical)
    del canonical
    counts = np.bincount(user, minlength=n_users)
    if cfg.scheme == "loo":
        n_valid, n_test = (counts >= 3).astype(np.int64), (counts >= 2).astype(np.int64)
    else:
        n_valid, n_test = holdout_counts(counts, cfg.ratios, cfg.min_ratio_inters)
    labels = np.zeros(len(user), dtype=np.int8)
    labels[order] = _labels_by_position(user[order], n_valid, n_test)
    return labels


def make_split(interactions: pa.Table, cfg: SplitConfig) -> pa.Table:
    """De-duplicate, k-core, then label every row 0 train / 1 validation / 2 test. Deterministic.

    Schemes:
    - random: per user, rows are shuffled with `np.random.default_rng(cfg.seed)` (PCG64) and the last
      `holdout_counts` rows of the shuffle are held out (MMRec: shuffle, sort by user, label the tail).
      The draw is made in a canonical (user, item, time) order, so the result does not depend on the
      row order of the input table, only on its content and the seed.
    - temporal: per user, rows in time order (ties by item id); the latest `holdout_counts` are held out.
    - loo: per user, the latest row is test and the one before it validation (users with 2 rows: test
      only; 1 row: train only).
    - cutoff: global: time < valid_start train, valid_start <= time < test_start validation, else test.
      Users or items first seen after the cut stay in (MMRec drops cold-start users when it loads).
    """
    check_interactions(interactions)
    if "label" in interactions.column_names:
        raise ValueError("interactions already have a 'label' column; pass the unsplit interactions")
    user, _ = sorted_codes(interactions["user_id"], with_uniques=False)
    item, _ = sorted_codes(interactions["item_id"], with_uniques=False)
    keep, labels = split_codes(user, item, seconds(interactions["timestamp"]), cfg)
    table = interactions if keep.all() else interactions.filter(pa.array(keep))
    return table.append_column("label", pa.array(labels, type=pa.int8()))


def split_counts(split: pa.Table) -> dict[str, int]:
    """Row, user and item counts of a split, per label: what a manifest records."""
    label = split["label"]
    users, items = id_maps(split)
    out = {"rows": split.num_rows, "users": len(users), "items": len(items)}
    for name, value in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        out[name] = int(pc.sum(pc.equal(label, value)).as_py() or 0)
    return out
