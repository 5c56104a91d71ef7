"""The recipe steps with their store I/O at the edges: read pinned inputs, call the pure recipe, save a versioned
artifact with its manifest. Each step goes through the step runner (stores/steps.py `run_step`), which skips the
work when an artifact of the same name was already built from the same input versions, feature content and
parameters (what `refresh` relies on).

    >>> build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=42))
    >>> build_knn_graph(ws, "main", ["clip_image", "text"], k=10, norm="freedom", weights=[0.1, 0.9])
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recipes import distributed, splits, streamed
from recipes.graphs import cooccur, hypergraph, knn_ann
from recipes.graphs import knn as knn_graph
from recipes.graphs import user_item as ui_graph
from recipes.graphs.user_item import edges_to_csr
from recipes.semantic_ids import SemanticIdConfig, fuse_vectors, quantise
from stores import artifacts
from stores.features import feature_table
from stores.ids import id_maps
from stores.missing import POLICY_VERSION, fill_missing, missing_counts, present_rows
from stores.steps import Step, run_step
from stores.workspace import Workspace


def build_split(
    ws: Workspace,
    name: str,
    cfg: splits.SplitConfig,
    interactions_version: int | None = None,
    force: bool = False,
    engine: str = "auto",
) -> dict:
    """Split the workspace's interactions (at a pinned version) and store `split_<name>` with its manifest.
    engine "memory" reads the table whole, "stream" in batches (recipes/streamed.py: same rows, bounded memory),
    "auto" streams above streamed.STREAM_ABOVE_ROWS rows, "ray" runs Ray tasks over partitions of the table
    (recipes/distributed.py, on the cluster at $RAY_ADDRESS or a local Ray: same rows)."""
    version = ws.version("interactions") if interactions_version is None else interactions_version
    if version is None:
        raise KeyError("the workspace has no interactions yet; run `mmfeat ingest ...` first")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")

    def build() -> tuple[str, int, dict]:
        if engine == "ray":
            stream, keys, counts = _on_ray(
                "split on Ray", lambda tasks: distributed.split_partitioned(ws, version, cfg, tasks)
            )
            return f"split_{name}", artifacts.write_split(ws, name, stream, keys), {"counts": counts}
        rows = ws.dataset("interactions", version).count_rows()
        if engine == "stream" or (engine == "auto" and rows > streamed.STREAM_ABOVE_ROWS):
            stream, keys, counts = streamed.split_stream(ws, version, cfg)
            return f"split_{name}", artifacts.write_split(ws, name, stream, keys), {"counts": counts}
        split = splits.make_split(ws.read("interactions", version=version), cfg)
        return f"split_{name}", artifacts.write_split(ws, name, split), {"counts": splits.split_counts(split)}

    return run_step(ws, Step("split", name, {"interactions": version}, dataclasses.asdict(cfg), build), force)


ENGINES = ("auto", "memory", "stream", "ray")
"""Engines of the split and user-item graph steps."""


def _on_ray(what: str, run: Callable):
    """run(tasks) with Ray tasks as the runner, Ray's failures classified (extractors/ray_session.py)."""
    from extractors.partition_tasks import RayTasks
    from extractors.ray_session import ray_errors

    with ray_errors(what):
        return run(RayTasks())


def _split_inputs(ws: Workspace, split_name: str) -> dict:
    """The pins of a graph built on split `split_name`: its name and the version its manifest names."""
    return {
        "split": split_name,
        "split_version": artifacts.manifest(ws, "split", split_name)["table_version"],
    }


def _load(ws: Workspace, inputs: dict) -> pa.Table:
    return artifacts.load_split(ws, inputs["split"], inputs["split_version"])


def graph_step(
    ws: Workspace,
    name: str,
    inputs: dict,
    params: dict,
    node_kind: str,
    build: Callable[[], tuple[sp.spmatrix, pa.Table]],
    extra: dict | None = None,
    force: bool = False,
) -> dict:
    """Store graph `name` through the step runner. `build()` runs only when inputs or params changed and returns
    the matrix and the table that orders its nodes (the split, or any table with its user_id/item_id columns)."""

    def write() -> tuple[str, int, dict]:
        matrix, nodes = build()
        version, shape = artifacts.write_graph(ws, name, matrix, nodes, node_kind)
        return f"graph_{name}", version, inputs | (extra or {}) | shape

    return run_step(ws, Step("graph", name, inputs, params, write), force)


def build_ui_graph(
    ws: Workspace,
    split_name: str,
    norm: str = "sym",
    name: str | None = None,
    force: bool = False,
    engine: str = "auto",
) -> dict:
    """User-item graph from the split's train rows: raw, symmetric (FREEDOM/LightGCN) or LATTICE-normalised.
    engine as in `build_split` ("ray": the train matrix summed from per-partition blocks built by Ray tasks)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; expected one of {ENGINES}")
    inputs = _split_inputs(ws, split_name)

    def write() -> tuple[str, int, dict]:
        table, version = f"split_{inputs['split']}", inputs["split_version"]
        if engine == "ray":
            train, (users, items) = _on_ray(
                "user-item graph on Ray",
                lambda tasks: distributed.train_matrix_partitioned(ws, table, version, tasks),
            )
        elif engine == "stream" or (
            engine == "auto" and ws.dataset(table, version).count_rows() > streamed.STREAM_ABOVE_ROWS
        ):  # batches: bounded memory
            train, (users, items) = streamed.train_matrix_stream(ws, table, version)
        else:
            split = _load(ws, inputs)
            train, (users, items) = ui_graph.train_matrix(split), id_maps(split)
            del split
        # stored as its train pairs, normalised on read: a forget deletes its rows instead of re-weighting all
        graph_version, shape = artifacts.write_ui_pairs(ws, graph, train, users, items, norm)
        return f"graph_{graph}", graph_version, inputs | shape

    graph = name or f"{split_name}_ui_{norm}"
    params = {"type": "user-item", "norm": norm}
    return run_step(ws, Step("graph", graph, inputs, params, write), force)


def build_knn_graph(
    ws: Workspace,
    split_name: str,
    features: list[str],
    k: int = 10,
    norm: str = "freedom",
    weights: list[float] | None = None,
    symmetric: bool = False,
    self_loops: bool = True,
    name: str | None = None,
    force: bool = False,
    method: str = "exact",
    engine: str = "local",
    ann_index: str = "ivf_flat",
) -> dict:
    """Item-item cosine top-k graph per feature, fused with `weights` when several features are given.

    Items lacking a feature follow stores/missing.py: each feature's graph spans only the items that have it,
    fused weights are renormalised per item over the features it has, and the manifest's `missing` counts them.
    method "ann" searches with faiss (recipes/graphs/knn_ann.py; its recall@k on a sample lands in the
    manifest's `ann`), "auto" does so above knn_ann.AUTO_ANN_ITEMS items; engine "ray" runs the exact search
    over Ray actors by query block (extractors/knn_actors.py, $RAY_ADDRESS), with the same result."""
    if method not in ("exact", "ann", "auto"):
        raise ValueError(f"method={method!r}; expected 'exact', 'ann' or 'auto'")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine={engine!r}; expected 'local' or 'ray'")
    if weights is None:
        weights = [1.0 / len(features)] * len(features)
    if len(weights) != len(features):
        raise ValueError(f"{len(features)} features but {len(weights)} weights; give one weight per feature")
    name = name or f"{split_name}_knn_{'_'.join(features)}_k{k}_{norm}"  # Lance table names: no '+'
    inputs = _split_inputs(ws, split_name)
    split = _load(ws, inputs)
    _, items = id_maps(split)
    mats, masks, provenance = {}, {}, {}
    for feature in features:  # the vectors' content hash is an input: read them before deciding to skip
        table = feature_table(feature)
        if not ws.exists(table):
            raise KeyError(f"feature {feature!r} not found (table {table}); run `mmfeat encode ...` first")
        mats[feature], mask, provenance[feature] = artifacts.feature_matrix(ws, feature, items)
        # the content hash covers the mask, so who lacks the feature is part of the fingerprint
        masks[feature] = present_rows(mats[feature], mask)
    missing = missing_counts(masks)
    for feature in features:
        provenance[feature]["missing_items"] = missing[feature]
    inputs = inputs | {
        "features": {
            f: {"version": p["version"], "content_hash": p["content_hash"]} for f, p in provenance.items()
        }
    }
    params = {
        "type": "knn",
        "features": features,
        "weights": weights,
        "k": k,
        "norm": norm,
        "symmetric": symmetric,
        "self_loops": self_loops,
        "missing_policy": POLICY_VERSION,
    }
    if method == "auto":
        method = "ann" if len(items) > knn_ann.AUTO_ANN_ITEMS else "exact"
    ann_cfg = knn_ann.AnnConfig(index=ann_index)
    if method == "ann":  # exact graphs keep the fingerprint they had before ANN existed
        params |= {"method": "ann", "ann_index": ann_index, "target_recall": ann_cfg.target_recall}
    extra = {"feature_provenance": provenance, "missing": missing}

    cfg = knn_graph.KnnConfig(k=k, norm=norm, symmetric=symmetric, self_loops=self_loops)

    def on_ray(x: np.ndarray, kk: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
        from extractors.knn_actors import ray_map_blocks

        return knn_graph.knn_topk(
            x,
            kk,
            exclude_self=exclude_self,
            block_rows=cfg.block_rows,
            max_tile=cfg.max_tile,
            map_blocks=ray_map_blocks,
        )

    def search() -> knn_graph.TopK | None:
        if method == "ann":
            return knn_ann.AnnSearch(ann_cfg)
        return on_ray if engine == "ray" else None

    def build() -> tuple[sp.spmatrix, pa.Table]:
        graphs, ann = [], {}
        for f in features:
            searcher = search()
            graphs.append(knn_graph.knn_graph(mats[f], cfg, masks[f], searcher))
            if isinstance(searcher, knn_ann.AnnSearch):
                ann[f] = searcher.info
        if ann:  # read by graph_step's write() after build() returns
            extra["ann"] = ann[features[0]] if len(features) == 1 else ann
        if len(graphs) == 1 and weights[0] == 1.0:
            return graphs[0], split
        return knn_graph.fuse_graphs(graphs, weights, [masks[f] for f in features]), split

    return graph_step(ws, name, inputs, params, "item", build, extra, force)


def build_cooccur_graph(
    ws: Workspace,
    split_name: str,
    kind: str = "item",
    k: int = 10,
    weight: str = "count",
    name: str | None = None,
    force: bool = False,
) -> dict:
    """Item-item (shared users) or user-user (shared items) co-occurrence top-k graph from train rows."""
    if kind not in ("item", "user"):
        raise ValueError(f"kind={kind!r}; expected 'item' or 'user'")
    inputs = _split_inputs(ws, split_name)

    def build() -> tuple[sp.spmatrix, pa.Table]:
        split = _load(ws, inputs)
        users, items = id_maps(split)
        if kind == "item":
            return edges_to_csr(cooccur.item_cooccurrence(split, k=k, weight=weight), len(items)), split
        return edges_to_csr(cooccur.user_cooccurrence(split, k=k, weight=weight), len(users)), split

    params = {"type": "cooccur", "kind": kind, "k": k, "weight": weight}
    name = name or f"{split_name}_cooccur_{kind}_k{k}_{weight}"
    return graph_step(ws, name, inputs, params, kind, build, force=force)


def build_hypergraph(
    ws: Workspace,
    split_name: str,
    kind: str = "user",
    knn_graphs: list[str] | None = None,
    name: str | None = None,
    force: bool = False,
) -> dict:
    """MMHCL hypergraph operators: user-user from R R^T, or item-item from the incidence of stored kNN graphs."""
    if kind not in ("user", "item"):
        raise ValueError(f"kind={kind!r}; expected 'user' or 'item'")
    inputs = _split_inputs(ws, split_name)
    params = {"type": "hyper", "kind": kind, "knn_graphs": knn_graphs or []}
    if kind == "item":
        if not knn_graphs:
            raise ValueError("an item hypergraph needs --knn GRAPH (one or more stored kNN graphs)")
        inputs = inputs | {
            "graphs": {g: artifacts.manifest(ws, "graph", g)["table_version"] for g in knn_graphs}
        }

    def build() -> tuple[sp.spmatrix, pa.Table]:
        split = _load(ws, inputs)
        if kind == "user":
            return hypergraph.mmhcl_user_graph(split), split
        edge_tables = [ui_graph.csr_to_edges(artifacts.load_graph(ws, g)[0]) for g in knn_graphs]
        return hypergraph.mmhcl_item_graph(edge_tables, len(id_maps(split)[1])), split

    return graph_step(ws, name or f"{split_name}_hyper_{kind}", inputs, params, kind, build, force=force)


SEMANTIC_MISSING = ("mean", "drop")


def semantic_id_table(name: str) -> str:
    """The table of semantic-ID artifact `name`."""
    return f"semantic_ids_{name}"


def build_semantic_ids(
    ws: Workspace,
    name: str,
    features: list[str],
    cfg: SemanticIdConfig,
    weights: list[float] | None = None,
    missing: str = "mean",
    force: bool = False,
) -> dict:
    """Semantic IDs of the catalogue's items from `features` (recipes/semantic_ids.py), stored as table
    `semantic_ids_<name>` (item_id, codes [levels], suffix) with a manifest of kind "semantic_ids" that pins the
    features' content hashes: a re-run over unchanged features is skipped and keeps its codes and version.

    Missing-modality policy: an item with none of the features gets no codes (the manifest counts it; exports
    list it). With several features, an item lacking some has those blocks filled with the mean of the items that
    have them ("mean", stores.missing.fill_missing) or gets no codes ("drop")."""
    if missing not in SEMANTIC_MISSING:
        raise ValueError(f"missing={missing!r}; expected one of {', '.join(SEMANTIC_MISSING)}")
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"semantic-ID name {name!r} is not allowed; use letters, digits, '_' or '-'")
    weights = weights or [1.0 / len(features)] * len(features)
    if len(weights) != len(features):
        raise ValueError(f"{len(features)} features but {len(weights)} weights; give one weight per feature")
    if not ws.exists("items"):
        raise KeyError("the workspace has no items yet; run `mmfeat ingest ...` first")
    column = ws.read("items", columns=["item_id"])["item_id"]
    items = np.sort(np.asarray(column.to_pylist(), dtype=object))
    mats, masks, provenance = {}, {}, {}
    for feature in features:  # the vectors' content hash is an input: read them before deciding to skip
        if not ws.exists(feature_table(feature)):
            raise KeyError(
                f"feature {feature!r} not found (table {feature_table(feature)}); run `mmfeat encode ...`"
            )
        mats[feature], mask, provenance[feature] = artifacts.feature_matrix(ws, feature, items)
        masks[feature] = present_rows(mats[feature], mask)
    counts = missing_counts(masks)
    inputs = {
        "items_hash": hashlib.sha256("\n".join(items).encode()).hexdigest(),
        "features": {
            f: {"version": p["version"], "content_hash": p["content_hash"]} for f, p in provenance.items()
        },
    }
    params = dataclasses.asdict(cfg) | {
        "features": features,
        "weights": weights,
        "missing": missing,
        "missing_policy": POLICY_VERSION,
    }

    def build() -> tuple[str, int, dict]:
        have = np.stack([masks[f] for f in features], 1)
        coded = have.all(1) if missing == "drop" else have.any(1)
        blocks = [fill_missing(mats[f], masks[f], "mean")[0][coded] for f in features]
        sid = quantise(fuse_vectors(blocks, weights), cfg)
        data = pa.table(
            {
                "item_id": pa.array(items[coded], pa.string()),
                "codes": pa.FixedSizeListArray.from_arrays(
                    pa.array(sid.codes.ravel(), pa.int32()), cfg.levels
                ),
                "suffix": pa.array(sid.suffix, pa.int32()),
            }
        )
        table = semantic_id_table(name)
        body = {"metrics": sid.metrics, "missing": counts, "uncoded_items": int((~coded).sum())}
        return table, artifacts.write_table(ws, table, data), body

    return run_step(ws, Step("semantic_ids", name, inputs, params, build), force)


def export(
    ws: Workspace,
    split_name: str,
    fmt: str,
    out: str | Path,
    features: dict[str, str] | None = None,
    name: str | None = None,
    user_graph_k: int = 0,
    missing: str = "mean",
    semantic_ids: str | None = None,
):
    """Export a split (and aligned features) as MMRec, RecBole or PyG; id maps are written beside the data.

    `features` maps an output name to a feature (image_feat -> clip_image); items lacking one follow `missing`
    (stores.missing.fill_missing: mean, zero or drop) and `report.warnings` says how many. RecBole's .item and
    .user carry the items' title and every attribute, and every user attribute. `semantic_ids` names a
    semantic-ID artifact (`build_semantic_ids`) written alongside: MMRec `semantic_ids.tsv`, RecBole `sid:token_seq`."""
    from recipes import exports

    if fmt not in ("mmrec", "recbole", "pyg"):
        raise ValueError(f"format {fmt!r}; expected mmrec, recbole or pyg")
    if fmt == "recbole" and features:
        raise ValueError(
            "RecBole atomic files carry no feature vectors; drop --feature or export mmrec / pyg"
        )
    split = artifacts.load_split(ws, split_name)
    _, items = id_maps(split)
    feats = {}
    for feature in dict.fromkeys((features or {}).values()):
        if not ws.exists(feature_table(feature)):
            raise KeyError(f"feature {feature!r} not found; run `mmfeat encode ...` first or fix --feature")
        matrix, mask, _ = artifacts.feature_matrix(ws, feature, items)
        feats[feature] = (items[mask], matrix[mask])
    name = name or split_name
    if semantic_ids is not None and fmt == "pyg":
        raise ValueError("--semantic-ids is written by the mmrec and recbole exports; drop it for pyg")
    sids = artifacts.load_semantic_ids(ws, semantic_ids) if semantic_ids is not None else None
    # recorded before writing: forget lists it even if this stops half-way
    from stores.erasure.log import record_export

    record_export(ws, Path(out) / f"{name}.pt" if fmt == "pyg" else out, fmt, split_name)
    if fmt == "mmrec":
        user_graph = None
        if user_graph_k:  # over the users that remain once --missing drop has removed items
            kept = exports.fill_features(split, feats, features or {}, missing).split
            user_graph = cooccur.user_cooccurrence(kept, k=user_graph_k)
        return exports.export_mmrec(
            split,
            feats,
            out,
            name,
            feature_files=features or {},
            user_graph=user_graph,
            missing=missing,
            semantic_ids=sids,
        )
    if fmt == "recbole":
        item_table = exports.attribute_columns(
            ws.read("items", columns=["item_id", "title", "attributes"]), "item_id", ["title"]
        )
        user_table = (
            exports.attribute_columns(ws.read("users", columns=["user_id", "attributes"]), "user_id")
            if ws.exists("users")
            else None
        )
        return exports.export_recbole(split, out, name, items=item_table, users=user_table, semantic_ids=sids)
    return exports.export_pyg(
        split, feats, Path(out) / f"{name}.pt", feature_attrs=features or {}, missing=missing
    )


def feature_names(ws: Workspace) -> list[str]:
    return [
        n[len(artifacts.VECTOR_PREFIX) :] for n in ws.table_names() if n.startswith(artifacts.VECTOR_PREFIX)
    ]


__all__ = [
    "build_cooccur_graph",
    "build_hypergraph",
    "build_knn_graph",
    "build_semantic_ids",
    "build_split",
    "build_ui_graph",
    "export",
    "feature_names",
    "graph_step",
]
