"""Unlearning scenarios: forget/retain cuts of a split and the benchmark forget sets that choose them.

`forget_retain` cuts a split into forget = the matching rows (train only, or all parts), retain = train minus
forget, and gold = retain + the evaluation parts (the retrain-from-scratch dataset). `select` draws a scenario's
forget rows following its published rules (each rule is quoted in recipes/unlearning/split.py: CURE4Rec, L2UnRank, ERASE-style).

    >>> sel = select(split, ScenarioConfig("cure4rec", percent=5, mode="most_active"))
    >>> cut = forget_retain(split, sel.mask, "all")
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipes.splits import TEST, TRAIN, VALID
from stores.erasure.requests import attribute_items, id_mask
from stores.ids import id_maps, seconds, sorted_codes
from stores.strict import strict_config

Parts = Literal["train", "all"]


# ---- forget / retain ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnlearningSplit:
    """forget: the forgotten split rows (original labels); retain: train rows not forgotten; gold: retain as
    train plus the validation/test rows (minus forgotten ones when parts="all"), for retrain-from-scratch."""

    forget: pa.Table
    retain: pa.Table
    gold: pa.Table

    def counts(self) -> dict[str, int]:
        label = self.gold["label"]
        return {
            "forget": self.forget.num_rows,
            "forget_users": len(pc.unique(self.forget["user_id"])),
            "forget_items": len(pc.unique(self.forget["item_id"])),
            "retain": self.retain.num_rows,
            "gold_valid": int(pc.sum(pc.equal(label, VALID)).as_py() or 0),
            "gold_test": int(pc.sum(pc.equal(label, TEST)).as_py() or 0),
        }


def forget_retain(split: pa.Table, mask: np.ndarray, parts: Parts = "train") -> UnlearningSplit:
    """Cut a split by a row mask: forget = masked train rows (all masked rows with parts="all")."""
    if parts not in ("train", "all"):
        raise ValueError(f"parts={parts!r}; expected 'train' or 'all'")
    if len(mask) != split.num_rows:
        raise ValueError(f"mask has {len(mask)} entries for {split.num_rows} split rows")
    train = pc.equal(split["label"], TRAIN).to_numpy(zero_copy_only=False)
    forget = mask & train if parts == "train" else mask
    retain = train & ~forget
    return UnlearningSplit(
        forget=split.filter(pa.array(forget)),
        retain=split.filter(pa.array(retain)),
        gold=split.filter(pa.array(~forget)),
    )


# ---- scenarios ---------------------------------------------------------------------------------------------

SCENARIOS: tuple[str, ...] = ("cure4rec", "l2unrank_interaction", "l2unrank_item", "erase_sensitive")
CURE_MODES: tuple[str, ...] = ("random", "most_active", "least_active")


@strict_config
class ScenarioConfig:
    """A benchmark forget set. scenario: cure4rec | l2unrank_interaction | l2unrank_item | erase_sensitive.
    percent: share of users (items for l2unrank_item; eligible users for erase_sensitive), in percent.
    mode: cure4rec's random | most_active | least_active. interaction_ratio: l2unrank_interaction's share of each
    chosen user's train rows. category / attribute: erase_sensitive's sensitive value of `items.attributes`
    key (or "rights"). batch_users: users per sequential request (erase_sensitive). parts: "train" or "all";
    default "all" for cure4rec (it drops the users from the test set too), "train" otherwise."""

    scenario: str = "cure4rec"
    percent: float = 5.0
    seed: int = 42
    mode: str = "random"
    interaction_ratio: float = 0.2
    category: str | None = None
    attribute: str = "genres"
    batch_users: int = 1
    parts: Parts | None = None

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario={self.scenario!r}; expected one of {SCENARIOS}")
        if self.mode not in CURE_MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {CURE_MODES}")
        if not 0 < self.percent <= 100:
            raise ValueError(f"percent={self.percent}; expected 0 < percent <= 100")
        if not 0 < self.interaction_ratio <= 1:
            raise ValueError(f"interaction_ratio={self.interaction_ratio}; expected 0 < ratio <= 1")
        if self.scenario == "erase_sensitive" and not self.category:
            raise ValueError(
                "scenario erase_sensitive needs category (e.g. category='Horror', attribute='genres')"
            )
        if self.batch_users < 1:
            raise ValueError(f"batch_users={self.batch_users}; expected >= 1")
        if self.parts not in (None, "train", "all"):
            raise ValueError(f"parts={self.parts!r}; expected 'train' or 'all'")

    @property
    def effective_parts(self) -> Parts:
        return self.parts or ("all" if self.scenario == "cure4rec" else "train")


@dataclass(frozen=True)
class Selection:
    """A scenario's outcome: the split-row mask, the chosen users and items (in draw order) and, for
    sequential scenarios, the request batches of users."""

    mask: np.ndarray
    users: list[str]
    items: list[str]
    batches: list[list[str]]

    def digest(self) -> str:
        """sha256 of the chosen ids: manifests record it instead of the ids themselves."""
        return hashlib.sha256(json.dumps([self.users, self.items], sort_keys=True).encode()).hexdigest()


def train_degrees(split: pa.Table, ascending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, train-row counts) in the order of CURE4Rec's `ratings['uid'].value_counts(ascending=...)`.

    That order is defined by the train rows as the split holds them: degree high to low (low to high with
    `ascending=True`), and users of equal degree in the order of their first train row. pandas >= 3.0 sorts
    `value_counts` stably over its hash table's first-appearance order (pandas#63158; before 3.0 the tie order
    was numpy quicksort's, unspecified), so CURE4Rec's `delete()` on a DataFrame of these rows picks the same
    users. Note that the ascending order is not the descending one reversed: ties stay first-seen first.
    """
    train = split.filter(pc.equal(split["label"], TRAIN))
    ids = train["user_id"].to_numpy(zero_copy_only=False)
    users, first, deg = np.unique(ids, return_index=True, return_counts=True)
    seen = np.argsort(first, kind="stable")
    users, deg = users[seen], deg[seen]
    order = np.argsort(deg if ascending else -deg, kind="stable")
    return users[order], deg[order]


def cure4rec_users(split: pa.Table, mode: str, percent: float, seed: int) -> list[str]:
    """CURE4Rec's forgotten users (`read.py: delete`): `int(n_users * percent / 100)` of the train users, drawn
    with `RandomState(seed).choice(..., replace=False)` over the degree-descending order ("random"), or the
    first ones of the descending ("most_active", CURE4Rec's "core") or ascending ("least_active", "edge")
    `value_counts` order; `train_degrees` says what defines that order."""
    if mode not in CURE_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {CURE_MODES}")
    users, _ = train_degrees(split, ascending=mode == "least_active")
    n = int(len(users) * percent / 100)
    if mode == "random":
        return [str(u) for u in np.random.RandomState(seed).choice(users, n, replace=False)]
    return [str(u) for u in users[:n]]


def select(split: pa.Table, cfg: ScenarioConfig, items: pa.Table | None = None) -> Selection:
    """The forget rows of a scenario over `split` (see the module docstring for each rule)."""
    parts = cfg.effective_parts
    train = pc.equal(split["label"], TRAIN).to_numpy(zero_copy_only=False)
    scope_rows = train if parts == "train" else np.ones(split.num_rows, dtype=bool)
    rng = np.random.RandomState(cfg.seed)
    if cfg.scenario == "cure4rec":
        users = cure4rec_users(split, cfg.mode, cfg.percent, cfg.seed)
        return Selection(id_mask(split, "user_id", users) & scope_rows, users, [], [])
    if cfg.scenario == "l2unrank_item":
        _, all_items = id_maps(split.filter(pa.array(train)))
        chosen = [
            str(all_items[i])
            for i in rng.permutation(len(all_items))[: int(len(all_items) * cfg.percent / 100)]
        ]
        return Selection(id_mask(split, "item_id", chosen) & scope_rows, [], chosen, [])
    if cfg.scenario == "l2unrank_interaction":
        u_codes, u_ids = sorted_codes(split["user_id"])
        i_codes, _ = sorted_codes(split["item_id"])
        rows = np.flatnonzero(train)
        # each user's train rows in a canonical (item, time) order, users contiguous
        rows = rows[np.lexsort((seconds(split["timestamp"])[rows], i_codes[rows], u_codes[rows]))]
        by_user = u_codes[rows]
        present = np.unique(by_user)
        chosen = present[rng.permutation(len(present))[: int(len(present) * cfg.percent / 100)]]
        mask = np.zeros(split.num_rows, dtype=bool)
        for code in chosen:
            own = rows[np.searchsorted(by_user, code, "left") : np.searchsorted(by_user, code, "right")]
            take = max(1, int(len(own) * cfg.interaction_ratio))
            mask[own[rng.permutation(len(own))[:take]]] = True
        return Selection(mask, [str(u) for u in u_ids[chosen]], [], [])
    if items is None:
        raise ValueError("scenario erase_sensitive needs the items table (item_id, attributes, rights)")
    sensitive = attribute_items(items, cfg.attribute, cfg.category)
    hits = id_mask(split, "item_id", sensitive) & scope_rows
    eligible = np.unique(split["user_id"].filter(pa.array(hits)).to_numpy(zero_copy_only=False))
    if not len(eligible):
        raise ValueError(
            f"no user has a train interaction with an item whose {cfg.attribute} is {cfg.category!r}"
        )
    n = max(1, int(len(eligible) * cfg.percent / 100))
    chosen = [str(u) for u in rng.choice(eligible, n, replace=False)]
    batches = [chosen[i : i + cfg.batch_users] for i in range(0, n, cfg.batch_users)]
    return Selection(hits & id_mask(split, "user_id", chosen), chosen, sensitive, batches)
