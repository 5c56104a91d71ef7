"""An example trainer over a snapshot: FREEDOM-style model, popularity and MF-BPR baselines, MMRec's evaluation.

The model (after Zhou & Shen, FREEDOM, 2023): LightGCN propagation of user/item ID embeddings over the snapshot's
normalised user-item graph, pruned each epoch by FREEDOM's degree-sensitive edge sampling, plus item ID embeddings
propagated over the frozen item-item kNN graph built from the content features; each feature also gets a linear
projection trained with its own BPR term. Evaluation is MMRec's all-ranking protocol: score every item for every
user, mask the user's train items, report recall@k and NDCG@k averaged over users with held-out items; the test
figures come from the epoch with the best validation recall@20.

    >>> reader = FeatureReader("./mmfeat-data", "ml100k-v1")
    >>> results = compare(reader, TrainConfig(epochs=100))      # {"popularity": {...}, "mf_bpr": ..., "freedom": ...}
    >>> unlearning_eval(reader, retain_split, TrainConfig())    # full vs retain-only (gold) on forget/retain/test
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from recipes.graphs.user_item import bipartite, sym_normalize
from stores.reader import BprDataset, FeatureReader, UserBatches, pair_keys
from stores.strict import strict_config

KS = (10, 20)
MODELS = ("popularity", "mf_bpr", "freedom")


@strict_config
class TrainConfig:
    """Hyper-parameters of the example run: FREEDOM's published values, except the learning rates, which are the
    best of the ML-100K runs recorded in BENCHMARKS.md for each model."""

    models: tuple[str, ...] = MODELS
    dim: int = 64
    ui_layers: int = 2
    ii_layers: int = 1
    epochs: int = 120
    batch_size: int = 2048
    lr: float = 2e-3
    mf_lr: float = 1e-3  # MF-BPR's own best on ML-100K 5-core (1e-3 beat 2e-3 and 5e-3)
    l2: float = 1e-4  # L2 on the embeddings of a batch (LightGCN's reg_weight)
    feature_weight: float = 0.01  # weight of the per-feature BPR terms (FREEDOM's reg_weight)
    edge_keep: float = 0.2  # share of user-item edges kept each epoch (FREEDOM's dropout 0.8); 1 = no pruning
    features: tuple[str, ...] | None = None  # None: every feature of the snapshot
    ui_graph: str | None = None  # None: the snapshot's only user+item graph
    item_graph: str | None = None  # None: the snapshot's only item graph
    eval_every: int = 5
    patience: int = 4  # evaluations without a better validation recall@20 before stopping
    seed: int = 0
    threads: int = 1  # more than one thread slows sparse ops down badly on a busy 2-core machine
    workers: int = 0  # DataLoader workers for BPR batches

    def __post_init__(self) -> None:
        bad = sorted(set(self.models) - set(MODELS))
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {list(MODELS)}")
        if self.epochs < 1 or self.eval_every < 1:
            raise ValueError(f"epochs={self.epochs}, eval_every={self.eval_every}; both must be >= 1")


# ---- evaluation -------------------------------------------------------------------------------------------------


def evaluate(
    score: Callable[[torch.Tensor], torch.Tensor], batches: UserBatches, ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """MMRec's full ranking: per user, recall@k = hits in top-k / held-out items and NDCG@k, averaged over users."""
    top = max(ks)
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in ks}
    users = 0
    discount = 1.0 / torch.log2(torch.arange(2, top + 2, dtype=torch.float64))
    with torch.no_grad():
        for batch in batches:
            scores = score(batch["user"]).clone()
            scores[batch["exclude_row"], batch["exclude_item"]] = -torch.inf
            truth = torch.zeros_like(scores, dtype=torch.bool)
            truth[batch["truth_row"], batch["truth_item"]] = True
            n_truth = truth.sum(1).double()
            hits = truth.gather(1, scores.topk(top, dim=1).indices).double()
            for k in ks:
                sums[f"recall@{k}"] += (hits[:, :k].sum(1) / n_truth).sum().item()
                ideal = torch.cumsum(discount[:k], 0)[(n_truth.clamp(max=k) - 1).long()]
                sums[f"ndcg@{k}"] += ((hits[:, :k] * discount[:k]).sum(1) / ideal).sum().item()
            users += len(batch["user"])
    return {name: value / max(users, 1) for name, value in sums.items()} | {"users": users}


# ---- models -----------------------------------------------------------------------------------------------------


def bpr_loss(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid((u * pos).sum(1) - (u * neg).sum(1)).mean()


class MF(nn.Module):
    """Matrix factorisation trained with BPR: score = <user, item>."""

    def __init__(self, n_users: int, n_items: int, dim: int):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        nn.init.xavier_uniform_(self.user.weight)
        nn.init.xavier_uniform_(self.item.weight)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight, self.item.weight

    def loss(self, batch: dict[str, torch.Tensor], l2: float, feature_weight: float = 0.0) -> torch.Tensor:
        """BPR on the propagated embeddings, L2 on the batch's raw embeddings, plus the feature terms."""
        users, items = self.embeddings()
        u = users[batch["user"]]
        reg = (
            self.user(batch["user"]).pow(2).sum()
            + self.item(batch["pos"]).pow(2).sum()
            + self.item(batch["neg"]).pow(2).sum()
        ) / (2 * len(u))
        loss = bpr_loss(u, items[batch["pos"]], items[batch["neg"]]) + l2 * reg
        return loss + feature_weight * self.feature_loss(u, batch) if feature_weight else loss

    def feature_loss(self, u: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(())


class _SparseMatmul(torch.autograd.Function):
    """A @ x with the gradient computed from a precomputed CSR transpose: torch's own CSR backward is ~20x slower."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        return None, None, ctx.a_t @ grad


class Propagate(nn.Module):
    """Multiplication by a fixed sparse matrix (a normalised graph)."""

    def __init__(self, adj: torch.Tensor):
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the two ops used here are stable
            warnings.simplefilter("ignore", UserWarning)
            self.a, self.a_t = adj.to_sparse_csr(), adj.t().coalesce().to_sparse_csr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseMatmul.apply(self.a, self.a_t, x)


class Freedom(MF):
    """LightGCN over the user-item graph + item embeddings smoothed over the frozen item-item feature graph, with a
    projected-feature BPR term per modality. In training mode it propagates over the user-item graph pruned by
    `resample_edges` (FREEDOM's degree-sensitive pruning, `edge_keep` of the edges); in eval mode over the full one."""

    def __init__(
        self,
        train: sp.csr_matrix,
        dim: int,
        ui_adj: torch.Tensor,
        ii_adj: torch.Tensor,
        feature_dims: dict[str, int],
        ui_layers: int = 2,
        ii_layers: int = 1,
        edge_keep: float = 1.0,
    ):
        super().__init__(*train.shape, dim)
        self.train_matrix, self.edge_keep = train, edge_keep
        self.full_ui = self.pruned_ui = Propagate(ui_adj)
        self.ii_adj = Propagate(ii_adj)
        self.ui_layers, self.ii_layers = ui_layers, ii_layers
        self.proj = nn.ModuleDict({name: nn.Linear(d, dim) for name, d in feature_dims.items()})

    def resample_edges(self, rng: np.random.Generator) -> None:
        """Draw this epoch's pruned user-item graph (once per epoch, as FREEDOM's `pre_epoch_processing`)."""
        if self.edge_keep < 1.0:
            self.pruned_ui = Propagate(pruned_ui(self.train_matrix, self.edge_keep, rng))

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.item.weight
        for _ in range(self.ii_layers):
            h = self.ii_adj(h)
        ui_adj = self.pruned_ui if self.training else self.full_ui
        ego = torch.cat([self.user.weight, self.item.weight])
        layers = [ego]
        for _ in range(self.ui_layers):
            ego = ui_adj(ego)
            layers.append(ego)
        users, items = torch.stack(layers).mean(0).split([self.user.num_embeddings, self.item.num_embeddings])
        return users, items + h

    def feature_loss(self, u: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """FREEDOM's modality terms: BPR of the user against the projected features of the positive and negative."""
        return sum(
            bpr_loss(u, proj(batch[f"pos_{name}"]), proj(batch[f"neg_{name}"]))
            for name, proj in self.proj.items()
        )


def binary_matrix(user: np.ndarray, item: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """users x items CSR with a 1 per (user, item) pair, repeats collapsed."""
    mat = sp.csr_matrix((np.ones(len(user), np.float32), (user, item)), shape=shape)
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def sym_ui(train: sp.csr_matrix) -> torch.Tensor:
    """The symmetric-normalised user-item graph of a train matrix, as stored by `mmfeat graph user-item`."""
    coo = sym_normalize(bipartite(train)).tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(
        idx, torch.from_numpy(coo.data), coo.shape, check_invariants=True
    ).coalesce()


def pruned_ui(train: sp.csr_matrix, keep: float, rng: np.random.Generator) -> torch.Tensor:
    """FREEDOM's degree-sensitive edge pruning: keep a `keep` share of the train edges, drawn without replacement
    with probability proportional to 1/sqrt(deg(user) deg(item)), then normalise the kept graph symmetrically."""
    coo = train.tocoo()
    deg_u, deg_i = np.asarray(train.sum(1)).ravel(), np.asarray(train.sum(0)).ravel()
    weight = 1.0 / np.sqrt(deg_u[coo.row] * deg_i[coo.col])
    # Gumbel top-k: the same law as torch.multinomial(weight, n, replacement=False), in one partition.
    n = int(len(weight) * keep)
    kept = np.argpartition(-(np.log(weight) + rng.gumbel(size=len(weight))), n)[:n]
    return sym_ui(sp.csr_matrix((coo.data[kept], (coo.row[kept], coo.col[kept])), shape=train.shape))


def _pick_graph(reader: FeatureReader, name: str | None, kind: str) -> str:
    if name is not None:
        return name
    names = reader.graph_names(kind)
    if len(names) != 1:
        raise ValueError(
            f"snapshot {reader.snapshot!r} has {len(names)} {kind} graphs {names}; name one "
            f"(--{'ui' if kind == 'user+item' else 'item'}-graph)"
        )
    return names[0]


def train_model(
    kind: str,
    reader: FeatureReader,
    cfg: TrainConfig,
    train: tuple[np.ndarray, np.ndarray] | None = None,
    valid: UserBatches | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """Train `kind` ("popularity", "mf_bpr", "freedom") on the snapshot's train part, or on `train` pairs
    (unlearning's retain set), early-stopping on validation recall@20; returns a scorer and training facts."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    user, item = train if train is not None else reader.interaction_arrays("train")
    started = time.perf_counter()
    if kind == "popularity":
        counts = torch.from_numpy(np.bincount(item, minlength=reader.n_items).astype(np.float32))
        return (lambda users: counts.expand(len(users), -1)), {"epochs": 0, "seconds": 0.0}
    features = (
        list(reader.manifest["features"] if cfg.features is None else cfg.features)
        if kind == "freedom"
        else []
    )
    data = BprDataset(reader, batch_size=cfg.batch_size, features=features, seed=cfg.seed, pairs=(user, item))
    if kind == "mf_bpr":
        model: MF = MF(reader.n_users, reader.n_items, cfg.dim)
    else:
        train_m = binary_matrix(user, item, (reader.n_users, reader.n_items))
        # The snapshot's stored graph, or for a retain set the same normalisation over the retained pairs.
        ui = (
            reader.graph(_pick_graph(reader, cfg.ui_graph, "user+item")) if train is None else sym_ui(train_m)
        )
        ii = reader.graph(_pick_graph(reader, cfg.item_graph, "item"))
        dims = {f: reader.feature_array(f)[0].shape[1] for f in features}
        model = Freedom(train_m, cfg.dim, ui, ii, dims, cfg.ui_layers, cfg.ii_layers, cfg.edge_keep)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.mf_lr if kind == "mf_bpr" else cfg.lr)
    # workers: persistent spawn processes that send index arrays (stores/reader.py BprLoader)
    loader = data.loader(cfg.workers) if cfg.workers else DataLoader(data, batch_size=None, shuffle=False)
    best, best_state, best_epoch, waited, epoch = -1.0, None, 0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        data.set_epoch(epoch)
        if isinstance(model, Freedom):
            model.resample_edges(rng)
        model.train()
        total = 0.0
        for batch in loader:
            opt.zero_grad()
            loss = model.loss(batch, cfg.l2, cfg.feature_weight)
            loss.backward()
            opt.step()
            total += loss.item()
        if valid is None or (epoch % cfg.eval_every and epoch != cfg.epochs):
            continue
        model.eval()
        score = _scorer(model)
        recall = evaluate(score, valid)["recall@20"]
        log(f"{kind} epoch {epoch}: loss {total / len(data):.4f} valid recall@20 {recall:.4f}")
        if recall > best:
            best, best_epoch, waited = recall, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if cfg.workers:
        loader.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return _scorer(model), {
        "epochs": epoch,
        "best_epoch": best_epoch,
        "valid_recall@20": best,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _scorer(model: MF) -> Callable[[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        users, items = model.embeddings()
    return lambda u: users[u] @ items.T


def compare(
    reader: FeatureReader, cfg: TrainConfig = TrainConfig(), log: Callable[[str], None] = lambda s: None
) -> dict[str, dict]:
    """Train every model of `cfg.models` on the snapshot's split and report its test metrics (and how it trained)."""
    valid, test = reader.user_batches("valid"), reader.user_batches("test")
    out = {}
    for kind in cfg.models:
        score, facts = train_model(kind, reader, cfg, valid=valid, log=log)
        out[kind] = evaluate(score, test) | {"train": facts}
        log(f"{kind}: test recall@20 {out[kind]['recall@20']:.4f} ndcg@20 {out[kind]['ndcg@20']:.4f}")
    return out


# ---- unlearning -------------------------------------------------------------------------------------------------


def unlearning_eval(
    reader: FeatureReader,
    retain: pa.Table,
    cfg: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, dict]:
    """Train each model on the full split, then from scratch on the retain set (the gold unlearned model), and
    report metrics on the forget interactions, the retained train interactions and the test part.

    `retain` is a split table over ids of the snapshot's split (`mmfeat unlearn-split`'s `<name>_gold`): its train
    rows (label 0) are the retain set, forget = full train - retain train, and its validation and test rows, when
    it has any, replace the snapshot's (forgetting all of a user's rows drops their held-out rows too). Forget
    metrics mask the retained train items (a model that forgot ranks forgotten items like unseen ones); retain
    metrics mask nothing; test metrics mask the full train set for both models so both rank the same candidates.
    """
    import pyarrow.compute as pc

    n, m = reader.n_users, reader.n_items

    def pairs(label: int) -> tuple[np.ndarray, np.ndarray]:
        rows = retain.filter(pc.equal(retain["label"], label))
        return reader.user_index(rows["user_id"].to_pylist()), reader.item_index(rows["item_id"].to_pylist())

    r_user, r_item = pairs(0)
    f_user, f_item = reader.interaction_arrays("train")
    forget = ~np.isin(f_user * m + f_item, pair_keys(r_user, r_item, m))
    retain_m = binary_matrix(r_user, r_item, (n, m))
    test_m = binary_matrix(*pairs(2), (n, m)) if pc.any(pc.equal(retain["label"], 2)).as_py() else None
    sets = {
        "forget": UserBatches(
            truth=binary_matrix(f_user[forget], f_item[forget], (n, m)), exclude_matrix=retain_m
        ),
        "retain": UserBatches(truth=retain_m),
        "test": UserBatches(
            truth=reader.positives("test") if test_m is None else test_m,
            exclude_matrix=reader.positives("train"),
        ),
    }
    has_valid = pc.any(pc.equal(retain["label"], 1)).as_py()
    valid = (
        UserBatches(truth=binary_matrix(*pairs(1), (n, m)), exclude_matrix=retain_m) if has_valid else None
    )
    valid = valid or reader.user_batches("valid")
    out: dict[str, dict] = {"counts": {"forget": int(forget.sum()), "retain": int(retain_m.nnz)}}
    for kind in cfg.models:
        for variant, train in (("full", None), ("retain", (r_user, r_item))):
            score, facts = train_model(kind, reader, cfg, train=train, valid=valid, log=log)
            out[f"{kind}/{variant}"] = {name: evaluate(score, b) for name, b in sets.items()} | {
                "train": facts
            }
            log(f"{kind}/{variant}: forget recall@20 {out[f'{kind}/{variant}']['forget']['recall@20']:.4f}")
    return out


def format_table(results: Mapping[str, dict], ks: tuple[int, ...] = KS) -> str:
    """Markdown table of `compare` results, with each model's relative recall@20 gain over the baselines."""
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    bases = [b for b in ("popularity", "mf_bpr") if b in results]
    head = cols + [f"recall@20 vs {b}" for b in bases] + ["epochs (best)", "train s"]
    lines = ["| model | " + " | ".join(head) + " |", "|---" + "|---:" * len(head) + "|"]
    for name, r in results.items():
        t = r["train"]
        gains = [f"{r['recall@20'] / results[b]['recall@20'] - 1:+.1%}" for b in bases]
        cells = (
            [f"{r[c]:.4f}" for c in cols]
            + gains
            + [f"{t['epochs']} ({t.get('best_epoch', '-')})", f"{t['seconds']:.0f}"]
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
