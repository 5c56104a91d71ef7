"""Prefect flows over the whole pipeline: ingest, extract, recipes (splits, graphs, exports), forget, refresh.

Every flow takes a config (a YAML path or a shipped config name, see recipes/config.py) and a workspace, so its
signature is the run's configuration and a deployment can schedule it. Tasks wrap the steps of recipes/refresh.py
(each a `run_step` call that skips while its inputs are unchanged) and pass references, never data. Tasks retry
only on `stores.errors.TransientError` in the error's cause chain; a `TerminalError` fails the run at once.

    >>> refresh_flow("demo", workspace="./mmfeat-data")   # ingest -> forget -> extract -> recipes -> snapshot
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from extractors.model_pool import model_pool
from recipes import refresh as steps
from recipes.config import PipelineConfig, graph_name, load_config
from stores.errors import is_transient
from stores.workspace import Workspace, resolve_uri


def retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task only when a TransientError caused it."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the result itself could not be read
        exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)


def _with(t: Any, cfg: PipelineConfig) -> Any:
    """A task with the config's timeout and transient-only retries."""
    return t.with_options(
        timeout_seconds=cfg.run.step_timeout_s,
        retries=cfg.run.retries,
        retry_delay_seconds=cfg.run.retry_delay_s,
        retry_condition_fn=retry_transient,
    )


def _ws(cfg: PipelineConfig, workspace: str | None) -> Workspace:
    """The workspace: the argument, else the config's `workspace`, else $MMFEAT_HOME, else ./mmfeat-data."""
    return Workspace(resolve_uri(workspace or cfg.workspace))


def _log() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (the .fn of a task)
        import logging

        return logging.getLogger("mmfeat.flows")


# ---- tasks: one step each ------------------------------------------------------------------------------------------


@task(name="ingest-source", cache_policy=NO_CACHE)
def ingest_source(ws_uri: str, cfg: PipelineConfig, source: str, force: bool = False) -> dict:
    out = steps.ingest_source(Workspace(ws_uri), cfg, source, force)
    _log().info("ingest %s: %s", source, "unchanged" if out["skipped"] else out["by_table"])
    return out


@task(name="extract-feature", cache_policy=NO_CACHE)
def extract_feature(ws_uri: str, cfg: PipelineConfig, feature: str, force: bool = False) -> dict:
    from prefect.runtime import task_run

    from extractors import ray_session

    concurrency = None
    if cfg.run.engine == "ray":
        ray_session.connect_ray(cfg.run.ray_address)
        if (task_run.run_count or 1) > 1:  # a retry: drop the failed try's session, size to the nodes left
            ray_session.reset_ray()
            concurrency = min(cfg.extractor(feature).concurrency or 10**6, ray_session.alive_cpus())
    out = steps.extract_feature(Workspace(ws_uri), cfg, feature, force, concurrency)
    _log().info("extract %s: %s model calls", feature, out["model_calls"])
    return out


@task(name="build-split", cache_policy=NO_CACHE)
def split_step(ws_uri: str, cfg: PipelineConfig, name: str, interactions_version: int | None) -> dict:
    return steps.build_split(Workspace(ws_uri), cfg, name, interactions_version)


@task(name="build-graph", cache_policy=NO_CACHE)
def graph_step(ws_uri: str, cfg: PipelineConfig, name: str) -> dict:
    return steps.build_graph(Workspace(ws_uri), cfg, name)


@task(name="build-semantic-ids", cache_policy=NO_CACHE)
def semantic_ids_step(ws_uri: str, cfg: PipelineConfig, name: str) -> dict:
    return steps.build_semantic_ids(Workspace(ws_uri), cfg, name)


@task(name="export", cache_policy=NO_CACHE)
def export_step(ws_uri: str, cfg: PipelineConfig, index: int, force: bool = False) -> dict:
    return steps.export_split(Workspace(ws_uri), cfg, index, force)


@task(name="publish-snapshot", cache_policy=NO_CACHE)
def snapshot_step(ws_uri: str, cfg: PipelineConfig, name: str) -> dict:
    out = steps.publish_snapshot(Workspace(ws_uri), cfg, name)
    _log().info("snapshot %s: %s", out["snapshot"], "published" if out["published"] else "unchanged")
    return out


@task(name="write-report", cache_policy=NO_CACHE)
def report_step(ws_uri: str, cfg: PipelineConfig) -> dict:
    return steps.write_report(Workspace(ws_uri), cfg)


@task(name="forget-request", cache_policy=NO_CACHE)
def forget_step(ws_uri: str, cfg: PipelineConfig, request_id: str) -> dict:
    out = steps.serve_forget(Workspace(ws_uri), cfg, request_id)
    _log().info("forget %s: %s, removed %s", request_id, out["status"], out.get("removed", {}))
    return out


@task(name="cluster-interactions", cache_policy=NO_CACHE)
def cluster_step(ws_uri: str, min_rows: int) -> dict:
    return steps.cluster_interactions(Workspace(ws_uri), min_rows)


@task(name="resume-forgets", cache_policy=NO_CACHE)
def resume_step(ws_uri: str) -> list[dict]:
    return steps.resume_forgets(Workspace(ws_uri))


# ---- stages and flows ------------------------------------------------------------------------------------------


def ingest_stage(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[dict]:
    return [_with(ingest_source, cfg)(ws.uri, cfg, s.name, force) for s in cfg.sources]


def extract_stage(
    cfg: PipelineConfig, ws: Workspace, force: bool = False, features: list[str] | None = None
) -> list[dict]:
    wanted = steps.known(cfg.name, "features", features, [e.feature for e in cfg.extract])
    return [_with(extract_feature, cfg)(ws.uri, cfg, f, force) for f in wanted]


def recipes_stage(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[dict]:
    inter = ws.version("interactions")
    results = [_with(split_step, cfg)(ws.uri, cfg, s.name, inter) for s in cfg.splits]
    results += [_with(graph_step, cfg)(ws.uri, cfg, graph_name(g)) for g in cfg.graphs]
    results += [_with(semantic_ids_step, cfg)(ws.uri, cfg, s.name) for s in cfg.semantic_ids]
    results += [_with(export_step, cfg)(ws.uri, cfg, i, force) for i in range(len(cfg.exports))]
    return results


def forget_stage(cfg: PipelineConfig, ws: Workspace, request_ids: list[str] | None = None) -> list[dict]:
    """Resume what a crash left pending, then serve the config's requests (or those named)."""
    wanted = steps.known(cfg.name, "request ids", request_ids, [r.request_id for r in cfg.forget])
    resumed = _with(resume_step, cfg)(ws.uri)
    return resumed + [_with(forget_step, cfg)(ws.uri, cfg, rid) for rid in wanted]


@flow(name="ingest")
def ingest_flow(config: str, workspace: str | None = None, force: bool = False) -> list[dict]:
    """Ingest every source of the config (new or changed files only)."""
    cfg = load_config(config)
    return ingest_stage(cfg, _ws(cfg, workspace), force)


@flow(name="extract")
def extract_flow(
    config: str, workspace: str | None = None, force: bool = False, features: list[str] | None = None
) -> list[dict]:
    """Extract every configured feature (or `features`) for the items whose input changed."""
    cfg = load_config(config)
    with model_pool() if cfg.run.engine == "ray" else nullcontext():
        return extract_stage(cfg, _ws(cfg, workspace), force, features)


@flow(name="recipes")
def recipes_flow(config: str, workspace: str | None = None, force: bool = False) -> list[dict]:
    """Build every split, then every graph, the semantic IDs, then every export; each is skipped while its inputs
    are unchanged."""
    cfg = load_config(config)
    return recipes_stage(cfg, _ws(cfg, workspace), force)


@flow(name="forget")
def forget_flow(
    config: str, workspace: str | None = None, request_ids: list[str] | None = None
) -> list[dict]:
    """Serve the config's forget requests (or those named); each request id is served once."""
    cfg = load_config(config)
    return forget_stage(cfg, _ws(cfg, workspace), request_ids)


@flow(name="refresh")
def refresh_flow(
    config: str,
    workspace: str | None = None,
    force: bool = False,
    serve_forget: bool = True,
    report: bool = True,
    cluster_min_rows: int = steps.CLUSTER_MIN_ROWS,
) -> dict:
    """Ingest what is new, serve pending forget requests, re-cluster interactions by user when rows were
    appended (tables of `cluster_min_rows` or more: later forgets rewrite few fragments), extract what changed,
    rebuild the splits and graphs whose inputs changed, publish a snapshot if anything it pins changed, and
    write the report."""
    started = time.perf_counter()
    cfg = load_config(config)
    ws = _ws(cfg, workspace)
    before = ws.versions()
    # Checked before any work: the snapshot name this run publishes under (a suffix if the day's name is taken).
    snapshot = steps.snapshot_name(ws, cfg) if cfg.snapshot else None
    result: dict[str, Any] = {"config": cfg.name, "workspace": ws.uri}
    # The stages run as tasks of this one flow run, not as subflows: each flow run costs about a second of
    # Prefect bookkeeping, which a refresh with nothing to do would otherwise spend several times over.
    # One Ray actor per model for the whole refresh (extractors/model_pool.py), released even when a step fails.
    # Ray, the actor and the models of the extractions to come start in the background while ingest and forget
    # run: on the demo that hides Ray's start and the model loads behind work the driver does anyway.
    with model_pool() if cfg.run.engine == "ray" else nullcontext() as pool:
        if pool is not None:
            pool.warm(steps.models_to_warm(ws, cfg, force, serve_forget), cfg.run.ray_address)
        result["ingest"] = ingest_stage(cfg, ws, force)
        result["forget"] = forget_stage(cfg, ws) if serve_forget else []
        result["cluster"] = _with(cluster_step, cfg)(ws.uri, cluster_min_rows)
        result["extract"] = extract_stage(cfg, ws, force)
    result["recipes"] = recipes_stage(cfg, ws, force)
    result["snapshot"] = _with(snapshot_step, cfg)(ws.uri, cfg, snapshot) if snapshot else None
    result["report"] = _with(report_step, cfg)(ws.uri, cfg) if cfg.report and report else None
    result |= steps.totals(ws, before, result)
    result["seconds"] = round(time.perf_counter() - started, 2)
    _log().info(
        "refresh %s: %d model calls, %d rows written, tables changed: %s",
        cfg.name,
        result["model_calls"],
        result["rows_written"],
        result["tables_changed"] or "none",
    )
    return result


FLOWS: dict[str, Callable] = {
    "refresh": refresh_flow,
    "ingest": ingest_flow,
    "extract": extract_flow,
    "recipes": recipes_flow,
    "forget": forget_flow,
}
