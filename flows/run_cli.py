"""`mmfeat run CONFIG` (one refresh through Prefect), `mmfeat serve CONFIG` (its cron schedules, served) and
`mmfeat demo` (the demo config end to end, as `make demo` runs it).

Registered lazily in flows/cli.py (LAZY_COMMANDS) for `run`, `serve` and `demo`. Prefect is imported inside the
commands (so `mmfeat --help` stays fast) after PREFECT_HOME defaults to a folder beside the workspace: each
workspace gets its own Prefect database unless PREFECT_HOME or PREFECT_API_URL (a Prefect server) is set.

Errors: a failed run prints one line (a `TerminalError`'s message names the fix, the same text the direct command
prints); `--debug` shows Prefect's logs with tracebacks and re-raises the error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

# Prefect's temporary server gets this long to start (its default, 20 s, is too short on a loaded 2-core machine).
EPHEMERAL_STARTUP_TIMEOUT_S = "120"


def workspace_for(ctx: click.Context, cfg) -> str:
    """--workspace / $MMFEAT_HOME when given, else the config's `workspace`, else the group's default."""
    from stores.workspace import resolve_uri

    root = ctx.find_root()
    explicit = root.get_parameter_source("workspace") not in (None, click.core.ParameterSource.DEFAULT)
    chosen = ctx.obj["workspace"] if explicit or not cfg.workspace else cfg.workspace
    return resolve_uri(chosen)


def prefect_home(workspace_uri: str) -> None:
    """Default PREFECT_HOME to `<workspace>-prefect` (outside the workspace, which erasure scans byte by byte),
    and give a temporary Prefect server time to start."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S)
    # No telemetry from a temporary server: offline it only fails (on SQLite, with a lock traceback at start-up)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"):
        return
    base = workspace_uri if "://" not in workspace_uri else str(Path.cwd() / "mmfeat")
    os.environ["PREFECT_HOME"] = f"{base}-prefect"


def _load(config: str):
    from recipes.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


class _OneLineErrors(logging.Filter):
    """Without --debug: Prefect's own failure records are dropped (the command prints the error once) and no
    record carries a traceback; progress and retry notices stay, one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect") and (
            record.levelno >= logging.ERROR or "Finished in state Failed" in record.getMessage()
        ):
            return False
        record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def run_errors(debug: bool) -> Iterator[None]:
    """Run a flow from a command: a failure becomes one CLI error line (the classified error's message, or the
    error with a hint to pass --debug); with `debug` the logs keep their tracebacks and the error propagates."""
    from prefect.logging.configuration import setup_logging

    from stores.errors import MmfeatError, one_line

    setup_logging()  # Prefect's console handler exists from here on: filter it
    quiet = _OneLineErrors()
    handlers = [] if debug else list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    except click.ClickException:
        raise
    except Exception as exc:
        if debug:
            raise
        from stores.errors import classified

        hint = "" if isinstance(classified(exc), MmfeatError) else " (run with --debug for the traceback)"
        raise click.ClickException(one_line(exc) + hint) from None
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def format_summary(result: dict) -> list[str]:
    """The refresh result as a few human lines."""
    lines = [f"refresh {result['config']} on {result['workspace']} ({result['seconds']:.1f} s)"]
    for i in result["ingest"]:
        what = (
            "unchanged, skipped"
            if i["skipped"]
            else f"{i['written']} rows written, {i['quarantined']} quarantined"
        )
        lines.append(f"  ingest    {i['source']}: {what}")
    for f in result["forget"]:
        lines.append(f"  forget    {f['request_id']}: {f['status']}")
    for e in result["extract"]:
        what = (
            "inputs unchanged, skipped"
            if e["skipped"]
            else f"{e['model_calls']} model calls, {e['done']} written, {e['unchanged']} unchanged, "
            f"{e['failed']} failed ({e['seconds']:.1f} s)"
        )
        lines.append(f"  extract   {e['feature']}: {what}")
    for r in result["recipes"]:
        label = r.get("export") or f"{r.get('kind', '?')} {r.get('name', '')}"
        state = (
            "unchanged"
            if r["skipped"]
            else ("written" if "export" in r else f"built (v{r.get('table_version')})")
        )
        lines.append(f"  recipes   {label}: {state}")
    if result.get("snapshot"):
        s = result["snapshot"]
        lines.append(f"  snapshot  {s['snapshot']}: {'published' if s['published'] else 'unchanged'}")
    if result.get("report"):
        lines.append(f"  report    {result['report']['report']}")
    changed = ", ".join(result["tables_changed"]) or "none"
    lines.append(
        f"  total     {result['model_calls']} model calls, {result['rows_written']} rows written; "
        f"tables changed: {changed}"
    )
    return lines


def demo_main(workspace: str, config: str = "demo", echo: Callable[[str], Any] = print) -> dict:
    """`make demo`: the demo config end to end through Prefect and Ray, as an operator would see it: a refresh
    (synthetic ingest, captions, image and text vectors, split, graphs, export, snapshot), the config's forget
    requests (erased, verified, the snapshot flagged), a second refresh (nothing re-extracted; what the erasure
    changed is rebuilt and re-published, with the HTML report), then a summary with where to look next."""
    from datetime import UTC, datetime

    from flows.pipeline import _ws, forget_flow, refresh_flow
    from recipes.config import load_config

    started = datetime.now(UTC)
    cfg = load_config(config)
    ws = _ws(cfg, workspace)
    first = refresh_flow(str(cfg.file), ws.uri, serve_forget=False, report=False)
    forgotten = forget_flow(str(cfg.file), ws.uri) if cfg.forget else []
    second = refresh_flow(str(cfg.file), ws.uri)
    for line in format_summary(first):
        echo(line)
    for f in forgotten:
        echo(
            f"forget {f['request_id']}: {f['status']}; removed {f.get('removed', {})}; snapshots flagged for "
            f"re-issue: {f.get('snapshots_invalidated') or 'none'}"
        )
    for line in format_summary(second):
        echo(line)
    runs = _flow_run_states(since=started)
    if runs:
        echo("prefect flow runs of this demo: " + ", ".join(f"{n} {s}" for s, n in sorted(runs.items())))
    w = f"mmfeat --workspace {ws.uri}"
    snap = (second.get("snapshot") or {}).get("snapshot")
    hints = [
        (f"{w} features", "vectors per feature: model, coverage, index"),
        (f'{w} sql "select item_id, caption from captions limit 5"', "read-only SQL over every table"),
    ]
    if snap:
        hints.append((f"{w} snapshot show {snap}", "what a trainer reads, version-pinned"))
    hints += [
        (f"{w} verify-erasure {f['request_id']}", "re-scan every table, version and file") for f in forgotten
    ]
    if second.get("report"):
        hints.append((f"open {second['report']['report']}", "the dataset report"))
    hints += [
        (f"{w} run {cfg.name}", "again: 0 model calls, 0 rows written"),
        (
            f"PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')} prefect server start",
            "browse these flow runs in the Prefect UI",
        ),
    ]
    width = max(len(cmd) for cmd, _ in hints)
    echo("next:")
    for cmd, why in hints:
        echo(f"  {cmd.ljust(width)}  # {why}")
    return {"first": first, "forget": forgotten, "second": second, "flow_runs": runs}


def _flow_run_states(since: Any) -> dict[str, int]:
    """Flow runs started since `since`, counted by state (best effort: empty if the API cannot be read)."""
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(limit=200)
    except Exception:
        return {}
    counts: dict[str, int] = {}
    for r in runs:
        if r.start_time is None or r.start_time < since:
            continue
        state = r.state.name if r.state else "unknown"
        counts[state] = counts.get(state, 0) + 1
    return counts


@click.command()
@click.argument("config")
@click.option("--force", is_flag=True, help="Re-run every step even where its inputs are unchanged.")
@click.option("--no-forget", is_flag=True, help="Do not serve the config's forget requests in this run.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's result as JSON.")
@click.option("--debug", is_flag=True, help="Show Prefect's logs with tracebacks and re-raise errors.")
@click.pass_context
def run(ctx, config, force, no_forget, as_json, debug):
    """Run CONFIG's refresh once through Prefect: ingest what is new, serve forget requests, extract what
    changed, rebuild the splits and graphs whose inputs changed, publish a snapshot. CONFIG is a YAML path or a
    shipped config name (demo, ml100k, hm_fashion, amazon_mmrec)."""
    cfg = _load(config)
    ws = workspace_for(ctx, cfg)
    prefect_home(ws)
    with run_errors(debug):
        from flows.pipeline import refresh_flow

        result = refresh_flow(str(cfg.file), ws, force=force, serve_forget=not no_forget)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        for line in format_summary(result):
            click.echo(line)


def build_deployments(cfg, workspace_uri: str) -> list:
    """One Prefect deployment per schedule of `cfg`, each running its flow on this config and workspace."""
    from prefect.schedules import Cron

    from flows.pipeline import FLOWS

    out = []
    for s in cfg.schedules:
        name = f"{cfg.name}-{s.name or s.flow}"
        out.append(
            FLOWS[s.flow].to_deployment(
                name=name,
                schedules=[Cron(s.cron, timezone=s.timezone)],
                parameters={"config": str(cfg.file), "workspace": workspace_uri},
                tags=["mmfeat", cfg.name],
                # one run at a time per deployment: erasure and the keyed upserts assume a single writer
                concurrency_limit=1,
                description=f"{s.flow} of {cfg.name} ({s.cron} {s.timezone})",
            )
        )
    return out


@click.command()
@click.argument("config")
@click.pass_context
def serve(ctx, config):
    """Serve CONFIG's cron schedules with Prefect until interrupted (a Prefect server via PREFECT_API_URL shows
    the runs; without one Prefect runs a temporary local server)."""
    cfg = _load(config)
    if not cfg.schedules:
        raise click.ClickException(
            f"{cfg.file} has no schedules; add e.g. schedules: [{{cron: '0 3 * * *'}}]"
        )
    ws = workspace_for(ctx, cfg)
    prefect_home(ws)
    from prefect import serve as prefect_serve

    deployments = build_deployments(cfg, ws)
    for d, s in zip(deployments, cfg.schedules, strict=True):
        click.echo(f"serving {d.name}: {s.flow} at '{s.cron}' ({s.timezone}) on {ws}")
    prefect_serve(*deployments)


@click.command()
@click.option(
    "--config", default="demo", show_default=True, help="Config to run (a YAML path or a shipped name)."
)
@click.option("--debug", is_flag=True, help="Show Prefect's logs with tracebacks and re-raise errors.")
@click.pass_context
def demo(ctx, config, debug):
    """The offline demo end to end through Prefect and Ray: synthetic ingest, captions, image and text vectors,
    split, graphs, export, snapshot, a forget request (erased and verified), the HTML report, and where to look
    next."""
    cfg = _load(config)
    ws = workspace_for(ctx, cfg)
    prefect_home(ws)
    with run_errors(debug):
        demo_main(ws, str(cfg.file), echo=click.echo)
