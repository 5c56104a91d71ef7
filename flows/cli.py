"""The `mmfeat` command line. Thin: parses arguments, calls library functions, prints results.

It starts fast: this module imports only click at load time. Command groups that live in their own modules are
imported when they are invoked (or listed by --help), and every command imports its stores/recipes/extractors
dependencies (LanceDB, pandas, torch, Ray, Prefect) inside its body.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from flows.cli_context import workspace_of as _ws

LAZY_COMMANDS = {
    "caption": "flows.extract_cli:caption",
    "encode": "flows.extract_cli:encode",
    "features": "flows.extract_cli:features",
    "split": "flows.recipes_cli:split",
    "graph": "flows.recipes_cli:graph",
    "export": "flows.recipes_cli:export",
    "snapshot": "flows.snapshot_cli:snapshot",
    "train-example": "flows.snapshot_cli:train_example",
    "report": "flows.report_cli:report",
    "forget": "flows.forget_cli:forget",
    "verify-erasure": "flows.forget_cli:verify_erasure",
    "unlearn-split": "flows.forget_cli:unlearn_split",
    "run": "flows.run_cli:run",
    "serve": "flows.run_cli:serve",
    "demo": "flows.run_cli:demo",
}
"""Sub-commands defined in other modules: name -> "module:attribute", imported only when looked up."""


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when that sub-command is looked up."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = self.lazy[cmd_name].partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if command.name != cmd_name:
            raise RuntimeError(f"{self.lazy[cmd_name]} is named {command.name!r}, not {cmd_name!r}; fix LAZY_COMMANDS")
        return command


def print_ingest_report(report) -> None:
    click.echo(f"source {report.source}")
    click.echo(f"  {'file':<28}{'read':>10}{'stored':>10}{'merged':>9}{'quarant.':>10}  reasons")
    for name, t in report.files.items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(t.reasons.items()))
        mark = "" if t.balanced else "  (UNBALANCED)"
        click.echo(f"  {name[-28:]:<28}{t.read:>10}{t.stored:>10}{t.merged:>9}{t.quarantined:>10}  {reasons}{mark}")
    click.echo(f"  {'table':<28}{'inserted':>10}{'updated':>10}{'unchanged':>10}{'version':>9}")
    for name, r in report.tables.items():
        click.echo(f"  {name:<28}{r.inserted:>10}{r.updated:>10}{r.unchanged:>10}{r.version!s:>9}")


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@click.option(
    "--workspace",
    envvar="MMFEAT_HOME",
    default="./mmfeat-data",
    show_default=True,
    help="Workspace directory or URI (s3://bucket/path); env MMFEAT_HOME.",
)
@click.pass_context
def cli(ctx: click.Context, workspace: str) -> None:
    """mmfeat: data and feature engineering for multimodal recommendation."""
    ctx.ensure_object(dict)
    ctx.obj["workspace"] = workspace


# ---- ingest ------------------------------------------------------------------------------------------------


@cli.group()
def ingest() -> None:
    """Ingest a dataset into the workspace (validated; bad rows go to the quarantine table)."""


def _run_ingest(ctx: click.Context, src, as_json: bool) -> None:
    from recipes.ingest.load import ingest as do_ingest

    report = do_ingest(_ws(ctx), src)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_ingest_report(report)
    if not report.balanced:
        raise click.ClickException("row counts do not add up; this is a bug, please report it")


def _source_errors(fn):
    """Turn unreadable-source errors into clean CLI errors."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from recipes.ingest.sources import SourceError

        try:
            return fn(*args, **kwargs)
        except SourceError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@ingest.command("movielens")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--items-csv", type=click.Path(path_type=Path), help="TMDB-style items CSV with movie_id and overview.")
@click.option("--posters", type=click.Path(path_type=Path), help="Folder of <item_id>.jpg posters.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@_source_errors
def ingest_movielens(ctx, directory, items_csv, posters, as_json):
    """MovieLens-100K layout (u.item latin-1, u.user, u.data)."""
    from recipes.ingest.sources import movielens

    _run_ingest(ctx, movielens(directory, items_csv, posters), as_json)


@ingest.command("mmrec")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_source_errors
def ingest_mmrec(ctx, directory, as_json):
    """MMRec dataset folder (<name>.inter TSV with x_label)."""
    from recipes.ingest.sources import mmrec

    _run_ingest(ctx, mmrec(directory), as_json)


@ingest.command("recbole")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_source_errors
def ingest_recbole(ctx, directory, as_json):
    """RecBole atomic files (.inter, .item, .user with typed headers)."""
    from recipes.ingest.sources import recbole

    _run_ingest(ctx, recbole(directory), as_json)


@ingest.command("table")
@click.option("--items", required=True, type=click.Path(path_type=Path), help="Items file (CSV, Parquet, JSONL).")
@click.option("--interactions", type=click.Path(path_type=Path), help="Interactions file.")
@click.option("--users", type=click.Path(path_type=Path), help="Users file.")
@click.option("--images", type=click.Path(path_type=Path), help="Root folder that item image paths are under.")
@click.option("--map", "maps", multiple=True, help="Rename a column: SOURCE_COLUMN=FIELD (repeatable).")
@click.option("--name", help="Source name recorded on every row.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_source_errors
def ingest_table(ctx, items, interactions, users, images, maps, name, as_json):
    """Generic tables: items item_id,title,text,image; interactions user_id,item_id,timestamp[,event,value]."""
    from recipes.ingest.sources import parse_mapping, table

    _run_ingest(ctx, table(items, interactions, users, images, parse_mapping(maps), name), as_json)


# ---- SQL ---------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table")
@click.option("--out", type=click.Path(path_type=Path), help="Write the result to this file.")
@click.option("--version", "pins", multiple=True, help="Pin a table to a version: TABLE=VERSION (repeatable).")
@click.option("--snapshot", help="Read the tables as pinned by this snapshot.")
@click.pass_context
def sql(ctx, query, fmt, out, pins, snapshot):
    """Read-only SQL (DuckDB) over every table of the workspace."""
    from stores.sql import SqlRefused, run_sql

    ws = _ws(ctx)
    versions = {}
    for pin in pins:
        name, _, ver = pin.partition("=")
        if not ver.isdigit():
            raise click.ClickException(f"--version {pin!r}: write TABLE=VERSION, e.g. items=3")
        versions[name] = int(ver)
    try:
        if snapshot:
            from stores.snapshots import snapshot_versions

            versions = snapshot_versions(ws, snapshot) | versions
        result = run_sql(ws, query, versions=versions)
    except (SqlRefused, KeyError) as exc:
        raise click.ClickException(str(exc).strip('"')) from None
    except Exception as exc:  # DuckDB errors: bad SQL, unknown column...
        raise click.ClickException(f"query failed: {exc}") from None
    _emit(result, fmt, out)


def _emit(result, fmt: str, out: Path | None) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if out is None:
            raise click.ClickException("--format parquet needs --out FILE")
        pq.write_table(result, out)
        return
    if fmt == "csv":
        target = str(out) if out else sys.stdout.buffer
        pacsv.write_csv(result, target)
        return
    if fmt == "json":
        text = json.dumps(result.to_pylist(), default=str, indent=1)
    else:
        text = _format_table(result)
    if out:
        Path(out).write_text(text + "\n")
    else:
        click.echo(text)


def _format_table(result, limit: int = 50) -> str:
    rows = result.slice(0, limit).to_pylist()
    names = result.column_names
    cells = [[_cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    if result.num_rows > limit:
        lines.append(f"... {result.num_rows - limit} more rows (use --format csv or --out)")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
