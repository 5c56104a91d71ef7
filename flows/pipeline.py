"""Prefect flows over the whole pipeline: ingest, extract, recipes (splits, graphs, exports), forget, refresh.

Every flow takes a config (a YAML path or a shipped config name, see recipes/config.py) and a workspace, so its
signature is the run's configuration and a deployment can schedule it. Tasks are thin wrappers over library
functions and pass references (table names and versions, snapshot names, request ids), never data. A step records
a fingerprint of its inputs' content versions (`artifacts` rows of kind "step") and is skipped while it is
unchanged; extraction also skips unchanged items by input hash. Retries happen on transient errors only (I/O,
network, timeouts, lost Ray workers); a retried extraction resumes from the chunks its earlier try committed.

    >>> refresh_flow("demo", workspace="./mmfeat-data")   # ingest -> forget -> extract -> recipes -> snapshot
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from recipes.config import (
    CooccurGraph,
    DemoSource,
    ExtractorConfig,
    HyperGraph,
    KnnGraph,
    PipelineConfig,
    UserItemGraph,
    demo_dir,
    ensure_demo_catalog,
    graph_name,
    load_config,
    open_source,
    output_path,
    source_files,
)
from stores import artifacts
from stores.workspace import Workspace, resolve_uri

STEP = "step"  # artifacts kind of the skip-if-unchanged records
_TERMINAL = (
    ValueError,
    KeyError,
    TypeError,
    LookupError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    NotImplementedError,
)
_TRANSIENT = (OSError, ConnectionError, TimeoutError)


# ---- errors and retries ------------------------------------------------------------------------------------------


def is_transient(exc: BaseException | None) -> bool:
    """True for errors worth retrying: I/O and network errors, timeouts, lost Ray nodes/actors/objects. Bad input
    and bad configuration (ValueError, KeyError, missing files) are terminal. The cause chain is searched, so a
    timeout wrapped by a library still counts."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _TERMINAL) and not _is_ray_system_error(exc):
            return False
        if isinstance(exc, _TRANSIENT) or _is_ray_system_error(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _is_ray_system_error(exc: BaseException) -> bool:
    """Ray's infrastructure errors (actor or worker died, node died, object lost, get timeout), but not a
    RayTaskError or Ray Data UserCodeException wrapping a user's ValueError."""
    names = {c.__name__ for c in type(exc).__mro__ if c.__module__.split(".")[0] == "ray"}
    if not names:
        return False
    if names & {"RayTaskError", "UserCodeException"}:
        cause = getattr(exc, "cause", None) or exc.__cause__
        return cause is not None and cause is not exc and is_transient(cause)
    return True


def retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task only when its error is transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the result itself could not be read: treat as transient
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


# ---- step records (skip when inputs are unchanged) ---------------------------------------------------------------


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def last_step(ws: Workspace, step: str) -> dict | None:
    try:
        return artifacts.manifest(ws, STEP, step)
    except KeyError:
        return None


def step_done(ws: Workspace, step: str, fp: str) -> dict | None:
    """The record of `step` if it last ran with fingerprint `fp`."""
    info = last_step(ws, step)
    return info if info is not None and info.get("fingerprint") == fp else None


def record_step(ws: Workspace, step: str, fp: str, table: str, info: dict) -> None:
    artifacts.record_artifact(ws, STEP, step, table, ws.version(table) or 0, info | {"fingerprint": fp})


def _ws(cfg: PipelineConfig, workspace: str | None) -> Workspace:
    """The workspace: the argument, else the config's `workspace`, else $MMFEAT_HOME, else ./mmfeat-data."""
    return Workspace(resolve_uri(workspace or cfg.workspace))


def _log() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (the .fn of a task)
        import logging

        return logging.getLogger("mmfeat.flows")


# ---- ingest ------------------------------------------------------------------------------------------------------


def _stat_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@task(name="ingest-source", cache_policy=NO_CACHE)
def ingest_source(ws_uri: str, cfg: PipelineConfig, source: str, force: bool = False) -> dict:
    """Ingest one configured source unless its files (paths, sizes, mtimes) are as at its last ingest."""
    from recipes.ingest.load import ingest

    ws, spec = Workspace(ws_uri), cfg.source(source)
    if isinstance(spec, DemoSource):
        ensure_demo_catalog(demo_dir(cfg, spec, ws_uri), spec)
    fp = fingerprint(spec.model_dump(), _stat_digest(source_files(cfg, spec, ws_uri)))
    if not force and (done := step_done(ws, f"ingest:{source}", fp)) is not None:
        return {"source": source, "skipped": True, "written": 0, "versions": done["versions"]}
    report = ingest(ws, open_source(cfg, spec, ws_uri))
    written = {name: r.written for name, r in report.tables.items()}
    quarantined = sum(t.quarantined for t in report.files.values())
    versions = {name: r.version for name, r in report.tables.items()}
    record_step(ws, f"ingest:{source}", fp, "items", {"versions": versions, "written": written})
    _log().info("ingest %s: written %s, quarantined %d", source, written, quarantined)
    return {
        "source": source,
        "skipped": False,
        "written": sum(written.values()),
        "by_table": written,
        "quarantined": quarantined,
        "versions": versions,
    }


def ingest_stage(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[dict]:
    return [_with(ingest_source, cfg)(ws.uri, cfg, s.name, force) for s in cfg.sources]


@flow(name="ingest")
def ingest_flow(config: str, workspace: str | None = None, force: bool = False) -> list[dict]:
    """Ingest every source of the config (new or changed files only)."""
    cfg = load_config(config)
    return ingest_stage(cfg, _ws(cfg, workspace), force)


# ---- extract -----------------------------------------------------------------------------------------------------


def extractor_spec(e: ExtractorConfig) -> Any:
    """The runner's spec for a configured extractor: the class by direct import, constructor arguments."""
    from extractors.runner import ExtractorSpec

    if e.kind == "caption":
        from extractors.captioner import Captioner

        return ExtractorSpec(
            Captioner, {"model": e.model, "prompt": e.prompt, "max_new_tokens": e.max_new_tokens}
        )
    if e.kind == "clip_image":
        from extractors.clip import ClipImageEncoder

        return ExtractorSpec(ClipImageEncoder, {"model": e.model, "pretrained": e.pretrained})
    if e.kind == "clip_text":
        from extractors.clip import ClipTextEncoder

        return ExtractorSpec(ClipTextEncoder, {"model": e.model, "pretrained": e.pretrained})
    from extractors.text import TextEncoder

    return ExtractorSpec(TextEncoder, {"model": e.model})


_INPUT_TABLES = {"image": ("items", "item_images"), "text": ("items",), "caption": ("items", "captions")}


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (else $RAY_ADDRESS, else a local Ray the runner starts)."""
    if address:
        os.environ["RAY_ADDRESS"] = address


def reset_ray() -> None:
    """Drop this driver's Ray session (a retry after a stall must not wait on the stalled run's actors)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def alive_cpus() -> int:
    """CPUs of the Ray nodes alive now (connecting as the runner would)."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@task(name="extract-feature", cache_policy=NO_CACHE)
def extract_feature(ws_uri: str, cfg: PipelineConfig, feature: str, force: bool = False) -> dict:
    """Run one extractor unless its input tables and its output table are at the versions of its last run."""
    from prefect.runtime import task_run

    from extractors.runner import run_extraction
    from stores.features import feature_table

    ws, e = Workspace(ws_uri), cfg.extractor(feature)
    table = feature_table(feature)
    inputs = {name: ws.version(name) for name in _INPUT_TABLES[e.source]}
    fp = fingerprint(e.model_dump(), inputs, cfg.run.engine)
    done = step_done(ws, f"extract:{feature}", fp)
    if not force and done is not None and done.get("output_version") == ws.version(table):
        return {
            "feature": feature,
            "table": table,
            "skipped": True,
            "model_calls": 0,
            "written": 0,
            "version": ws.version(table),
        }
    concurrency = e.concurrency
    if cfg.run.engine == "ray":
        connect_ray(cfg.run.ray_address)
        if (task_run.run_count or 1) > 1:  # a retry: drop the failed try's session and size to the nodes left
            reset_ray()
            concurrency = min(concurrency, alive_cpus()) if concurrency else None
    summary = run_extraction(
        ws,
        feature,
        extractor_spec(e),
        source=e.source,
        fields=tuple(e.fields),
        chunk_rows=e.chunk_rows,
        batch_size=e.batch_size,
        concurrency=concurrency,
        engine=cfg.run.engine,
        progress=False,
    )
    version = ws.version(table)
    record_step(ws, f"extract:{feature}", fp, table, {"output_version": version, "inputs": inputs})
    out = {k: v for k, v in summary.to_dict().items() if k not in ("provenance", "inputs")}
    out |= {
        "unchanged": summary.skipped,
        "skipped": False,
        "written": summary.done + summary.failed + summary.pruned,
        "version": version,
        "model": summary.provenance.get("model"),
        "revision": summary.provenance.get("revision"),
    }
    _log().info(
        "extract %s: %d model calls, %d done, %d unchanged, %d failed, %.1f s",
        feature,
        summary.model_calls,
        summary.done,
        summary.skipped,
        summary.failed,
        summary.seconds,
    )
    return out


@flow(name="extract")
def extract_flow(
    config: str, workspace: str | None = None, force: bool = False, features: list[str] | None = None
) -> list[dict]:
    """Extract every configured feature (or `features`) for the items whose input changed."""
    cfg = load_config(config)
    return extract_stage(cfg, _ws(cfg, workspace), force, features)


def extract_stage(
    cfg: PipelineConfig, ws: Workspace, force: bool = False, features: list[str] | None = None
) -> list[dict]:
    wanted = features or [e.feature for e in cfg.extract]
    unknown = sorted(set(wanted) - {e.feature for e in cfg.extract})
    if unknown:
        raise ValueError(
            f"features {unknown} are not in {cfg.name}'s extract list {[e.feature for e in cfg.extract]}"
        )
    return [
        _with(extract_feature, cfg)(ws.uri, cfg, e.feature, force) for e in cfg.extract if e.feature in wanted
    ]


# ---- recipes: splits, graphs, exports ----------------------------------------------------------------------------


def _brief(info: dict) -> dict:
    keep = (
        "kind",
        "name",
        "table",
        "table_version",
        "skipped",
        "counts",
        "nodes",
        "edges",
        "split",
        "split_version",
    )
    return {k: info[k] for k in keep if k in info} | {"skipped": bool(info.get("skipped"))}


@task(name="build-split", cache_policy=NO_CACHE)
def split_step(ws_uri: str, cfg: PipelineConfig, name: str, interactions_version: int | None) -> dict:
    from recipes.pipeline import build_split

    spec = next(s for s in cfg.splits if s.name == name)
    return _brief(build_split(Workspace(ws_uri), name, spec.to_split_config(), interactions_version))


@task(name="build-graph", cache_policy=NO_CACHE)
def graph_step(ws_uri: str, cfg: PipelineConfig, name: str) -> dict:
    from recipes import pipeline as rp

    ws, g = Workspace(ws_uri), next(g for g in cfg.graphs if graph_name(g) == name)
    if isinstance(g, UserItemGraph):
        info = rp.build_ui_graph(ws, g.split, g.norm, name)
    elif isinstance(g, KnnGraph):
        info = rp.build_knn_graph(
            ws, g.split, list(g.features), g.k, g.norm, g.weights, g.symmetric, g.self_loops, name
        )
    elif isinstance(g, CooccurGraph):
        info = rp.build_cooccur_graph(ws, g.split, g.kind, g.k, g.weight, name)
    else:
        assert isinstance(g, HyperGraph)
        info = rp.build_hypergraph(ws, g.split, g.kind, list(g.knn) or None, name)
    return _brief(info)


@task(name="export", cache_policy=NO_CACHE)
def export_step(ws_uri: str, cfg: PipelineConfig, index: int, force: bool = False) -> dict:
    """Export a split unless the split and features are at the versions of the last export to the same path."""
    from recipes.pipeline import export
    from stores.features import feature_table

    ws, x = Workspace(ws_uri), cfg.exports[index]
    out = output_path(x.out, ws.uri, format=x.format, split=x.split)
    split_version = artifacts.manifest(ws, "split", x.split)["table_version"]
    inputs = {"split": split_version} | {f: ws.version(feature_table(f)) for f in x.features.values()}
    fp = fingerprint(x.model_dump(), str(out), inputs)
    step = f"export:{x.format}:{x.name or x.split}"
    if not force and step_done(ws, step, fp) is not None and out.exists():
        return {"export": step, "out": str(out), "skipped": True}
    export(ws, x.split, x.format, out, dict(x.features), x.name, x.user_graph_k)
    record_step(ws, step, fp, f"split_{x.split}", {"out": str(out), "inputs": inputs})
    return {"export": step, "out": str(out), "skipped": False}


@flow(name="recipes")
def recipes_flow(config: str, workspace: str | None = None, force: bool = False) -> list[dict]:
    """Build every split, then every graph, then every export; each is skipped while its inputs are unchanged."""
    cfg = load_config(config)
    return recipes_stage(cfg, _ws(cfg, workspace), force)


def recipes_stage(cfg: PipelineConfig, ws: Workspace, force: bool = False) -> list[dict]:
    inter = ws.version("interactions")
    results = [_with(split_step, cfg)(ws.uri, cfg, s.name, inter) for s in cfg.splits]
    results += [_with(graph_step, cfg)(ws.uri, cfg, graph_name(g)) for g in cfg.graphs]
    results += [_with(export_step, cfg)(ws.uri, cfg, i, force) for i in range(len(cfg.exports))]
    return results


# ---- snapshot and report -----------------------------------------------------------------------------------------


@task(name="publish-snapshot", cache_policy=NO_CACHE)
def snapshot_step(ws_uri: str, cfg: PipelineConfig) -> dict:
    """Publish a snapshot of the configured split, features and graphs when any pinned version changed since
    this config's last snapshot; otherwise report the last one."""
    from datetime import UTC, datetime

    from stores.features import feature_table
    from stores.snapshots import create_snapshot

    ws, spec = Workspace(ws_uri), cfg.snapshot
    features, graphs = cfg.snapshot_features(), cfg.snapshot_graphs()
    pins = {t: ws.version(t) for t in ("items", "users", "interactions")}
    pins |= {f"split_{spec.split}": artifacts.manifest(ws, "split", spec.split)["table_version"]}
    pins |= {feature_table(f): ws.version(feature_table(f)) for f in features}
    pins |= {f"graph_{g}": artifacts.manifest(ws, "graph", g)["table_version"] for g in graphs}
    fp = fingerprint(pins, features, graphs)
    step = f"snapshot:{cfg.name}"
    last = last_step(ws, step)
    if last is not None and last.get("fingerprint") == fp:
        return {"snapshot": last["snapshot"], "published": False, "tables": pins}
    n = (last or {}).get("n", 0) + 1
    name = spec.name.format(config=cfg.name, date=datetime.now(UTC), n=n)
    info = create_snapshot(ws, name, spec.split, features, graphs)
    record_step(ws, step, fp, f"split_{spec.split}", {"snapshot": name, "n": n})
    _log().info("published snapshot %s pinning %s", name, info["tables"])
    return {"snapshot": name, "published": True, "tables": info["tables"]}


@task(name="write-report", cache_policy=NO_CACHE)
def report_step(ws_uri: str, cfg: PipelineConfig) -> dict:
    """Write the HTML report unless no table changed since the last one (and the file is still there)."""
    from recipes.report.data import load_report_data
    from recipes.report.render import ReportConfig, render_report

    ws = Workspace(ws_uri)
    out = output_path(cfg.report.out, ws.uri)
    versions = {k: v for k, v in ws.versions().items() if k != "artifacts"}
    fp = fingerprint(versions, str(out))
    split = cfg.snapshot.split if cfg.snapshot else (cfg.splits[0].name if cfg.splits else None)
    if step_done(ws, f"report:{cfg.name}", fp) is not None and out.exists():
        return {"report": str(out), "skipped": True}
    page = render_report(load_report_data(ws, ReportConfig(), split=split), ReportConfig())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    record_step(ws, f"report:{cfg.name}", fp, "items", {"out": str(out)})
    return {"report": str(out), "skipped": False, "bytes": out.stat().st_size}


# ---- forget ------------------------------------------------------------------------------------------------------


@task(name="forget-request", cache_policy=NO_CACHE)
def forget_step(ws_uri: str, cfg: PipelineConfig, request_id: str) -> dict:
    """Serve one forget request, once per request id: a request already in the log is reported, not redone. A
    receipt whose verification fails stops the flow (terminal: retrying cannot make forgotten data reappear
    elsewhere)."""
    from recipes.unlearning.forget import forget
    from stores.erasure.log import logged

    ws = Workspace(ws_uri)
    done = logged(ws, request_id)
    if done is not None:
        verified = done["receipt"].get("verification", {}).get("verified")
        return {"request_id": request_id, "status": "already served", "skipped": True, "verified": verified}
    request = next(r for r in cfg.forget if r.request_id == request_id).to_request()
    receipt = forget(ws, request)
    check = receipt["verification"]
    if not check["verified"]:
        raise RuntimeError(
            f"forget request {request_id}: verification found forgotten data left: "
            f"{check['problems']}; run `mmfeat verify-erasure {request_id}` after fixing it"
        )
    snapshots = [s["name"] for s in receipt.get("snapshots_invalidated") or []]
    _log().info(
        "forget %s: removed %s; snapshots to re-issue: %s",
        request_id,
        receipt["removed"],
        snapshots or "none",
    )
    return {
        "request_id": request_id,
        "status": "served, verified",
        "skipped": False,
        "verified": True,
        "removed": receipt["removed"],
        "snapshots_invalidated": snapshots,
    }


@flow(name="forget")
def forget_flow(
    config: str, workspace: str | None = None, request_ids: list[str] | None = None
) -> list[dict]:
    """Serve the config's forget requests (or those named); each request id is served once."""
    cfg = load_config(config)
    return forget_stage(cfg, _ws(cfg, workspace), request_ids)


def forget_stage(cfg: PipelineConfig, ws: Workspace, request_ids: list[str] | None = None) -> list[dict]:
    wanted = request_ids or [r.request_id for r in cfg.forget]
    unknown = sorted(set(wanted) - {r.request_id for r in cfg.forget})
    if unknown:
        raise ValueError(
            f"request ids {unknown} are not in {cfg.name}'s forget list {[r.request_id for r in cfg.forget]}"
        )
    return [_with(forget_step, cfg)(ws.uri, cfg, rid) for rid in wanted]


# ---- refresh -----------------------------------------------------------------------------------------------------


@flow(name="refresh")
def refresh_flow(
    config: str,
    workspace: str | None = None,
    force: bool = False,
    serve_forget: bool = True,
    report: bool = True,
) -> dict:
    """Ingest what is new, serve pending forget requests, extract what changed, rebuild the splits and graphs
    whose inputs changed, publish a snapshot if anything it pins changed, and write the report."""
    started = time.perf_counter()
    cfg = load_config(config)
    ws = _ws(cfg, workspace)
    before = ws.versions()
    result: dict[str, Any] = {"config": cfg.name, "workspace": ws.uri}
    # The stages run as tasks of this one flow run, not as subflows: each flow run costs about a second of
    # Prefect bookkeeping, which a refresh with nothing to do would otherwise spend several times over.
    result["ingest"] = ingest_stage(cfg, ws, force)
    result["forget"] = forget_stage(cfg, ws) if serve_forget and cfg.forget else []
    result["extract"] = extract_stage(cfg, ws, force)
    result["recipes"] = recipes_stage(cfg, ws, force)
    result["snapshot"] = _with(snapshot_step, cfg)(ws.uri, cfg) if cfg.snapshot else None
    result["report"] = _with(report_step, cfg)(ws.uri, cfg) if cfg.report and report else None
    after = ws.versions()
    result["tables_changed"] = sorted(t for t, v in after.items() if before.get(t) != v and t != "artifacts")
    result["model_calls"] = sum(e.get("model_calls", 0) for e in result["extract"])
    rebuilt = [r["table"] for r in result["recipes"] if not r["skipped"] and "table" in r]
    result["rebuilt"] = rebuilt
    result["rows_written"] = (
        sum(i.get("written", 0) for i in result["ingest"])
        + sum(e.get("written", 0) for e in result["extract"])
        + sum(ws.count(t) for t in rebuilt)
    )
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
