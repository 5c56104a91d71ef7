"""k-core, de-duplication and split recipes on tiny in-code tables, plus the ML-100K 5-core fixed point."""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from recipes.kcore import dedup, kcore
from recipes.splits import SplitConfig, holdout_counts, make_split, split_counts
from stores.ids import id_maps, index_ids


def inter(rows: list[tuple]) -> pa.Table:
    """Interactions from (user, item, ts[, value]) tuples."""
    return pa.table(
        {
            "user_id": pa.array([str(r[0]) for r in rows], pa.string()),
            "item_id": pa.array([str(r[1]) for r in rows], pa.string()),
            "timestamp": pa.array([r[2] for r in rows], pa.timestamp("s", tz="UTC")),
            "event": pa.array(["click"] * len(rows), pa.string()),
            "value": pa.array([r[3] if len(r) > 3 else None for r in rows], pa.float64()),
        }
    )


def random_inter(n_users: int, n_items: int, n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, n_users, n)
    i = rng.integers(0, n_items, n)
    t = rng.integers(1_600_000_000, 1_600_100_000, n)
    return inter([(f"u{a:03d}", f"{b:06d}", int(c)) for a, b, c in zip(u, i, t, strict=True)])


def reference_kcore(rows: list[tuple[str, str]], k_u: int, k_i: int) -> list[tuple[str, str]]:
    """Straight transcription of MMRec's `filter_by_k_core` loop over Python rows."""
    rows = list(rows)
    while True:
        cu = Counter(r[0] for r in rows)
        ci = Counter(r[1] for r in rows)
        ban_u = {u for u, c in cu.items() if c < k_u}
        ban_i = {i for i, c in ci.items() if c < k_i}
        if not ban_u and not ban_i:
            return rows
        rows = [r for r in rows if r[0] not in ban_u and r[1] not in ban_i]


def pairs(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True))


def test_kcore_matches_reference_loop_and_keeps_order():
    """k-core equals MMRec's iterate-until-stable rule (counts from the same frame each round) on random
    data, for symmetric and asymmetric thresholds, and never reorders the surviving rows."""
    table = random_inter(30, 25, 400, seed=1)
    for k in (2, 3, (4, 2), (2, 5)):
        k_u, k_i = (k, k) if isinstance(k, int) else k
        got = pairs(kcore(table, k))
        assert got == reference_kcore(pairs(table), k_u, k_i)
        users, items = id_maps(kcore(table, k))
        assert all(Counter(u for u, _ in got)[x] >= k_u for x in users)
        assert all(Counter(i for _, i in got)[x] >= k_i for x in items)


def test_kcore_cascade_reaches_fixed_point():
    """Removing a user can push an item under k, which must remove more users: one pass is not enough."""
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 3), ("b", "y", 4), ("c", "x", 5), ("c", "z", 6)]
    # 2-core: z has one user -> c drops to 1 row -> c removed -> x keeps a, b -> stable.
    assert pairs(kcore(inter(rows), 2)) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert kcore(inter(rows), 3).num_rows == 0


def test_dedup_policies_by_timestamp():
    """keep='first' keeps the earliest row of a repeated pair, 'last' the latest, 'all' every row; ties
    fall back to row order."""
    rows = [
        ("u", "i", 30, 1.0),
        ("u", "i", 10, 2.0),
        ("u", "j", 5, 3.0),
        ("u", "i", 20, 4.0),
        ("v", "i", 7, 5.0),
    ]
    t = inter(rows)
    assert dedup(t, "first")["value"].to_pylist() == [2.0, 3.0, 5.0]
    assert dedup(t, "last")["value"].to_pylist() == [1.0, 3.0, 5.0]
    assert dedup(t, "all").num_rows == 5
    tie = inter([("u", "i", 10, 1.0), ("u", "i", 10, 2.0)])
    assert dedup(tie, "first")["value"].to_pylist() == [1.0]
    assert dedup(tie, "last")["value"].to_pylist() == [2.0]


def test_id_maps_sorted_strings_keep_leading_zeros():
    """Contiguous ids are positions in the sorted string ids; "0108775015" stays a string with its zero."""
    t = inter([("u2", "0108775015", 1), ("u1", "0108775015", 2), ("u1", "108775015", 3)])
    users, items = id_maps(t)
    assert users.tolist() == ["u1", "u2"]
    assert items.tolist() == ["0108775015", "108775015"]
    u, i = index_ids(t, users, items)
    assert u.tolist() == [1, 0, 0] and i.tolist() == [0, 0, 1]
    with pytest.raises(KeyError, match="not in the id map"):
        index_ids(t, users[:1], items)


def test_holdout_counts_follow_mmrec_rule():
    """Per-user counts: n < 10 -> 1 valid + 1 test; else held = int(0.2 n), valid = held // 2, rest test."""
    n = np.array([1, 2, 3, 5, 9, 10, 14, 15, 19, 20, 37, 100])
    v, t = holdout_counts(n, (0.8, 0.1, 0.1))
    for n_, v_, t_ in zip(n, v, t, strict=True):
        if n_ < 10:
            expect = (int(n_ >= 3), int(n_ >= 2))
        else:
            held = int(n_ * 0.2)
            expect = (held // 2, held - held // 2)
        assert (v_, t_) == expect, n_
    v, t = holdout_counts(np.array([50]), (0.7, 0.1, 0.2))
    assert (v[0], t[0]) == (5, 10)


def test_random_split_counts_deterministic_and_order_free():
    """Random split: per-user label counts follow the MMRec rule, the same seed gives the same labels even
    when the input rows are shuffled, and another seed gives different labels."""
    table = random_inter(12, 60, 500, seed=2)
    cfg = SplitConfig(scheme="random", seed=5, dedup="first")
    split = make_split(table, cfg)
    key = [f"{u}|{i}" for u, i in pairs(split)]
    labels = dict(zip(key, split["label"].to_pylist(), strict=True))
    per_user = Counter(u for u, _ in pairs(split))
    v, t = holdout_counts(np.array(list(per_user.values())), cfg.ratios)
    expected = {u: (vv, tt) for u, vv, tt in zip(per_user, v, t, strict=True)}
    for u in per_user:
        got = Counter(lbl for k, lbl in labels.items() if k.split("|")[0] == u)
        assert (got[1], got[2]) == expected[u]

    perm = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = make_split(table.take(pa.array(perm)), cfg)
    again = dict(zip([f"{u}|{i}" for u, i in pairs(shuffled)], shuffled["label"].to_pylist(), strict=True))
    assert again == labels
    other = make_split(table, SplitConfig(scheme="random", seed=6))
    assert other["label"].to_pylist() != split["label"].to_pylist()


def test_temporal_and_loo_hold_out_the_latest():
    """Temporal: every held-out row is later than (or as late as) every train row of its user; LOO: the
    latest row is test and the second latest validation."""
    rows = [("a", f"i{k}", 100 + k) for k in range(12)] + [("b", f"i{k}", 200 - k) for k in range(4)]
    t = inter(rows)
    split = make_split(t, SplitConfig(scheme="temporal"))
    lab = {(u, i): lbl for (u, i), lbl in zip(pairs(split), split["label"].to_pylist(), strict=True)}
    # a: 12 rows -> held = int(2.4) = 2 -> i10 valid, i11 test; b: 4 rows -> 1 valid + 1 test
    assert [lab[("a", f"i{k}")] for k in range(12)] == [0] * 10 + [1, 2]
    assert [lab[("b", f"i{k}")] for k in range(4)] == [2, 1, 0, 0]
    loo = make_split(t, SplitConfig(scheme="loo"))
    lab = {(u, i): lbl for (u, i), lbl in zip(pairs(loo), loo["label"].to_pylist(), strict=True)}
    assert [lab[("a", f"i{k}")] for k in range(12)] == [0] * 10 + [1, 2]
    assert [lab[("b", f"i{k}")] for k in range(4)] == [2, 1, 0, 0]


def test_cutoff_split_by_dates_and_quantiles():
    """Global cutoff: rows before valid_start train, between the cuts validation, from test_start test;
    quantiles (0.8, 0.9) on 10 distinct times give 8 / 1 / 1 rows."""
    rows = [(f"u{k % 3}", f"i{k}", 1_000 + k) for k in range(10)]
    cfg = SplitConfig(
        scheme="cutoff",
        cutoff=(datetime.fromtimestamp(1_005, UTC), datetime.fromtimestamp(1_008, UTC)),
    )
    assert make_split(inter(rows), cfg)["label"].to_pylist() == [0] * 5 + [1] * 3 + [2] * 2
    q = make_split(inter(rows), SplitConfig(scheme="cutoff", cutoff_quantiles=(0.8, 0.9)))
    assert q["label"].to_pylist() == [0] * 8 + [1, 2]


def test_split_applies_dedup_and_kcore_and_keeps_columns():
    """make_split de-duplicates and k-cores before labelling, keeps extra columns and the input order, and
    adds an int8 label."""
    rows = [
        ("a", "x", 1, 1.0),
        ("a", "x", 2, 2.0),
        ("a", "y", 3, 3.0),
        ("b", "x", 4, 4.0),
        ("b", "y", 5, 5.0),
    ]
    rows += [("c", "z", 6, 6.0)]
    split = make_split(inter(rows), SplitConfig(scheme="loo", kcore=2, dedup="last"))
    assert split["value"].to_pylist() == [2.0, 3.0, 4.0, 5.0]
    assert split.schema.field("label").type == pa.int8()
    assert split.column_names[-1] == "label" and "event" in split.column_names
    assert split_counts(split)["rows"] == 4


def test_split_config_is_strict():
    """Unknown keys and bad values fail with a message naming the key and the valid choices."""
    with pytest.raises(ValueError, match=r"unknown SplitConfig key\(s\) \['ratio'\]"):
        SplitConfig(**{"scheme": "random", "ratio": [0.8, 0.1, 0.1]})
    with pytest.raises(ValueError, match="scheme="):
        SplitConfig(scheme="chrono")
    with pytest.raises(ValueError, match="ratios="):
        SplitConfig(ratios=(0.8, 0.1, 0.2))
    cfg = SplitConfig(**{"scheme": "temporal", "kcore": [5, 3], "ratios": [0.7, 0.1, 0.2]})
    assert cfg.kcore == (5, 3) and cfg.ratios == (0.7, 0.1, 0.2)
    with pytest.raises(ValueError, match="exactly one"):
        SplitConfig(scheme="cutoff")


def test_kcore_counts_partners_not_repeat_rows():
    """With repeated pairs kept, k counts distinct partners by default: five purchases of one item do not make a
    5-core user (nor the item a 5-core item); `counts="rows"` counts each row, and both equal the reference loop
    run on the de-duplicated pairs (partners) or on every row (rows)."""
    rows = [("r", "x", t) for t in range(5)]  # one user, one item, five purchases
    rows += [(f"u{j}", f"i{n}", 10 + n) for j in range(5) for n in range(5)]  # a real 5x5 core
    table = inter(rows)
    partners = kcore(table, 5)
    assert "r" not in partners["user_id"].to_pylist() and partners.num_rows == 25
    by_rows = kcore(table, 5, counts="rows")
    assert by_rows.num_rows == 30 and by_rows["user_id"].to_pylist()[:5] == ["r"] * 5
    assert pairs(by_rows) == reference_kcore(pairs(table), 5, 5)
    # a user with 4 distinct items, one bought twice: 5 rows, 4 partners
    rows = [("u", "a", 1), ("u", "a", 2), ("u", "b", 3), ("u", "c", 4), ("u", "d", 5)]
    rows += [(f"v{j}", it, 6) for j in range(4) for it in "abcd"]
    got = kcore(inter(rows), (5, 1))
    assert got.num_rows == 0
    assert set(kcore(inter(rows), (5, 1), counts="rows")["user_id"].to_pylist()) == {"u"}
    ref = reference_kcore(sorted(set(pairs(inter(rows)))), 4, 5)
    assert sorted(set(pairs(kcore(inter(rows), (4, 5))))) == sorted(ref)


def test_split_kcore_counts_config_and_cli_default():
    """SplitConfig.kcore_counts defaults to "partners", rejects other values naming them, and decides the
    k-core of a dedup="all" split; `mmfeat split --kcore-counts` offers the same two choices, same default."""
    from click.testing import CliRunner

    from flows.recipes_cli import split as split_cmd

    assert SplitConfig().kcore_counts == "partners"
    with pytest.raises(ValueError, match="kcore_counts"):
        SplitConfig(kcore_counts="distinct")
    rows = [("r", "x", t) for t in range(5)]
    rows += [(f"u{j}", f"i{n}", 10 + n) for j in range(5) for n in range(5)]
    kept = make_split(inter(rows), SplitConfig(scheme="loo", kcore=5, dedup="all"))
    assert "r" not in kept["user_id"].to_pylist()
    rows_cfg = SplitConfig(scheme="loo", kcore=5, dedup="all", kcore_counts="rows")
    assert make_split(inter(rows), rows_cfg)["user_id"].to_pylist()[:5] == ["r"] * 5
    help_text = CliRunner().invoke(split_cmd, ["--help"]).output
    assert "--kcore-counts [partners|rows]" in help_text and "default: partners" in help_text


def test_hm_fashion_split_does_what_its_comments_say():
    """The shipped hm_fashion split keeps repeat purchases as rows (dedup: all) while its 5-core counts distinct
    articles per customer: a customer with five purchases of one article is not in the split, a repeat purchase
    of a 5-core customer stays two rows, and the last two weeks are validation and test."""
    from recipes.config import load_config

    cfg = load_config("hm_fashion").splits[0].to_split_config()
    assert (cfg.dedup, cfg.kcore_counts, cfg.kcore) == ("all", "partners", (5, 5))
    day = 1_598_918_400  # 2020-09-01
    rows = [("0000sock", "0108775015", day + t) for t in range(5)]
    rows += [(f"c{j}", f"010877{n:04d}", day + 86400 * (3 * n + j % 2)) for j in range(5) for n in range(6)]
    rows += [(f"c{j}", "0108775015", day + 1) for j in range(5)]  # the sock article has 6 customers
    rows += [("c0", "0108770000", day)]  # c0 buys its first article twice on the same day
    split = make_split(inter(rows), cfg)
    users = split["user_id"].to_pylist()
    assert "0000sock" not in users and users.count("c0") == 8
    assert set(split["label"].to_pylist()) == {0, 1, 2}
    by_rows = make_split(inter(rows), dataclasses.replace(cfg, kcore_counts="rows"))
    assert by_rows["user_id"].to_pylist().count("0000sock") == 5


@pytest.mark.realdata
def test_ml100k_5core_fixed_point(ml100k):
    """ML-100K's 5-core is 99,287 interactions, 943 users and 1,349 items (MMRec's rule), and a random split
    of it labels every user with at least one train row."""
    raw = pcsv.read_csv(
        ml100k / "ml-100k" / "u.data",
        read_options=pcsv.ReadOptions(column_names=["user_id", "item_id", "rating", "ts"]),
        parse_options=pcsv.ParseOptions(delimiter="\t"),
        convert_options=pcsv.ConvertOptions(
            column_types={
                "user_id": pa.string(),
                "item_id": pa.string(),
                "rating": pa.float64(),
                "ts": pa.int64(),
            }
        ),
    )
    table = pa.table(
        {
            "user_id": raw["user_id"],
            "item_id": raw["item_id"],
            "timestamp": raw["ts"].cast(pa.timestamp("s", tz="UTC")),
            "event": pa.array(["rating"] * raw.num_rows),
            "value": raw["rating"],
        }
    )
    core = kcore(table, 5)
    users, items = id_maps(core)
    assert (core.num_rows, len(users), len(items)) == (99_287, 943, 1_349)
    split = make_split(table, SplitConfig(scheme="random", kcore=5, seed=1))
    counts = split_counts(split)
    assert (counts["rows"], counts["users"], counts["items"]) == (99_287, 943, 1_349)
    assert counts["train"] + counts["valid"] + counts["test"] == 99_287
    train_users = set(split.filter(pa.compute.equal(split["label"], 0))["user_id"].to_pylist())
    assert len(train_users) == 943
