"""Does the model still remember? A forgetting check for a forget request, written into the request's receipt.

Two models of the example trainer (recipes/train_example.py, MF-BPR by default) are trained on a snapshot's split:
"before" on the whole train part, and "gold" from scratch on the retain set (train minus the rows the request
covers: the data as it is after erasure). For each, MMRecUn's comparison (recall/NDCG@k on the forget set and on
the retain set, plus the retained users' test part) and CURE4Rec's completeness idea, a membership-inference AUC
(sklearn `roc_auc_score`) of the model's scores of forgotten train interactions (members) against never-seen ones.

Non-members are chosen so that only membership differs: for every forgotten pair (u, i), a pair (u, j) of the same
user, with j drawn from the forget set's own items (the multiset of items the forgotten pairs name, so members and
non-members have the same item popularity) among the items u has no interaction with in any part of the split. A
model that forgot scores both alike (AUC 0.5); a score driven by popularity alone would also give 0.5.

Erasure removes the versions a snapshot taken before the forget pins (the snapshot is invalidated), so the "before"
model can only be trained while those rows exist. Hence two ways to call it:
- `unlearn_check(ws, snapshot, request)` with a `ForgetRequest` not yet carried out: trains "before", carries out the
  forget (`recipes.unlearning.forget.forget`), trains "gold" on the retained rows and appends the check to the
  receipt. The forgotten rows live only in memory meanwhile. This is the real workflow: snapshot -> check + forget.
- `unlearn_check(ws, snapshot, "request-id")` for a logged request whose rows the snapshot still serves (the
  snapshot did not hold them when erasure ran, e.g. a copy of the workspace kept for research): the forget rows are
  matched by the log's keyed hashes.

    >>> req = cure4rec_request(ws, "ml100k", "cure-core-5", mode="most_active", percent=5)
    >>> check = unlearn_check(ws, "ml100k", req, CheckConfig(epochs=10))
    >>> check["before"]["membership_auc"], check["gold"]["membership_auc"]      # e.g. 0.8, 0.5
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recipes.splits import TEST, TRAIN
from recipes.train_example import KS, TrainConfig, binary_matrix, evaluate, train_model
from stores.erasure.log import append_to_receipt, logged
from stores.erasure.requests import ForgetRequest, interaction_mask, resolve
from stores.erasure.verify import logged_targets
from stores.ids import seconds
from stores.reader import FeatureReader, UserBatches, pair_keys
from stores.schema import key_hash
from stores.strict import strict_config
from stores.workspace import Workspace

SECTION = "unlearn_check"
CHANCE_TOLERANCE = 0.05  # |AUC - 0.5| a model that forgot may show from sampling noise alone
NONMEMBERS = (
    "same users, items drawn from the forget set's own items (popularity-matched) that the user never "
    "interacted with in any part of the split"
)


@strict_config
class CheckConfig:
    """The models of the check: `model` (mf_bpr | freedom) trained `epochs` epochs without early stopping (both
    models see the same schedule), with the example trainer's other settings."""

    model: str = "mf_bpr"
    epochs: int = 20
    lr: float = 5e-3
    dim: int = 64
    batch_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in ("mf_bpr", "freedom"):
            raise ValueError(f"model={self.model!r}; expected 'mf_bpr' or 'freedom'")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs}; expected >= 1")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            models=(self.model,),
            epochs=self.epochs,
            lr=self.lr,
            mf_lr=self.lr,
            dim=self.dim,
            batch_size=self.batch_size,
            seed=self.seed,
        )


# ---- pure parts -------------------------------------------------------------------------------------------------


def membership_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of telling member scores from non-member scores (0.5: the model does not tell them apart)."""
    from sklearn.metrics import roc_auc_score

    if not len(members) or not len(nonmembers):
        raise ValueError(
            f"{len(members)} member and {len(nonmembers)} non-member scores; both must be non-empty"
        )
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def nonmember_pairs(
    user: np.ndarray, item: np.ndarray, known: np.ndarray, n_items: int, seed: int = 0, max_rounds: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """One non-member (u, j) per member (u, i): j drawn from the members' own items, never one of u's `known`
    pairs (`pair_keys` over every part). Members whose user knows every candidate item are dropped."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(item, np.int64)
    user = np.asarray(user, np.int64)
    draw = pool[rng.integers(0, len(pool), len(user))]
    todo = np.arange(len(user))
    for _ in range(max_rounds):
        keys = user[todo] * n_items + draw[todo]
        at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        todo = todo[known[at] == keys]
        if not len(todo):
            break
        draw[todo] = pool[rng.integers(0, len(pool), len(todo))]
    keep = np.ones(len(user), bool)
    keep[todo] = False
    return user[keep], draw[keep]


def pair_scores(
    score: Callable[[torch.Tensor], torch.Tensor], user: np.ndarray, item: np.ndarray
) -> np.ndarray:
    """The model's score of each (user, item) pair, one user batch at a time."""
    out = np.empty(len(user), np.float64)
    order = np.argsort(user, kind="stable")
    users, starts = np.unique(user[order], return_index=True)
    for lo in range(0, len(users), 256):
        chunk = users[lo : lo + 256]
        with torch.no_grad():
            full = score(torch.from_numpy(chunk)).double().numpy()
        begin = starts[lo]
        end = starts[lo + 256] if lo + 256 < len(users) else len(order)
        rows = order[begin:end]
        out[rows] = full[np.searchsorted(chunk, user[rows]), item[rows]]
    return out


def request_mask(split: pa.Table, ws: Workspace, request_id: str) -> np.ndarray:
    """Rows of `split` a logged request covers, matched by the log's keyed hashes (users, items, pairs, time)."""
    row = logged(ws, request_id)
    if row is None:
        raise KeyError(
            f"no forget request {request_id!r} in the log; give a ForgetRequest to carry out instead"
        )
    targets = logged_targets(ws, row["params"])

    def hashed(column: str, kind: str) -> dict[str, str]:
        return {v: key_hash(targets.secret, kind, v) for v in pc.unique(split[column]).to_pylist()}

    users, items = hashed("user_id", "user"), hashed("item_id", "item")
    uid, iid = split["user_id"].to_pylist(), split["item_id"].to_pylist()
    mask = np.fromiter(
        (users[u] in targets.users or items[i] in targets.items for u, i in zip(uid, iid, strict=True)), bool
    )
    if targets.pairs:
        mask |= np.fromiter(
            ((users[u], items[i]) in targets.pairs for u, i in zip(uid, iid, strict=True)), bool
        )
    if targets.before is not None and split.num_rows:
        mask |= seconds(split["timestamp"]) < int(targets.before.timestamp())
    return mask


# ---- the check --------------------------------------------------------------------------------------------------


def cure4rec_request(
    ws: Workspace,
    snapshot: str,
    request_id: str,
    mode: str = "most_active",
    percent: float = 5.0,
    seed: int = 42,
) -> ForgetRequest:
    """A user forget request for CURE4Rec's forgotten users (`scenarios.cure4rec_users`) of the snapshot's split."""
    from recipes.unlearning.scenarios import cure4rec_users

    users = cure4rec_users(_snapshot_split(ws, FeatureReader(ws, snapshot)), mode, percent, seed)
    return ForgetRequest(
        request_id, "user", users=tuple(users), reason=f"CURE4Rec {mode} {percent:g}% (seed {seed})"
    )


def _snapshot_split(ws: Workspace, reader: FeatureReader) -> pa.Table:
    """The snapshot's split rows at the pinned version, in the row order the reader's index arrays follow."""
    info = reader.manifest
    table = f"split_{info['split']}"
    return ws.read(table, columns=["user_id", "item_id", "label", "timestamp"], version=info["tables"][table])


def unlearn_check(
    ws: Workspace,
    snapshot: str,
    request: ForgetRequest | str,
    cfg: CheckConfig = CheckConfig(),
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Train "before" and "gold", compare them on the forget and retain sets and by membership AUC, and append the
    result to the request's receipt under `unlearn_check`; returns that section (see the module docstring)."""
    reader = FeatureReader(ws, snapshot)
    # raises SnapshotError (re-issue it) when erasure removed the versions the snapshot pins
    split = _snapshot_split(ws, reader)
    pending = isinstance(request, ForgetRequest)
    request_id = request.request_id if pending else request
    if pending and logged(ws, request_id) is not None:
        pending, request = False, request_id  # already logged: match its rows by hash, do not forget twice
    if pending:
        items = (
            ws.read("items", columns=["item_id", "rights", "attributes"])
            if request.kind == "attribute"
            else None
        )
        mask = interaction_mask(split, resolve(request, items))
    else:
        mask = request_mask(split, ws, request_id)
    train = pc.equal(split["label"], TRAIN).to_numpy(zero_copy_only=False)
    user, item = reader.interaction_arrays("train")  # the split's train rows, in split row order
    forgot = mask[train]
    if not forgot.any():
        raise ValueError(
            f"snapshot {snapshot!r} holds no train row that request {request_id!r} covers; give the snapshot taken "
            "before the forget"
        )
    n, m = reader.n_users, reader.n_items
    tcfg = cfg.train_config()
    _preload(reader, tcfg)  # everything training reads, before erasure removes the versions the snapshot pins
    every = reader.positives(("train", "valid", "test")).tocoo()
    known = pair_keys(every.row, every.col, m)
    f_user, f_item = user[forgot], item[forgot]
    r_user, r_item = user[~forgot], item[~forgot]
    nm_user, nm_item = nonmember_pairs(f_user, f_item, known, m, seed=cfg.seed)
    retain_m = binary_matrix(r_user, r_item, (n, m))
    t_user, t_item = reader.interaction_arrays("test")
    kept_test = ~mask[pc.equal(split["label"], TEST).to_numpy(zero_copy_only=False)]
    sets = {
        "forget": UserBatches(truth=binary_matrix(f_user, f_item, (n, m)), exclude_matrix=retain_m),
        "retain": UserBatches(truth=retain_m),
        "test": UserBatches(
            truth=binary_matrix(t_user[kept_test], t_item[kept_test], (n, m)),
            exclude_matrix=reader.positives("train"),
        ),
    }

    def measure(variant: str, pairs: tuple[np.ndarray, np.ndarray] | None) -> dict:
        score, facts = train_model(cfg.model, reader, tcfg, train=pairs, log=log)
        auc = membership_auc(pair_scores(score, f_user, f_item), pair_scores(score, nm_user, nm_item))
        out = {"membership_auc": round(auc, 4)}
        out |= {name: _rounded(evaluate(score, b, KS)) for name, b in sets.items()} | {"train": facts}
        log(f"{variant}: membership AUC {auc:.4f}, forget recall@20 {out['forget']['recall@20']:.4f}")
        return out

    before = measure("before", None)
    if pending:
        from recipes.unlearning.forget import forget

        receipt = forget(ws, request)
        log(f"forget {request_id}: verified {receipt['verification']['verified']}")
    gold = measure("gold", (r_user, r_item))
    section = {
        "snapshot": snapshot,
        "split": reader.manifest["split"],
        "model": cfg.model,
        "config": {"epochs": cfg.epochs, "lr": cfg.lr, "dim": cfg.dim, "seed": cfg.seed},
        "counts": {
            "forget_train": int(forgot.sum()),
            "forget_users": len(np.unique(f_user)),
            "retain_train": int((~forgot).sum()),
            "nonmembers": len(nm_user),
        },
        "nonmembers": NONMEMBERS,
        "before": before,
        "gold": gold,
        "chance_tolerance": CHANCE_TOLERANCE,
        "gold_at_chance": abs(gold["membership_auc"] - 0.5) <= CHANCE_TOLERANCE,
        "before_remembers": before["membership_auc"] - 0.5 > CHANCE_TOLERANCE,
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    append_to_receipt(ws, request_id, SECTION, section)
    return section


def _preload(reader: FeatureReader, cfg: TrainConfig) -> None:
    reader.positives("train")
    if "freedom" in cfg.models:
        for name in (*reader.graph_names("user+item"), *reader.graph_names("item")):
            reader.graph_matrix(name)
        for feature in reader.manifest["features"] if cfg.features is None else cfg.features:
            reader.feature_array(feature)


def _rounded(metrics: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
