"""Retained artifacts: after erasure, re-pin the split manifests and re-derive the graphs built on erased rows.
Every re-pinned, patched or rebuilt artifact is recorded through the step runner (stores/steps.py `run_step`), so
its manifest and fingerprint are the ones a fresh build would have.

kNN graphs are re-pinned when their items and vectors are the same, else patched (`knn_patch`, single feature)
or rebuilt per feature and fused again; a user-item graph (stored as its train pairs, normalised on read) losing
whole users or items is patched by deleting their rows (`delete_ui_pairs`: a few fragments rewritten), row for row
what `recipes.pipeline.build_ui_graph` writes; other graphs are rebuilt with their parameters. Each keeps its name.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recipes.graphs.knn import KnnConfig, fuse_graphs
from recipes.splits import TEST, TRAIN, VALID
from recipes.unlearning.patch import edges_matrix, knn_patch, knn_retained
from stores.features import feature_table
from stores.lease import write_lease
from stores.missing import missing_counts, present_rows
from stores.steps import Step, run_step

if TYPE_CHECKING:
    from stores.erasure.requests import ForgetScope

_GRAPH_ORDER = {"knn": 0, "user-item": 1, "cooccur": 1, "hyper": 2}


def manifest_body(info: dict) -> dict:
    """A stored manifest without the keys `record_artifact` sets itself: what to re-record it with."""
    return {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}


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
    from recipes.pipeline import graph_step
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
    provenance, missing = {}, {}
    same_nodes = name in (None, info["name"]) and ws.exists(info["table"]) and _same_nodes(ws, info, nodes)
    for feature in params["features"]:
        mat, mask, prov = artifacts.feature_matrix(ws, feature, nodes)
        prov["missing_items"] = missing[feature] = missing_counts({feature: mask})[feature]
        provenance[feature] = prov
        inputs["features"][feature] = {"version": prov["version"], "content_hash": prov["content_hash"]}
        same_nodes &= info["inputs"]["features"].get(feature, {}).get("content_hash") == prov["content_hash"]
    if same_nodes and not any(set(nodes.tolist()) & excluded(f) for f in params["features"]):
        # Same items, same vectors: the stored edges are the retained graph; only the pins move.
        body = manifest_body(info) | inputs | {"feature_provenance": provenance, "missing": missing}
        built = (info["table"], info["table_version"], body)
        out = run_step(ws, Step("graph", info["name"], inputs, params, lambda: built))
        return out | {"recomputed_items": 0, "unchanged": True}
    retained: dict[str, int] = {}

    def build() -> tuple[Any, pa.Table]:
        graphs, masks, retained["recomputed_items"] = [], [], 0
        for feature in params["features"]:
            matrix, keep, recomputed = _retained_feature_graph(
                ws, info, feature, nodes, excluded(feature), cfg
            )
            graphs.append(matrix)
            masks.append(keep)
            retained["recomputed_items"] += recomputed
        weights = params["weights"]
        # the missing-modality policy (stores/missing.py), as build_knn_graph applies it
        single = len(graphs) == 1 and weights[0] == 1.0
        matrix = graphs[0] if single else fuse_graphs(graphs, weights, masks)
        # write_graph only takes the item order from the split: hand it the nodes, not the 10M-row split
        order = pa.table({"user_id": pa.array(nodes, pa.string()), "item_id": pa.array(nodes, pa.string())})
        return matrix, order

    extra = {"feature_provenance": provenance, "retained": retained, "missing": missing}
    out = graph_step(ws, name or info["name"], inputs, params, "item", build, extra, force=True)
    return out | {"recomputed_items": retained["recomputed_items"]}


def _retained_feature_graph(
    ws, info: dict, feature: str, nodes: np.ndarray, gone: set[str], cfg: KnnConfig
) -> tuple[Any, np.ndarray, int]:
    """One feature's kNN graph over `nodes` without the items `gone` nor those lacking the feature, the mask of
    the items it spans, and how many items were searched again: a single-feature graph is patched from its
    stored edges, a fused one rebuilt on the retained items."""
    from stores import artifacts

    mat, mask, _ = artifacts.feature_matrix(ws, feature, nodes)
    keep = ~np.isin(nodes, np.array(sorted(gone), dtype=object)) if gone else np.ones(len(nodes), bool)
    keep = present_rows(mat, mask & keep)
    if len(info["params"]["features"]) == 1 and ws.exists(info["table"]):
        old = ws.read(info["table"], columns=["src", "dst"], version=info["table_version"])
        src, dst, w, recomputed = knn_patch(
            _node_positions(old["src"], nodes), _node_positions(old["dst"], nodes), mat, keep, cfg
        )
    else:
        src, dst, w = knn_retained(mat, keep, cfg)
        recomputed = int(keep.sum())
    return edges_matrix(src, dst, w, len(nodes)), keep, recomputed


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


def _still_present(ws, table: str, column: str, values: set[str]) -> set[str]:
    """Which of `values` the split's current rows still hold in `column` (one filtered column read)."""
    if not values:
        return set()
    flt = pc.field(column).isin(pa.array(sorted(values), pa.string()))
    held = ws.dataset(table).to_table(columns=[column], filter=flt)[column]
    return set(pc.unique(held).to_pylist())


def counts_after_delete(ws, info: dict, gone: pa.Table, scope: ForgetScope) -> dict[str, int]:
    """The counts of split `info` (its manifest, recorded on the version the delete started from) once the rows
    `gone` (their user_id, item_id and label) left it: the recorded counts minus those rows, without reading
    the split. A user (item) the scope names is gone with all its rows; another one of the deleted rows is
    gone only when the split no longer holds it (a filtered read of that column, for those ids only).
    Equals `_split_counts` of the split after the delete."""
    old = info["counts"]
    labels = (
        {r["values"]: r["counts"] for r in pc.value_counts(gone["label"]).to_pylist()} if len(gone) else {}
    )
    out = dict(old) | {"rows": old["rows"] - gone.num_rows}
    for key, label in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        out[key] = old[key] - labels.get(label, 0)
    for key, named in (("users", set(scope.users)), ("items", set(scope.items))):
        column = f"{key[:-1]}_id"
        ids = set(pc.unique(gone[column]).to_pylist())
        unsure = ids - named
        out[key] = (
            old[key] - len(ids & named) - len(unsure - _still_present(ws, info["table"], column, unsure))
        )
    return out


def delete_ui_pairs(ws, info: dict, users: set[str], items: set[str]) -> tuple[int, int, int]:
    """Remove whole users and items from stored pairs-layout user-item graph `info` (stores/artifacts.py
    `write_ui_pairs`): their rows are deleted and the fragments that held them rewritten (`compact`, which appends
    the rewritten fragments), the other rows are kept as they are; the weights are derived on read from the pairs
    left, so the table holds the set of rows a rebuild on the retained split writes. Returns (version, pairs removed, pairs left).

    The caller holds the workspace's write lease (erasure does)."""
    from stores.erasure.physical import compact
    from stores.schema import sql_string

    table = info["table"]
    clauses = [
        f"({side}_kind = '{kind}' AND {side} IN ({', '.join(sql_string(k) for k in sorted(keys))}))"
        for side, kind, keys in (("src", "user", users), ("dst", "item", items))
        if keys
    ]
    before = ws.dataset(table).count_rows()
    if clauses:
        ws.open(table).delete(" OR ".join(clauses))
        compact(ws, table)
    left = ws.dataset(table).count_rows()
    return ws.version(table), before - left, left


def _save_patched_ui(ws, info: dict, split_version: int, patched: tuple[int, int, int], nodes: int) -> dict:
    from stores import artifacts

    version, removed, left = patched
    inputs = {"split": info["split"], "split_version": split_version}
    body = manifest_body(info) | inputs | artifacts.ui_pairs_shape(left, nodes, info["params"]["norm"])
    body |= {"retained": {"edges_removed": 2 * removed}}
    built = (info["table"], version, body)
    return run_step(ws, Step("graph", info["name"], inputs, info["params"], lambda: built), force=True)


def _ui_patchable(info: dict, split_manifests: dict[str, dict], scope: ForgetScope | None) -> bool:
    """A pairs-layout user-item graph on the split version erasure started from, losing whole users or items:
    patched by deleting their rows. Others (a graph stored normalised, by an older version) are rebuilt."""
    from stores import artifacts

    split = split_manifests.get(info.get("split"))
    return (
        info["params"]["type"] == "user-item"
        and info.get("layout") == artifacts.UI_PAIRS
        and scope is not None
        and not (scope.pairs or scope.before)
        and split is not None
        and info.get("split_version") == split["table_version"]
    )


def prepare_refresh(
    ws,
    changed: set[str],
    scope: ForgetScope | None,
    deleted: dict[str, pa.Table] | None = None,
    before: dict[str, int] | None = None,
) -> dict:
    """The heavy reads of `refresh_artifacts` that need only the rows left, not the final versions: the counts
    of the changed splits. Erasure runs it while it compacts.

    `deleted` (the rows this attempt's delete removed, per table) and `before` (the table versions it started
    from) let a split whose manifest pins that version and records its counts be counted by subtraction
    (`counts_after_delete`) instead of a full read."""
    from stores import artifacts

    splits = {i["name"]: i for i in artifacts.list_artifacts(ws, "split") if i["table"] in changed}
    out: dict[str, dict] = {"counts": {}}
    deleted, before = deleted or {}, before or {}
    for name, info in splits.items():
        table = info["table"]
        if (
            scope is not None
            and table in deleted
            and {"user_id", "item_id", "label"} <= set(deleted[table].column_names)
            and {"rows", "users", "items", "train", "valid", "test"} <= set(info.get("counts") or {})
            and before.get(table) == info["table_version"]
        ):
            out["counts"][name] = counts_after_delete(ws, info, deleted[table], scope)
        else:
            out["counts"][name] = _split_counts(ws.read(table, columns=["user_id", "item_id", "label"]))
    return out


def _repin_graph(ws, info: dict, split_version: int) -> dict:
    """Same edges on a new split version (no node left, no input vector changed): move the pins only."""
    inputs = info["inputs"] | {"split_version": split_version}
    body = manifest_body(info) | {"split_version": split_version}
    built = (info["table"], info["table_version"], body)
    return run_step(ws, Step("graph", info["name"], inputs, info["params"], lambda: built), force=True)


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
    from stores import artifacts

    report: dict[str, dict] = {"splits": {}, "graphs": {}, "failed": {}}
    prepared = prepared or {"counts": {}}
    old_manifests, counts = {}, {}
    for info in artifacts.list_artifacts(ws, "split"):
        if not ws.exists(info["table"]) or (info["table"] not in changed and "interactions" not in changed):
            continue
        body = manifest_body(info)
        version = ws.version(info["table"])
        inputs = body.get("inputs", {})
        if "interactions" in inputs and ws.exists("interactions"):
            inputs = inputs | {"interactions": ws.version("interactions")}
        if body.get("base_split") and f"split_{body['base_split']}" in changed:
            body["base_split_version"] = ws.version(f"split_{body['base_split']}")
        if info["table"] in changed:
            body["counts"] = counts[info["name"]] = prepared["counts"].get(info["name"]) or _split_counts(
                ws.read(info["table"], columns=["user_id", "item_id", "label"])
            )
            old_manifests[info["name"]] = info
        body["erasures"] = [*body.get("erasures", []), request_id]
        built = (info["table"], version, body)
        run_step(
            ws, Step("split", info["name"], inputs, body.get("params", {}), lambda b=built: b), force=True
        )
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
        feats = {feature_table(f) for f in params.get("features", [])}
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
                patched = None
                if ws.version(info["table"]) == info["table_version"]:
                    with write_lease(ws, f"artifact:{info['table']}"):
                        patched = delete_ui_pairs(ws, info, set(scope.users), set(scope.items))
                if patched is None:  # written since its manifest was recorded
                    out, action = rebuild_graph(ws, info, split), "rebuilt"
                else:
                    out = _save_patched_ui(ws, info, split_version, patched, nodes)
                    action = f"patched ({2 * patched[1]} edges removed, weights renormalised on read)"
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
