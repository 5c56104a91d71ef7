"""Iterative k-core filtering, duplicate policies and the contiguous id maps every recipe shares.

Everything here works on integer codes with `np.bincount` and one sort at most, so 10M interactions take
seconds. The row order of the input survives every filter: a recipe never reorders the caller's table.

    >>> core = kcore(dedup(interactions, keep="first"), k=5)
    >>> users, items = id_maps(core)        # sorted string ids; index = contiguous id
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

from stores.ids import seconds, sorted_codes

DedupPolicy = Literal["first", "last", "all"]
DEDUP_POLICIES: tuple[str, ...] = ("first", "last", "all")
KcoreCounts = Literal["partners", "rows"]
KCORE_COUNTS: tuple[str, ...] = ("partners", "rows")
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")


def check_interactions(table: pa.Table, extra: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming the missing column or the null ids, so bad input fails before any work."""
    missing = [c for c in (*REQUIRED_COLUMNS, *extra) if c not in table.column_names]
    if missing:
        raise ValueError(
            f"interactions lack column(s) {missing}; expected at least {list(REQUIRED_COLUMNS + extra)}, "
            f"got {table.column_names}"
        )
    for name in ("user_id", "item_id"):
        nulls = table[name].null_count
        if nulls:
            raise ValueError(f"column {name!r} has {nulls} null id(s); drop or quarantine those rows first")


def pair_order(user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(key, order): key = user * n_items + item per row, order = an argsort of key (rows of a pair adjacent)."""
    n_items = int(item.max()) + 1 if len(item) else 1
    key = user.astype(np.int64) * n_items + item
    return key, np.argsort(key)


def dedup_mask(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    keep: DedupPolicy,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Boolean row mask keeping one row per (user, item): the earliest ("first") or latest ("last") by time.

    Equal timestamps fall back to row order (first row for "first", last row for "last"). "all" keeps every
    row. Only rows that actually repeat a pair are sorted by time, so the common case costs one integer
    sort; pass `pairs=pair_order(user, item)` to reuse one already made.
    """
    if keep not in DEDUP_POLICIES:
        raise ValueError(f"keep={keep!r}; expected one of {DEDUP_POLICIES}")
    n = len(user)
    mask = np.ones(n, dtype=bool)
    if keep == "all" or n == 0:
        return mask
    key, order = pairs if pairs is not None else pair_order(user, item)
    sorted_key = key[order]
    repeat = np.empty(n, dtype=bool)
    repeat[0] = False
    repeat[1:] = sorted_key[1:] == sorted_key[:-1]
    if not repeat.any():
        return mask
    # Rows in a repeated group: the repeat flags plus the first row of each such group.
    in_group = repeat.copy()
    in_group[:-1] |= repeat[1:]
    rows = order[in_group]
    sign = 1 if keep == "first" else -1
    # Sort the repeated rows by pair, then time, then row number (all negated for "last").
    rows = rows[np.lexsort((sign * rows, sign * ts[rows], key[rows]))]
    k = key[rows]
    winner = np.empty(len(rows), dtype=bool)
    winner[0] = True
    winner[1:] = k[1:] != k[:-1]
    mask[rows[~winner]] = False
    return mask


def kcore_mask(
    user: np.ndarray, item: np.ndarray, k_user: int, k_item: int, counts: KcoreCounts = "partners"
) -> np.ndarray:
    """Boolean row mask of the (k_user, k_item)-core, iterated to its fixed point.

    Each round counts users and items over the same surviving rows, drops every row whose user has fewer
    than k_user or whose item has fewer than k_item, and repeats until a round drops nothing: the MMRec
    preprocessing / RecBole `filter_by_inter_num` rule. `counts` says what a degree is where a (user, item)
    pair repeats: "partners" (default) counts distinct items of a user and distinct users of an item, which is
    what MMRec and RecBole see after their de-duplication, so a user with five purchases of one item is not in
    the 5-core; "rows" counts every row, a repeated pair once per row. Without repeated pairs both agree.
    """
    if k_user < 0 or k_item < 0:
        raise ValueError(f"k-core thresholds must be >= 0, got users={k_user} items={k_item}")
    if counts not in KCORE_COUNTS:
        raise ValueError(f"counts={counts!r}; expected one of {KCORE_COUNTS}")
    if (k_user <= 1 and k_item <= 1) or len(user) == 0:
        return np.ones(len(user), dtype=bool)
    alive = np.arange(len(user), dtype=np.int32 if len(user) < 2**31 else np.int64)
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    # A pair's rows live or die together (same user, same item), so "the first row of each pair" is fixed once:
    # counting only those rows counts distinct partners in every round.
    first = np.ones(len(user), dtype=bool)
    if counts == "partners":
        key, order = pair_order(user, item)
        sorted_key = key[order]
        first[order[1:][sorted_key[1:] == sorted_key[:-1]]] = False
        del key, order, sorted_key  # 24 bytes a row not held through the rounds
    u, i, f = user, item, first
    while len(alive):
        bad_u = np.bincount(u[f], minlength=n_users) < k_user
        bad_i = np.bincount(i[f], minlength=n_items) < k_item
        drop = bad_u[u] | bad_i[i]
        if not drop.any():
            break
        keep = ~drop
        alive, u, i, f = alive[keep], u[keep], i[keep], f[keep]
    mask = np.zeros(len(user), dtype=bool)
    mask[alive] = True
    return mask


def _pair(k: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(k, int):
        return k, k
    k_user, k_item = k
    return int(k_user), int(k_item)


def dedup(table: pa.Table, keep: DedupPolicy = "first") -> pa.Table:
    """Keep one row per (user_id, item_id): the earliest ("first"), the latest ("last"), or all of them."""
    check_interactions(table)
    if keep == "all":
        return table
    user, _ = sorted_codes(table["user_id"], with_uniques=False)
    item, _ = sorted_codes(table["item_id"], with_uniques=False)
    mask = dedup_mask(user, item, seconds(table["timestamp"]), keep)
    return table if mask.all() else table.filter(pa.array(mask))


def kcore(table: pa.Table, k: int | tuple[int, int] = 5, counts: KcoreCounts = "partners") -> pa.Table:
    """The iterative k-core of an interaction table (k for users and items, or (k_user, k_item)); `counts`
    as in `kcore_mask`: distinct partners by default, or rows.

    >>> kcore(ml100k, 5).num_rows   # ML-100K: 99,287 rows, 943 users, 1,349 items
    """
    check_interactions(table)
    k_user, k_item = _pair(k)
    user, _ = sorted_codes(table["user_id"], with_uniques=False)
    item, _ = sorted_codes(table["item_id"], with_uniques=False)
    mask = kcore_mask(user, item, k_user, k_item, counts)
    return table if mask.all() else table.filter(pa.array(mask))


CHUNK_ROWS = 1 << 22
"""Rows per slice in the masked passes of `kcore_alive`: the temporaries are a few bytes times this."""


def masked_bincount(codes: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
    """`np.bincount(codes[mask], minlength=length)` made slice by slice, so no copy of the masked codes is held."""
    total = np.zeros(length, dtype=np.int64)
    for at in range(0, len(codes), CHUNK_ROWS):
        total += np.bincount(codes[at : at + CHUNK_ROWS][mask[at : at + CHUNK_ROWS]], minlength=length)
    return total


def kcore_alive(
    user: np.ndarray, item: np.ndarray, alive: np.ndarray, first: np.ndarray, k_user: int, k_item: int
) -> None:
    """`kcore_mask`'s rounds on a row mask, in place: `alive` (the rows still in) loses every row dropped, `first`
    marks the rows a degree counts (all rows for counts="rows", the first row of each pair for "partners"). Each
    round is two masked bincounts and one pass over slices, so the columns are never copied or sorted whole."""
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    counted = alive & first
    while True:
        bad_u = masked_bincount(user, counted, n_users) < k_user
        bad_i = masked_bincount(item, counted, n_items) < k_item
        dropped = False
        for at in range(0, len(user), CHUNK_ROWS):
            part = slice(at, at + CHUNK_ROWS)
            drop = alive[part] & (bad_u[user[part]] | bad_i[item[part]])
            if drop.any():
                alive[part] &= ~drop
                counted[part] &= ~drop
                dropped = True
        if not dropped:
            return
