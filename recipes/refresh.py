"""The refresh's steps over a pipeline config (recipes/config.py), each one `run_step` call (stores/steps.py):
ingest a source, extract a feature, build a configured split or graph, export, publish the snapshot, write the
report. Each skips while its inputs are unchanged. flows/pipeline.py wraps these in Prefect tasks; they run the
same without Prefect.

    >>> ingest_source(ws, cfg, "demo")          # {"source": "demo", "skipped": True, ...} the second time
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recipes.config import (
    AmazonSource,
    CooccurGraph,
    DemoSource,
    HyperGraph,
    KnnGraph,
    PipelineConfig,
    UserItemGraph,
    demo_dir,
    ensure_demo_catalog,
    graph_name,
    open_source,
    output_path,
    source_files,
)
from stores import artifacts
from stores.errors import TerminalError
from stores.features import CAPTION_FEATURE, feature_table
from stores.steps import Built, Step, last_manifest, run_step, unchanged
from stores.workspace import Workspace

STEP = "step"  # artifacts kind of the refresh's step records
INPUT_TABLES = {"image": ("items", "item_images"), "text": ("items",), "caption": ("items", "captions")}


def _stat_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _open(cfg: PipelineConfig, spec: Any, ws: Workspace) -> Any:
    """The source opened by its adapter; a source that cannot be read is terminal, with the adapter's message
    (the text `mmfeat ingest` prints for the same problem)."""
    from recipes.ingest.records import SourceError

    try:
        return open_source(cfg, spec, ws.uri)
    except SourceError as exc:
        raise TerminalError(f"source {spec.name!r}: {exc}") from None


def _ingest_step(spec: Any, files: list[Path], build: Callable[[], Built]) -> Step:
    return Step(
        STEP, f"ingest:{spec.name}", {"files": _stat_digest(files)}, spec.model_dump(), build, lambda _: True
    )


def _extract_step(ws: Workspace, cfg: PipelineConfig, feature: str, build: Callable[[], Built]) -> Step:
    e = cfg.extractor(feature)
    inputs = {name: ws.version(name) for name in INPUT_TABLES[e.source]}
    params = {"extractor": e.model_dump(), "engine": cfg.run.engine}
    fresh = lambda done: done.get("output_version") == ws.version(feature_table(feature))  # noqa: E731
    return Step(STEP, f"extract:{feature}", inputs, params, build, fresh)


def _unbuilt() -> Built:
    raise AssertionError("a step built only to be compared is never run")


def models_to_warm(
    ws: Workspace, cfg: PipelineConfig, force: bool = False, serve_forget: bool = True
) -> list:
    """The extractor specs of the extractions a refresh is about to run, in the config's order, as far as can be
    told before its ingest: all of them when forced, when a source's files changed or a forget request is to be
    served (either can change every extraction's input), else those whose step is not fresh, with the
    caption-fed ones when the captioner is to run. None when it cannot tell (a source the ingest will report).
    The refresh warms their models while it ingests (extractors/model_pool.py `ModelPool.warm`); a wrong guess
    costs a model load or a later start, never a result."""
    from extractors.registry import config_spec
    from stores.erasure.log import logged, pending_requests

    def changed() -> bool:
        for spec in cfg.sources:
            files = source_files(cfg, spec, ws.uri)
            if (
                not all(p.exists() for p in files)
                or unchanged(ws, _ingest_step(spec, files, _unbuilt)) is None
            ):
                return True
        served = lambda rid: (logged(ws, rid) or {}).get("status") == "done"  # noqa: E731
        return serve_forget and (
            bool(pending_requests(ws)) or not all(served(r.request_id) for r in cfg.forget)
        )

    def stale(feature: str) -> bool:
        return unchanged(ws, _extract_step(ws, cfg, feature, _unbuilt)) is None

    try:
        everything = force or changed()
        todo = {e.feature for e in cfg.extract if everything or stale(e.feature)}
    except Exception:
        return []
    captions = CAPTION_FEATURE in todo
    wanted = [e for e in cfg.extract if e.feature in todo or (captions and e.source == "caption")]
    return [
        config_spec(e.kind, e.model, e.pretrained, e.prompt, e.max_new_tokens, e.caption_engine)
        for e in wanted
    ]


def ingest_source(ws: Workspace, cfg: PipelineConfig, source: str, force: bool = False) -> dict:
    """Ingest one configured source unless its files (paths, sizes, mtimes) are as at its last ingest."""
    from recipes.ingest.load import ingest

    spec = cfg.source(source)
    if isinstance(spec, DemoSource):
        ensure_demo_catalog(demo_dir(cfg, spec, ws.uri), spec)
    files = source_files(cfg, spec, ws.uri)
    if not all(p.exists() for p in files):
        _open(cfg, spec, ws)  # the adapter names the missing path and the fix
        raise TerminalError(
            f"source {source!r}: {[str(p) for p in files if not p.exists()]} not found; fix its paths"
        )
    out: dict[str, Any] = {"source": source}

    if isinstance(spec, AmazonSource):  # ingest, then the review texts of the stored interactions
        from recipes.ingest.amazon import ingest_amazon as ingest

    def build() -> tuple[str, int, dict]:
        report = ingest(ws, _open(cfg, spec, ws))
        written = {name: r.written for name, r in report.tables.items()}
        versions = {name: r.version for name, r in report.tables.items()}
        out.update(
            written=sum(written.values()),
            by_table=written,
            versions=versions,
            quarantined=sum(t.quarantined for t in report.files.values()),
        )
        return "items", ws.version("items") or 0, {"versions": versions, "written": written}

    info = run_step(ws, _ingest_step(spec, files, build), force)
    if info["skipped"]:
        return out | {"skipped": True, "written": 0, "versions": info["versions"]}
    return out | {"skipped": False}


def extract_feature(
    ws: Workspace, cfg: PipelineConfig, feature: str, force: bool = False, concurrency: int | None = None
) -> dict:
    """Run one configured extractor unless its input tables and its output table are at the versions of its
    last run. Model weights are checked before any work (`extractors.registry.preflight`)."""
    from extractors.ray_session import ray_errors
    from extractors.registry import config_spec, preflight
    from extractors.runner import run_extraction

    e = cfg.extractor(feature)
    table = feature_table(feature)
    spec = config_spec(e.kind, e.model, e.pretrained, e.prompt, e.max_new_tokens, e.caption_engine)
    out: dict[str, Any] = {"feature": feature, "table": table}

    def build() -> tuple[str, int, dict]:
        preflight(spec)
        with ray_errors(f"extract {feature}"):
            summary = run_extraction(
                ws,
                feature,
                spec,
                source=e.source,
                fields=tuple(e.fields),
                chunk_rows=e.chunk_rows,
                batch_size=e.batch_size,
                concurrency=concurrency or e.concurrency,
                engine=cfg.run.engine,
                progress=False,
            )
        version = ws.version(table)
        out.update({k: v for k, v in summary.to_dict().items() if k not in ("provenance", "inputs")})
        out.update(
            unchanged=summary.skipped,
            written=summary.done + summary.failed + summary.pruned,
            model=summary.provenance.get("model"),
            revision=summary.provenance.get("revision"),
        )
        return table, version or 0, {"output_version": version}

    info = run_step(ws, _extract_step(ws, cfg, feature, build), force)
    if info["skipped"]:
        return out | {"skipped": True, "model_calls": 0, "written": 0, "version": ws.version(table)}
    return out | {"skipped": False, "version": info["output_version"]}


_BRIEF = ("kind", "name", "table", "table_version", "counts", "nodes", "edges", "split", "split_version")


def brief(info: dict) -> dict:
    """The part of an artifact's manifest a run summary shows."""
    return {k: info[k] for k in _BRIEF if k in info} | {"skipped": bool(info.get("skipped"))}


def build_split(ws: Workspace, cfg: PipelineConfig, name: str, interactions_version: int | None) -> dict:
    from recipes import pipeline

    spec = next(s for s in cfg.splits if s.name == name)
    return brief(
        pipeline.build_split(
            ws, name, spec.to_split_config(), interactions_version, engine=cfg.run.recipes_engine
        )
    )


def build_graph(ws: Workspace, cfg: PipelineConfig, name: str) -> dict:
    from recipes import pipeline as rp

    g = next(g for g in cfg.graphs if graph_name(g) == name)
    if isinstance(g, UserItemGraph):
        info = rp.build_ui_graph(ws, g.split, g.norm, name, engine=cfg.run.recipes_engine)
    elif isinstance(g, KnnGraph):
        info = rp.build_knn_graph(
            ws, g.split, list(g.features), g.k, g.norm, g.weights, g.symmetric, g.self_loops, name
        )
    elif isinstance(g, CooccurGraph):
        info = rp.build_cooccur_graph(ws, g.split, g.kind, g.k, g.weight, name)
    else:
        assert isinstance(g, HyperGraph)
        info = rp.build_hypergraph(ws, g.split, g.kind, list(g.knn) or None, name)
    return brief(info)


def build_semantic_ids(ws: Workspace, cfg: PipelineConfig, name: str) -> dict:
    from recipes import pipeline

    spec = next(s for s in cfg.semantic_ids if s.name == name)
    info = pipeline.build_semantic_ids(
        ws, name, list(spec.features), spec.quantiser(), spec.weights, spec.missing
    )
    return brief(info) | {"metrics": info.get("metrics")}


def export_split(ws: Workspace, cfg: PipelineConfig, index: int, force: bool = False) -> dict:
    """Export a split unless the split and features are at the versions of the last export to the same path."""
    from recipes.pipeline import export

    x = cfg.exports[index]
    out = output_path(x.out, ws.uri, format=x.format, split=x.split)
    split_version = artifacts.manifest(ws, "split", x.split)["table_version"]
    inputs = {"split": split_version} | {f: ws.version(feature_table(f)) for f in x.features.values()}
    if x.semantic_ids is not None:
        inputs["semantic_ids"] = artifacts.manifest(ws, "semantic_ids", x.semantic_ids)["table_version"]
    name = f"export:{x.format}:{x.name or x.split}"

    def build() -> tuple[str, int, dict]:
        export(
            ws, x.split, x.format, out, dict(x.features), x.name, x.user_graph_k, x.missing, x.semantic_ids
        )
        return f"split_{x.split}", split_version, {"out": str(out)}

    step = Step(
        STEP, name, inputs, {"export": x.model_dump(), "out": str(out)}, build, lambda _: out.exists()
    )
    return {"export": name, "out": str(out), "skipped": run_step(ws, step, force)["skipped"]}


def snapshot_name(ws: Workspace, cfg: PipelineConfig, now: datetime | None = None) -> str:
    """The name the next publish of `cfg` takes, decided before any work: the template rendered once, with a
    `-2`, `-3`, ... suffix when a snapshot already has it (a second publish on the same day)."""
    from stores.snapshots import free_name

    assert cfg.snapshot is not None
    last = last_manifest(ws, STEP, f"snapshot:{cfg.name}") or {}
    rendered = cfg.snapshot.name.format(
        config=cfg.name, date=now or datetime.now(UTC), n=last.get("n", 0) + 1
    )
    return free_name(ws, rendered)


def publish_snapshot(ws: Workspace, cfg: PipelineConfig, name: str) -> dict:
    """Publish snapshot `name` of the configured split, features and graphs when any pinned version changed
    since this config's last snapshot; otherwise report the last one."""
    from stores.snapshots import create_snapshot, current_pins

    assert cfg.snapshot is not None
    split, features, graphs = cfg.snapshot.split, cfg.snapshot_features(), cfg.snapshot_graphs()
    semantic_ids = cfg.snapshot_semantic_ids()
    pins = current_pins(ws, split, features, graphs, semantic_ids)
    last = last_manifest(ws, STEP, f"snapshot:{cfg.name}") or {}

    def build() -> tuple[str, int, dict]:
        info = create_snapshot(ws, name, split, features, graphs, semantic_ids=semantic_ids)
        return (
            f"split_{split}",
            info["tables"][f"split_{split}"],
            {"snapshot": name, "n": last.get("n", 0) + 1},
        )

    params = {"features": features, "graphs": graphs} | (
        {"semantic_ids": semantic_ids} if semantic_ids else {}
    )
    info = run_step(ws, Step(STEP, f"snapshot:{cfg.name}", pins, params, build, lambda _: True))
    return {"snapshot": info["snapshot"], "published": not info["skipped"], "tables": pins}


def write_report(ws: Workspace, cfg: PipelineConfig) -> dict:
    """Write the HTML report unless no table changed since the last one (and the file is still there)."""
    from recipes.report.data import load_report_data
    from recipes.report.render import ReportConfig, render_report

    assert cfg.report is not None
    out = output_path(cfg.report.out, ws.uri)
    versions = {k: v for k, v in ws.versions().items() if k != "artifacts"}
    split = cfg.snapshot.split if cfg.snapshot else (cfg.splits[0].name if cfg.splits else None)

    def build() -> tuple[str, int, dict]:
        page = render_report(load_report_data(ws, ReportConfig(), split=split), ReportConfig())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        return "items", ws.version("items") or 0, {"out": str(out)}

    step = Step(STEP, f"report:{cfg.name}", versions, {"out": str(out)}, build, lambda _: out.exists())
    if run_step(ws, step)["skipped"]:
        return {"report": str(out), "skipped": True}
    return {"report": str(out), "skipped": False, "bytes": out.stat().st_size}


def known(config: str, what: str, wanted: list[str] | None, defined: list[str]) -> list[str]:
    """`wanted` (default: all `defined`), in order; names the config does not define are a TerminalError."""
    unknown = sorted(set(wanted or []) - set(defined))
    if unknown:
        raise TerminalError(f"{what} {unknown} are not in {config}'s list {defined}; use one of those")
    return [n for n in defined if n in set(wanted)] if wanted else list(defined)


def serve_forget(ws: Workspace, cfg: PipelineConfig, request_id: str) -> dict:
    """Serve one configured forget request, once per request id: a request already in the log is reported, not
    redone. A receipt whose verification fails is terminal (retrying cannot make forgotten data reappear)."""
    from recipes.unlearning.forget import forget
    from stores.erasure.log import logged

    done = logged(ws, request_id)
    if done is not None and done.get("status", "done") == "done":
        verified = (done.get("receipt") or {}).get("verification", {}).get("verified")
        return {"request_id": request_id, "status": "already served", "skipped": True, "verified": verified}
    receipt = forget(ws, next(r for r in cfg.forget if r.request_id == request_id))
    check = receipt["verification"]
    if not check["verified"]:
        raise TerminalError(
            f"forget request {request_id}: verification found forgotten data left: {check['problems']}; "
            f"run `mmfeat verify-erasure {request_id}` after fixing it"
        )
    return {
        "request_id": request_id,
        "status": "served, verified",
        "skipped": False,
        "verified": True,
        "removed": receipt["removed"],
        "snapshots_invalidated": [s["name"] for s in receipt.get("snapshots_invalidated") or []],
    }


CLUSTER_MIN_ROWS = 1_000_000  # smaller interaction tables forget cheaply in any layout


def cluster_interactions(
    ws: Workspace, min_rows: int = CLUSTER_MIN_ROWS, rows_per_fragment: int | None = None, force: bool = False
) -> dict:
    """Cluster interactions by user_id (stores/erasure/physical.py `cluster_if_needed`) when the table has at
    least `min_rows` rows and more than 5% of them were appended since the last clustering, so that a forget
    rewrites only the fragments holding the user's rows. Skips while interactions are at the version last checked."""
    from stores.erasure.physical import CLUSTER_ROWS, cluster_if_needed

    if not ws.exists("interactions"):
        return {"table": "interactions", "skipped": "no such table"}
    rows_per_fragment = rows_per_fragment or CLUSTER_ROWS
    out: dict[str, Any] = {}

    def build() -> tuple[str, int, dict]:
        out.update(
            cluster_if_needed(ws, "interactions", "user_id", min_rows, rows_per_fragment=rows_per_fragment)
        )
        version = ws.version("interactions") or 0
        return "interactions", version, {"checked_version": version}

    fresh = lambda done: done.get("checked_version") == ws.version("interactions")  # noqa: E731
    params = {"by": "user_id", "min_rows": min_rows, "rows_per_fragment": rows_per_fragment}
    info = run_step(ws, Step(STEP, "cluster:interactions", {}, params, build, fresh), force)
    return out if not info["skipped"] else {"table": "interactions", "skipped": True}


def resume_forgets(ws: Workspace) -> list[dict]:
    """Carry out the forget requests a crash left pending (recipes/unlearning/forget.py `resume_pending`)."""
    from recipes.unlearning.forget import resume_pending

    return [
        {
            "request_id": r.get("request_id"),
            "status": "resumed, verified" if r.get("verification", {}).get("verified") else "resumed",
            "skipped": False,
            "verified": r.get("verification", {}).get("verified"),
            "removed": r.get("removed", {}),
        }
        for r in resume_pending(ws)
    ]


def totals(ws: Workspace, before: dict[str, int], result: dict) -> dict:
    """What a refresh changed: tables whose version moved, model calls, artifacts rebuilt, rows written."""
    after = ws.versions()
    rebuilt = [r["table"] for r in result["recipes"] if not r["skipped"] and "table" in r]
    return {
        "tables_changed": sorted(t for t, v in after.items() if before.get(t) != v and t != "artifacts"),
        "model_calls": sum(e.get("model_calls", 0) for e in result["extract"]),
        "rebuilt": rebuilt,
        "rows_written": sum(i.get("written", 0) for i in result["ingest"])
        + sum(e.get("written", 0) for e in result["extract"])
        + sum(ws.count(t) for t in rebuilt),
    }
