"""Unlearning: forget requests, what they match, forget/retain splits, benchmark scenarios and retained graphs.

A `ForgetRequest` names what to forget: users, items, user-item pairs, one modality of some items, interactions
before a time, or items by attribute. `resolve` turns it into a `ForgetScope` (attribute requests become item
lists) and `interaction_mask` says which interaction rows the scope covers. `stores/erasure.py` deletes the scope
from every table; `refresh_artifacts` re-derives the splits and graphs built from the erased rows.

Research side: `forget_retain` cuts a split into forget = the matching rows (train only, or all parts), retain =
train minus forget, and gold = retain + the evaluation parts (the retrain-from-scratch dataset). Scenario
generators follow their published rules:

- CURE4Rec (`read.py: delete`): `int(n_users * p / 100)` users of the train part, random
  (`RandomState(seed).choice(users, n, replace=False)` over users ordered by train degree, high to low), most
  active ("core": the highest train degrees) or least active ("edge": the lowest); all their interactions. Ties
  in degree are broken by user id, where pandas' `value_counts` leaves them in hash order.
- L2UnRank (`main.py: compute_edges_to_remove`): "interaction": `int(n_users * p / 100)` random users, each losing
  `max(1, int(n_u * 0.2))` random train interactions; "item": `int(n_items * p / 100)` random items with all their
  train interactions. numpy RandomState(seed) replaces the paper's torch.randperm.
- ERASE-style sensitive category: the users who interacted with items of a sensitive category (an attribute
  value), `max(1, int(n * p / 100))` of them drawn with RandomState(seed), forgetting their interactions with
  those items; the draw order makes sequential requests of `batch_users` users.

The retained kNN graph is patched (`knn_patch`): items whose top-k held a removed item are recomputed against the
retained items, every other item keeps its neighbours (re-weighted), which equals `knn_retained`, a rebuild on the
retained items. A user-item graph losing whole users or items is patched from its stored edges
(`patched_ui_edges`: their edges go, degrees and D^-1/2 A D^-1/2 weights are recomputed), row for row what
`pipeline.build_ui_graph` writes; other graphs are rebuilt with their parameters.

    >>> scope = resolve(ForgetRequest("r1", "user", users=("1",)), items)
    >>> cut = forget_retain(split, interaction_mask(split, scope), parts="all")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from recipes.kcore import id_maps, seconds, sorted_codes
from recipes.knn_graph import KnnConfig, fuse_graphs, knn_topk, l2_normalize, normalize_knn
from recipes.splits import TEST, TRAIN, VALID

Kind = Literal["user", "item", "interactions", "modality", "before", "attribute"]
KINDS: tuple[str, ...] = ("user", "item", "interactions", "modality", "before", "attribute")
MODALITIES: tuple[str, ...] = ("image",)
Parts = Literal["train", "all"]
_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")


def new_request_id() -> str:
    """A fresh request id: `fr-<UTC time>-<random>`."""
    return f"fr-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class ForgetRequest:
    """One forget request. Fields by kind: user -> users; item -> items; interactions -> pairs (user, item);
    modality -> modality ("image") and items; before -> before (aware datetime); attribute -> attribute
    ("rights": `;`-separated rights tags, or a key of `items.attributes`) and value."""

    request_id: str
    kind: Kind
    users: tuple[str, ...] = ()
    items: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    modality: str | None = None
    before: datetime | None = None
    attribute: str | None = None
    value: str | None = None
    reason: str = ""
    requester: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.request_id or ""):
            raise ValueError(
                f"request_id {self.request_id!r} is not allowed: use 1-128 letters, digits or . _ : @ -"
            )
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
        object.__setattr__(self, "users", tuple(str(u) for u in self.users))
        object.__setattr__(self, "items", tuple(str(i) for i in self.items))
        object.__setattr__(self, "pairs", tuple((str(u), str(i)) for u, i in self.pairs))
        needs = {
            "user": ("users",),
            "item": ("items",),
            "interactions": ("pairs",),
            "modality": ("modality", "items"),
            "before": ("before",),
            "attribute": ("attribute", "value"),
        }[self.kind]
        given = {
            f
            for f in ("users", "items", "pairs", "modality", "before", "attribute", "value")
            if getattr(self, f)
        }
        missing = [f for f in needs if f not in given]
        extra = sorted(given - set(needs))
        if missing or extra:
            raise ValueError(
                f"a {self.kind!r} forget request needs {list(needs)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; {extra} do not apply to it" if extra else "")
            )
        if any(not x for x in (*self.users, *self.items)) or any(not u or not i for u, i in self.pairs):
            raise ValueError("an empty id was given; every user or item id must be a non-empty string")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(
                f"modality={self.modality!r}; supported: {MODALITIES} (text-derived features stay)"
            )
        if self.before is not None and self.before.tzinfo is None:
            raise ValueError(f"before={self.before!r}; give a timezone-aware datetime (UTC)")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (UTC)")


@dataclass(frozen=True)
class ForgetScope:
    """What a request covers, resolved against the workspace: whole users, whole items, one modality of items,
    user-item pairs, interactions before a time."""

    users: frozenset[str] = frozenset()
    items: frozenset[str] = frozenset()
    image_items: frozenset[str] = frozenset()
    pairs: frozenset[tuple[str, str]] = frozenset()
    before: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (self.users or self.items or self.image_items or self.pairs or self.before)

    def counts(self) -> dict[str, Any]:
        return {
            "users": len(self.users),
            "items": len(self.items),
            "image_items": len(self.image_items),
            "pairs": len(self.pairs),
            "before": self.before.isoformat() if self.before else None,
        }


def attribute_items(items: pa.Table, attribute: str, value: str) -> list[str]:
    """Item ids whose `rights` tags (`;`-separated) include `value` (attribute "rights"), or whose
    `attributes` JSON has `attribute` equal to `value` or, for a list, containing it."""
    out = []
    if attribute == "rights":
        for item_id, rights in zip(items["item_id"].to_pylist(), items["rights"].to_pylist(), strict=True):
            if rights and value in {t.strip() for t in rights.split(";")}:
                out.append(item_id)
        return sorted(out)
    for item_id, attrs in zip(items["item_id"].to_pylist(), items["attributes"].to_pylist(), strict=True):
        got = json.loads(attrs).get(attribute) if attrs else None
        if (
            got == value
            or (isinstance(got, list) and value in got)
            or (got is not None and str(got) == value)
        ):
            out.append(item_id)
    return sorted(out)


def resolve(request: ForgetRequest, items: pa.Table | None = None) -> ForgetScope:
    """The scope of `request`; attribute requests match against `items` (item_id, rights, attributes)."""
    if request.kind == "user":
        return ForgetScope(users=frozenset(request.users))
    if request.kind == "item":
        return ForgetScope(items=frozenset(request.items))
    if request.kind == "interactions":
        return ForgetScope(pairs=frozenset(request.pairs))
    if request.kind == "modality":
        return ForgetScope(image_items=frozenset(request.items))
    if request.kind == "before":
        return ForgetScope(before=request.before)
    if items is None:
        raise ValueError("an attribute request needs the items table to match against")
    return ForgetScope(items=frozenset(attribute_items(items, request.attribute, request.value)))


def interaction_mask(table: pa.Table, scope: ForgetScope) -> np.ndarray:
    """Boolean mask of the rows of an interaction-like table (user_id, item_id[, timestamp]) the scope covers."""
    n = table.num_rows
    mask = np.zeros(n, dtype=bool)
    if scope.users:
        mask |= pc.is_in(table["user_id"], pa.array(sorted(scope.users), pa.string())).to_numpy(
            zero_copy_only=False
        )
    if scope.items:
        mask |= pc.is_in(table["item_id"], pa.array(sorted(scope.items), pa.string())).to_numpy(
            zero_copy_only=False
        )
    if scope.pairs:
        keys = pc.binary_join_element_wise(table["user_id"], table["item_id"], "\x1f")
        wanted = pa.array(sorted(f"{u}\x1f{i}" for u, i in scope.pairs), pa.string())
        mask |= pc.is_in(keys, wanted).to_numpy(zero_copy_only=False)
    if scope.before is not None and n:
        mask |= seconds(table["timestamp"]) < int(scope.before.timestamp())
    return mask


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


@dataclass(frozen=True)
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioConfig:
        """Build from a mapping; an unknown key is an error naming it and the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown ScenarioConfig key(s) {unknown}; valid keys are {names}")
        return cls(**data)


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


def train_degrees(split: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, train-row counts), ordered as CURE4Rec's `value_counts()`: degree high to low, ties by id."""
    train = split.filter(pc.equal(split["label"], TRAIN))
    counts = pc.value_counts(train["user_id"])
    users = counts.field("values").to_numpy(zero_copy_only=False)
    deg = counts.field("counts").to_numpy()
    order = np.lexsort((users.astype(str), -deg))
    return users[order], deg[order]


def cure4rec_users(split: pa.Table, mode: str, percent: float, seed: int) -> list[str]:
    """CURE4Rec's forgotten users: `int(n_users * percent / 100)` random / most active / least active ones."""
    users, _ = train_degrees(split)
    n = int(len(users) * percent / 100)
    if mode == "random":
        return [str(u) for u in np.random.RandomState(seed).choice(users, n, replace=False)]
    if mode == "most_active":
        return [str(u) for u in users[:n]]
    if mode == "least_active":
        return [str(u) for u in users[::-1][:n]]
    raise ValueError(f"mode={mode!r}; expected one of {CURE_MODES}")


def _ids(table: pa.Table, column: str, values: list[str]) -> np.ndarray:
    return pc.is_in(table[column], pa.array(values, pa.string())).to_numpy(zero_copy_only=False)


def select(split: pa.Table, cfg: ScenarioConfig, items: pa.Table | None = None) -> Selection:
    """The forget rows of a scenario over `split` (see the module docstring for each rule)."""
    parts = cfg.effective_parts
    train = pc.equal(split["label"], TRAIN).to_numpy(zero_copy_only=False)
    scope_rows = train if parts == "train" else np.ones(split.num_rows, dtype=bool)
    rng = np.random.RandomState(cfg.seed)
    if cfg.scenario == "cure4rec":
        users = cure4rec_users(split, cfg.mode, cfg.percent, cfg.seed)
        return Selection(_ids(split, "user_id", users) & scope_rows, users, [], [])
    if cfg.scenario == "l2unrank_item":
        _, all_items = id_maps(split.filter(pa.array(train)))
        chosen = [
            str(all_items[i])
            for i in rng.permutation(len(all_items))[: int(len(all_items) * cfg.percent / 100)]
        ]
        return Selection(_ids(split, "item_id", chosen) & scope_rows, [], chosen, [])
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
    hits = _ids(split, "item_id", sensitive) & scope_rows
    eligible = np.unique(split["user_id"].filter(pa.array(hits)).to_numpy(zero_copy_only=False))
    if not len(eligible):
        raise ValueError(
            f"no user has a train interaction with an item whose {cfg.attribute} is {cfg.category!r}"
        )
    n = max(1, int(len(eligible) * cfg.percent / 100))
    chosen = [str(u) for u in rng.choice(eligible, n, replace=False)]
    batches = [chosen[i : i + cfg.batch_users] for i in range(0, n, cfg.batch_users)]
    return Selection(hits & _ids(split, "user_id", chosen), chosen, sensitive, batches)


# ---- retained kNN graphs -------------------------------------------------------------------------------------


def _k_eff(cfg: KnnConfig, n_kept: int) -> int:
    return max(0, min(cfg.k, n_kept - (0 if cfg.self_loops else 1)))


def knn_retained(features: np.ndarray, keep: np.ndarray, cfg: KnnConfig) -> tuple[np.ndarray, ...]:
    """The kNN graph rebuilt on the kept rows only, as (src, dst, weight) over all rows' indices: removed rows
    have no edge. k shrinks to the kept count when fewer rows remain."""
    kept = np.flatnonzero(keep)
    k = _k_eff(cfg, len(kept))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    idx, sim = knn_topk(
        features[kept], k, exclude_self=not cfg.self_loops, block_rows=cfg.block_rows, max_tile=cfg.max_tile
    )
    src = np.repeat(kept, k)
    return normalize_knn(src, kept[idx.ravel()], sim.ravel(), len(features), cfg.norm, cfg.symmetric)


def _topk_rows(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int, exclude_self: bool, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours (global indices, similarities) of `rows` among `cols` of unit-norm `x`."""
    import torch

    xc = torch.from_numpy(x[cols])
    out_idx = np.empty((len(rows), k), dtype=np.int64)
    out_sim = np.empty((len(rows), k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(rows), block):
            q = rows[start : start + block]
            sim = torch.mm(torch.from_numpy(x[q]), xc.T)
            if exclude_self:
                pos = np.searchsorted(cols, q)
                hit = (pos < len(cols)) & (cols[np.minimum(pos, len(cols) - 1)] == q)
                r = np.flatnonzero(hit)
                sim[torch.from_numpy(r), torch.from_numpy(pos[r])] = -torch.inf
            val, idx = torch.topk(sim, k, dim=1)
            out_idx[start : start + len(q)] = cols[idx.numpy()]
            out_sim[start : start + len(q)] = val.numpy()
    return out_idx, out_sim


def knn_patch(
    old_src: np.ndarray, old_dst: np.ndarray, features: np.ndarray, keep: np.ndarray, cfg: KnnConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The retained kNN graph from the stored one: (src, dst, weight, rows recomputed).

    `old_src`/`old_dst` are the stored edges in the new row order (-1 for a node that no longer exists). A kept
    row keeps its stored top-k (re-scored) unless one of its stored neighbours was removed or it has fewer than k
    of them; only those rows are searched again among the kept rows. Weights are re-normalised globally (LATTICE
    weights depend on neighbours' degrees). Equals `knn_retained(features, keep, cfg)`.
    """
    n = len(features)
    kept = np.flatnonzero(keep)
    k = _k_eff(cfg, len(kept))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    x = l2_normalize(features)
    old_src, old_dst = np.asarray(old_src, np.int64), np.asarray(old_dst, np.int64)
    live = old_src >= 0
    src, dst = old_src[live], old_dst[live]
    gone = (dst < 0) | ~keep[np.maximum(dst, 0)]
    affected = np.zeros(n, dtype=bool)
    affected[src[gone]] = True
    src, dst = src[~gone], dst[~gone]
    affected |= np.bincount(src, minlength=n) < k
    affected &= keep
    stay = ~affected[src] & keep[src]
    src, dst = src[stay], dst[stay]
    sim = np.einsum("ij,ij->i", x[src], x[dst])
    order = np.lexsort((-sim, src))
    src, dst, sim = src[order], dst[order], sim[order]
    starts = np.searchsorted(src, src, side="left")
    first_k = (np.arange(len(src)) - starts) < k
    src, dst, sim = src[first_k], dst[first_k], sim[first_k]
    redo = np.flatnonzero(affected)
    if len(redo):
        idx, s = _topk_rows(x, redo, kept, k, exclude_self=not cfg.self_loops)
        src = np.concatenate((src, np.repeat(redo, k)))
        dst = np.concatenate((dst, idx.ravel()))
        sim = np.concatenate((sim, s.ravel()))
    src, dst, w = normalize_knn(src, dst, sim, n, cfg.norm, cfg.symmetric)
    return src, dst, w, len(redo)


def edges_matrix(src: np.ndarray, dst: np.ndarray, w: np.ndarray, n: int) -> sp.csr_matrix:
    """Square float32 CSR of an edge list (explicit zero weights kept, as `knn_graph` keeps them)."""
    return sp.csr_matrix((np.asarray(w, np.float32), (src, dst)), shape=(n, n), dtype=np.float32)


# ---- store steps: retained artifacts ----------------------------------------------------------------------------


def _node_positions(values: pa.ChunkedArray, nodes: np.ndarray) -> np.ndarray:
    pos = pc.index_in(values, value_set=pa.array(nodes, pa.string()))
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _split_items(ws, split_name: str, version: int) -> np.ndarray:
    """The item nodes of a split (sorted ids, the order of `id_maps`), reading only its item_id column."""
    column = ws.read(f"split_{split_name}", columns=["item_id"], version=version)["item_id"]
    uniq = pc.unique(column)
    return uniq.take(pc.sort_indices(uniq)).to_numpy(zero_copy_only=False)


def _same_nodes(ws, info: dict, nodes: np.ndarray) -> bool:
    """Whether the split the graph was built on (at that version) has exactly these item nodes."""
    try:
        old = _split_items(ws, info["split"], info["split_version"])
    except Exception:  # the pinned version is gone: treat the nodes as changed
        return False
    return len(old) == len(nodes) and bool(np.all(old == nodes))


def retained_knn_graph(
    ws, info: dict, split_name: str, excluded: Callable[[str], set[str]], name: str | None = None
) -> dict:
    """Rebuild-equivalent kNN graph of stored graph `info` (a manifest) on split `split_name`'s current manifest,
    without the items `excluded(feature)` names for each feature. Single-feature graphs are patched
    (`knn_patch`); fused graphs are rebuilt per feature on the retained items and fused again."""
    from recipes.pipeline import _fingerprint
    from stores import artifacts

    split_info = artifacts.manifest(ws, "split", split_name)
    nodes = _split_items(ws, split_name, split_info["table_version"])
    params = info["params"]
    cfg = KnnConfig(
        k=params["k"], norm=params["norm"], symmetric=params["symmetric"], self_loops=params["self_loops"]
    )
    inputs: dict[str, Any] = {
        "split": split_name,
        "split_version": split_info["table_version"],
        "features": {},
    }
    provenance, graphs, recomputed = {}, [], 0
    same_nodes = name in (None, info["name"]) and ws.exists(info["table"]) and _same_nodes(ws, info, nodes)
    for feature in params["features"]:
        mat, mask, prov = artifacts.feature_matrix(ws, feature, nodes)
        prov["missing_items"] = int((~mask).sum())
        provenance[feature] = prov
        inputs["features"][feature] = {"version": prov["version"], "content_hash": prov["content_hash"]}
        same_nodes &= info["inputs"]["features"].get(feature, {}).get("content_hash") == prov["content_hash"]
    if same_nodes and not any(set(nodes.tolist()) & excluded(f) for f in params["features"]):
        # Same items, same vectors: the stored edges are the retained graph; only the pins move.
        body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
        body |= inputs | {
            "inputs": inputs,
            "fingerprint": _fingerprint(inputs, params),
            "feature_provenance": provenance,
        }
        out = artifacts.record_artifact(ws, "graph", info["name"], info["table"], info["table_version"], body)
        return out | {"recomputed_items": 0, "unchanged": True}
    for feature in params["features"]:
        mat, mask, prov = artifacts.feature_matrix(ws, feature, nodes)
        gone = excluded(feature)
        keep = ~np.isin(nodes, np.array(sorted(gone), dtype=object)) if gone else np.ones(len(nodes), bool)
        if len(params["features"]) == 1 and ws.exists(info["table"]):
            old = ws.read(info["table"], columns=["src", "dst"], version=info["table_version"])
            src, dst, w, recomputed = knn_patch(
                _node_positions(old["src"], nodes), _node_positions(old["dst"], nodes), mat, keep, cfg
            )
        else:
            src, dst, w = knn_retained(mat, keep, cfg)
            recomputed += int(keep.sum())
        graphs.append(edges_matrix(src, dst, w, len(nodes)))
    weights = params["weights"]
    matrix = graphs[0] if len(graphs) == 1 and weights[0] == 1.0 else fuse_graphs(graphs, weights)
    fingerprint = _fingerprint(inputs, params)
    body = inputs | {
        "inputs": inputs,
        "params": params,
        "fingerprint": fingerprint,
        "feature_provenance": provenance,
        "retained": {"recomputed_items": recomputed},
    }
    # save_graph only takes the item order from the split: hand it the nodes, not the 10M-row split
    order = pa.table({"user_id": pa.array(nodes, pa.string()), "item_id": pa.array(nodes, pa.string())})
    out = artifacts.save_graph(ws, name or info["name"], matrix, order, "item", body)
    return out | {"recomputed_items": recomputed}


def rebuild_graph(ws, info: dict, split_name: str, name: str | None = None) -> dict:
    """Rebuild a stored non-kNN graph (user-item, co-occurrence, hypergraph) with its parameters on a split."""
    from recipes import pipeline

    params, name = info["params"], name or info["name"]
    kind = params["type"]
    if kind == "user-item":
        return pipeline.build_ui_graph(ws, split_name, params["norm"], name)
    if kind == "cooccur":
        return pipeline.build_cooccur_graph(
            ws, split_name, params["kind"], params["k"], params["weight"], name
        )
    if kind == "hyper":
        return pipeline.build_hypergraph(ws, split_name, params["kind"], params["knn_graphs"] or None, name)
    raise ValueError(f"graph {info['name']!r} has type {kind!r}; no rebuild rule for it")


def _split_counts(split: pa.Table) -> dict[str, int]:
    """`recipes.splits.split_counts` without sorting the ids (distinct counts are enough, two at once)."""
    from concurrent.futures import ThreadPoolExecutor

    labels = {r["values"]: r["counts"] for r in pc.value_counts(split["label"]).to_pylist()}
    with ThreadPoolExecutor(2) as pool:
        users, items = pool.map(lambda c: pc.count_distinct(split[c]).as_py(), ["user_id", "item_id"])
    return {
        "rows": split.num_rows,
        "users": users,
        "items": items,
        "train": labels.get(TRAIN, 0),
        "valid": labels.get(VALID, 0),
        "test": labels.get(TEST, 0),
    }


_GRAPH_ORDER = {"knn": 0, "user-item": 1, "cooccur": 1, "hyper": 2}


def _ui_weights(edges: pa.Table, keep: np.ndarray) -> np.ndarray | None:
    """D^-1/2 A D^-1/2 weights (float32, as `ui_graph.sym_normalize`) of the kept rows of a stored user-item
    graph, from the degrees left after dropping the other rows. The table is in save_graph's order (users
    first, each source's edges together), so a source's degree is the length of its run and a target's degree
    its count among the kept rows of the other section; None when the table is not in that order."""
    n = edges.num_rows
    is_user = pc.equal(edges["src_kind"], "user")
    n_user = int(pc.sum(is_user).as_py() or 0)
    if n_user and pc.index(is_user, False).as_py() not in (-1, n_user):
        return None
    src = edges["src"].combine_chunks()
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = pc.not_equal(src.slice(1), src.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if 0 < n_user < n:
        starts[n_user] = True
    run = np.cumsum(starts) - 1
    src_degree = np.bincount(run[keep], minlength=int(run[-1]) + 1 if n else 0).astype(np.float64)
    weight = np.power(src_degree[run] + 1e-7, -0.5)
    for lo, hi in ((0, n_user), (n_user, n)):
        if hi > lo:
            codes = pc.dictionary_encode(edges["dst"].slice(lo, hi)).combine_chunks().indices
            codes = codes.to_numpy(zero_copy_only=False)
            dst_degree = np.bincount(codes[keep[lo:hi]], minlength=int(codes.max()) + 1).astype(np.float64)
            weight[lo:hi] *= np.power(dst_degree[codes] + 1e-7, -0.5)
    return weight[keep].astype(np.float32)


def patched_ui_edges(ws, info: dict, users: set[str], items: set[str]) -> tuple[pa.Table, int]:
    """The edges of stored user-item graph `info` once whole users and items left its split: theirs go and,
    for norm "sym", every remaining edge is re-weighted with the new degrees exactly as
    `ui_graph.sym_normalize` weighs a rebuild (same edges, same order, same float32 weights). Returns the edge
    table and the number of edges removed; raises ValueError where only a rebuild will do."""
    norm = info["params"]["norm"]
    if norm not in ("sym", "none"):
        raise ValueError(f"norm {norm!r} is rebuilt, not patched")
    edges = ws.read(info["table"], version=info["table_version"])
    keys = pa.array(sorted(users | items), pa.string())
    drop = np.zeros(edges.num_rows, dtype=bool)
    for side in ("src", "dst"):
        rows = np.flatnonzero(pc.is_in(edges[side], keys).to_numpy(zero_copy_only=False))
        if len(rows):  # an id may name a user and an item: check the kind on the few rows that match
            hit = edges.select([side, f"{side}_kind"]).take(pa.array(rows)).to_pylist()
            drop[rows] |= [
                (r[side] in users and r[f"{side}_kind"] == "user")
                or (r[side] in items and r[f"{side}_kind"] == "item")
                for r in hit
            ]
    keep = ~drop
    kept = edges.filter(pa.array(keep))
    if norm == "sym":
        weight = _ui_weights(edges, keep)
        if weight is None:
            raise ValueError(f"graph {info['name']!r} is not in save_graph's edge order; rebuilding it")
        kept = kept.set_column(
            kept.schema.get_field_index("weight"), edges.schema.field("weight"), pa.array(weight)
        )
    return kept, int(drop.sum())


def _save_patched_ui(ws, info: dict, split_version: int, edges: pa.Table, removed: int, nodes: int) -> dict:
    from recipes.pipeline import _fingerprint
    from stores import artifacts

    version = artifacts._write_table(ws, info["table"], edges)
    inputs = {"split": info["split"], "split_version": split_version}
    body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
    body |= inputs | {
        "inputs": inputs,
        "fingerprint": _fingerprint(inputs, info["params"]),
        "nodes": nodes,
        "edges": edges.num_rows,
        "retained": {"edges_removed": removed},
    }
    return artifacts.record_artifact(ws, "graph", info["name"], info["table"], version, body)


def _ui_patchable(info: dict, split_manifests: dict[str, dict], scope: ForgetScope | None) -> bool:
    split = split_manifests.get(info.get("split"))
    return (
        info["params"]["type"] == "user-item"
        and info["params"].get("norm") in ("sym", "none")
        and scope is not None
        and not (scope.pairs or scope.before)
        and split is not None
        and info.get("split_version") == split["table_version"]
    )


def prepare_refresh(ws, changed: set[str], scope: ForgetScope | None) -> dict:
    """The heavy reads of `refresh_artifacts` that need only the rows left, not the final versions: the counts
    of the changed splits and the patched user-item edge tables. Erasure runs it while it compacts."""
    from stores import artifacts

    splits = {i["name"]: i for i in artifacts.list_artifacts(ws, "split") if i["table"] in changed}
    out: dict[str, dict] = {"counts": {}, "ui": {}}
    for name, info in splits.items():
        out["counts"][name] = _split_counts(ws.read(info["table"], columns=["user_id", "item_id", "label"]))
    for info in artifacts.list_artifacts(ws, "graph"):
        if _ui_patchable(info, splits, scope):
            try:
                out["ui"][info["name"]] = patched_ui_edges(ws, info, set(scope.users), set(scope.items))
            except ValueError:
                continue
    return out


def _repin_graph(ws, info: dict, split_version: int) -> dict:
    """Same edges on a new split version (no node left, no input vector changed): move the pins only."""
    from recipes.pipeline import _fingerprint
    from stores import artifacts

    inputs = info["inputs"] | {"split_version": split_version}
    body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
    body |= {
        "split_version": split_version,
        "inputs": inputs,
        "fingerprint": _fingerprint(inputs, info["params"]),
    }
    return artifacts.record_artifact(ws, "graph", info["name"], info["table"], info["table_version"], body)


def refresh_artifacts(
    ws,
    changed: set[str],
    excluded: Callable[[str], set[str]],
    request_id: str,
    scope: ForgetScope | None = None,
    prepared: dict | None = None,
) -> dict:
    """After erasure changed the tables in `changed`: re-pin every split manifest, and re-derive every graph
    whose split or features changed, under the same name and parameters. kNN graphs are re-pinned when their
    items and vectors are the same, else patched (`knn_patch`); user-item graphs are patched when the scope
    removed whole users or items, else rebuilt; other graphs are rebuilt. Returns {"splits", "graphs",
    "failed"} for the receipt."""
    from recipes.pipeline import _fingerprint
    from stores import artifacts

    report: dict[str, dict] = {"splits": {}, "graphs": {}, "failed": {}}
    prepared = prepared or {"counts": {}, "ui": {}}
    old_manifests, counts = {}, {}
    for info in artifacts.list_artifacts(ws, "split"):
        if not ws.exists(info["table"]) or (info["table"] not in changed and "interactions" not in changed):
            continue
        body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
        version = ws.version(info["table"])
        if "interactions" in body.get("inputs", {}) and ws.exists("interactions"):
            body["inputs"] = body["inputs"] | {"interactions": ws.version("interactions")}
            body["fingerprint"] = _fingerprint(body["inputs"], body.get("params", {}))
        if body.get("base_split") and f"split_{body['base_split']}" in changed:
            body["base_split_version"] = ws.version(f"split_{body['base_split']}")
        if info["table"] in changed:
            body["counts"] = counts[info["name"]] = prepared["counts"].get(info["name"]) or _split_counts(
                ws.read(info["table"], columns=["user_id", "item_id", "label"])
            )
            old_manifests[info["name"]] = info
        body["erasures"] = [*body.get("erasures", []), request_id]
        artifacts.record_artifact(ws, "split", info["name"], info["table"], version, body)
        report["splits"][info["name"]] = {
            "table_version": version,
            "rows": body.get("counts", {}).get("rows"),
        }
    graphs = sorted(
        artifacts.list_artifacts(ws, "graph"), key=lambda g: _GRAPH_ORDER.get(g["params"]["type"], 3)
    )
    rebuilt: set[str] = set()
    for info in graphs:
        params, split = info["params"], info.get("split")
        feats = {artifacts.feature_table(f) for f in params.get("features", [])}
        if not (split in counts or feats & changed or set(params.get("knn_graphs") or []) & rebuilt):
            continue
        split_version = ws.version(f"split_{split}")
        # erasure only removes rows, so the same split version plus the same item count means the same items
        same_items = (
            split in counts
            and info.get("split_version") == old_manifests[split]["table_version"]
            and info.get("nodes") == counts[split]["items"]
        )
        try:
            if params["type"] == "knn" and same_items and not feats & changed:
                out, action = _repin_graph(ws, info, split_version), "unchanged (re-pinned)"
            elif params["type"] == "knn":
                out = retained_knn_graph(ws, info, split, excluded)
                action = (
                    "unchanged (re-pinned)"
                    if out.get("unchanged")
                    else f"patched ({out['recomputed_items']} items re-searched)"
                    if len(feats) == 1
                    else "rebuilt"
                )
            elif _ui_patchable(info, old_manifests, scope):
                nodes = counts[split]["users"] + counts[split]["items"]
                try:
                    edges, removed = prepared["ui"].get(info["name"]) or patched_ui_edges(
                        ws, info, set(scope.users), set(scope.items)
                    )
                    out = _save_patched_ui(ws, info, split_version, edges, removed, nodes)
                    action = f"patched ({removed} edges removed, weights renormalised)"
                except ValueError:
                    out, action = rebuild_graph(ws, info, split), "rebuilt"
            else:
                out, action = rebuild_graph(ws, info, split), "rebuilt"
        except Exception as exc:  # recorded; erasure then deletes the graph's rows instead
            report["failed"][info["name"]] = f"{type(exc).__name__}: {exc}"
            continue
        if not action.startswith("unchanged"):
            rebuilt.add(info["name"])
        report["graphs"][info["name"]] = {
            "action": action,
            "table": out["table"],
            "table_version": out["table_version"],
            "edges": out.get("edges"),
        }
    return report


# ---- store steps: unlearning splits -------------------------------------------------------------------------------


def build_unlearning_split(
    ws, split_name: str, cfg: ScenarioConfig, name: str | None = None, graphs: list[str] | None = None
) -> dict:
    """Store a scenario's forget set as split `<name>_forget` and the gold retain-only dataset as split
    `<name>_gold` (train = retain), with manifests naming the base split version, the scenario and the counts;
    then the retained version of each graph in `graphs` (built on the base split) as `<graph>__<name>`."""
    from stores import artifacts

    base = artifacts.manifest(ws, "split", split_name)
    split = artifacts.load_split(ws, split_name, base["table_version"])
    items = (
        ws.read("items", columns=["item_id", "rights", "attributes"])
        if cfg.scenario == "erase_sensitive"
        else None
    )
    sel = select(split, cfg, items)
    cut = forget_retain(split, sel.mask, cfg.effective_parts)
    tag = f"{cfg.mode}_" if cfg.scenario == "cure4rec" else ""
    name = name or f"{split_name}_{cfg.scenario}_{tag}p{cfg.percent:g}".replace(".", "_")
    common = {
        "base_split": split_name,
        "base_split_version": base["table_version"],
        "scenario": dataclasses.asdict(cfg) | {"parts": cfg.effective_parts},
        "selection": {
            "users": len(sel.users),
            "items": len(sel.items),
            "batches": len(sel.batches),
            "sha256": sel.digest(),
        },
        "counts_unlearning": cut.counts(),
    }
    from recipes.splits import split_counts

    forget = artifacts.save_split(
        ws, f"{name}_forget", cut.forget, common | {"role": "forget", "counts": split_counts(cut.forget)}
    )
    gold = artifacts.save_split(
        ws, f"{name}_gold", cut.gold, common | {"role": "gold", "counts": split_counts(cut.gold)}
    )
    out = {"forget": forget, "gold": gold, "graphs": {}}
    gold_items = set(id_maps(cut.gold)[1].tolist())
    for graph in graphs or []:
        info = artifacts.manifest(ws, "graph", graph)
        if info.get("split") != split_name:
            raise ValueError(f"graph {graph!r} was built on split {info.get('split')!r}, not {split_name!r}")
        if info["params"]["type"] == "knn":
            _, base_items = id_maps(split)
            dropped = set(base_items.tolist()) - gold_items
            built = retained_knn_graph(
                ws, info, f"{name}_gold", lambda _f, d=dropped: d, name=f"{graph}__{name}"
            )
        else:
            built = rebuild_graph(ws, info, f"{name}_gold", name=f"{graph}__{name}")
        out["graphs"][graph] = {
            k: built.get(k) for k in ("name", "table", "table_version", "edges", "recomputed_items")
        }
    return out


__all__ = [
    "KINDS",
    "SCENARIOS",
    "ForgetRequest",
    "ForgetScope",
    "ScenarioConfig",
    "Selection",
    "UnlearningSplit",
    "attribute_items",
    "build_unlearning_split",
    "cure4rec_users",
    "edges_matrix",
    "forget_retain",
    "interaction_mask",
    "knn_patch",
    "knn_retained",
    "new_request_id",
    "refresh_artifacts",
    "resolve",
    "retained_knn_graph",
    "select",
    "train_degrees",
]
