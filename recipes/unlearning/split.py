"""Unlearning: forget requests, what they match, forget/retain splits, benchmark scenarios and retained graphs.

A `ForgetRequest` names what to forget: users, items, user-item pairs, one modality of some items, interactions
before a time, or items by attribute. `resolve` turns it into a `ForgetScope` (attribute requests become item
lists) and `interaction_mask` says which interaction rows the scope covers. `stores/erasure/` deletes the scope
from every table; `refresh_artifacts` re-derives the splits and graphs built from the erased rows.

Research side: `forget_retain` cuts a split into forget = the matching rows (train only, or all parts), retain =
train minus forget, and gold = retain + the evaluation parts (the retrain-from-scratch dataset). Scenario
generators follow their published rules:

- CURE4Rec (`read.py: delete`): `int(n_users * p / 100)` users of the train part, random
  (`RandomState(seed).choice(users, n, replace=False)` over users ordered by train degree, high to low), most
  active ("core": the highest train degrees) or least active ("edge": the lowest); all their interactions. Ties
  in degree keep the order of each user's first train row, as pandas >= 3 `value_counts` does
  (`scenarios.train_degrees`).
- L2UnRank (`main.py: compute_edges_to_remove`): "interaction": `int(n_users * p / 100)` random users, each losing
  `max(1, int(n_u * 0.2))` random train interactions; "item": `int(n_items * p / 100)` random items with all their
  train interactions. numpy RandomState(seed) replaces the paper's torch.randperm.
- ERASE-style sensitive category: the users who interacted with items of a sensitive category (an attribute
  value), `max(1, int(n * p / 100))` of them drawn with RandomState(seed), forgetting their interactions with
  those items; the draw order makes sequential requests of `batch_users` users.

The retained kNN graph is patched (`knn_patch`): items whose top-k held a removed item are recomputed against the
retained items, every other item keeps its neighbours (re-weighted), which equals `knn_retained`, a rebuild on the
retained items. A user-item graph losing whole users or items loses their rows (`graphs.delete_ui_pairs`: it is
stored as its train pairs, normalised on read), the same set of rows `pipeline.build_ui_graph` writes; other graphs
are rebuilt with their parameters.

The parts live beside this module, by role: stores/erasure/requests.py (requests, scopes, matching: the data
model erasure shares), scenarios.py (forget/retain cuts and the scenario generators), patch.py (patching math)
and graphs.py (re-deriving stored graphs and splits). This module stores unlearning splits
(`build_unlearning_split`).

    >>> scope = resolve(ForgetRequest("r1", "user", users=("1",)), items)
    >>> cut = forget_retain(split, interaction_mask(split, scope), parts="all")
"""

from __future__ import annotations

import dataclasses

from recipes.unlearning.graphs import (
    rebuild_graph,
    retained_knn_graph,
)
from recipes.unlearning.scenarios import (
    ScenarioConfig,
    forget_retain,
    select,
)
from stores.ids import id_maps

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
