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

from flows.cli_context import print_table
from flows.cli_context import workspace_of as _ws

LAZY_COMMANDS = {
    "caption": "flows.extract_cli:caption",
    "encode": "flows.extract_cli:encode",
    "features": "flows.extract_cli:features",
    "split": "flows.recipes_cli:split",
    "graph": "flows.recipes_cli:graph",
    "semantic-ids": "flows.semantic_cli:semantic_ids",
    "export": "flows.recipes_cli:export",
    "snapshot": "flows.snapshot_cli:snapshot",
    "train-example": "flows.snapshot_cli:train_example",
    "report": "flows.report_cli:report",
    "forget": "flows.forget_cli:forget",
    "verify-erasure": "flows.forget_cli:verify_erasure",
    "optimize": "flows.optimize_cli:optimize",
    "unlearn-split": "flows.forget_cli:unlearn_split",
    "run": "flows.run_cli:run",
    "unlearn-check": "flows.unlearn_check_cli:unlearn_check",
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
            raise RuntimeError(
                f"{self.lazy[cmd_name]} is named {command.name!r}, not {cmd_name!r}; fix LAZY_COMMANDS"
            )
        return command


def print_ingest_report(report) -> None:
    click.echo(f"source {report.source}")
    files = []
    for name, t in report.files.items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(t.reasons.items()))
        mark = "" if t.balanced else "  (UNBALANCED)"
        files.append((name[-28:], t.read, t.stored, t.merged, t.quarantined, reasons + mark))
    print_table(("file", "read", "stored", "merged", "quarant.", "reasons"), files, indent=2)
    tables = [(name, r.inserted, r.updated, r.unchanged, r.version) for name, r in report.tables.items()]
    print_table(("table", "inserted", "updated", "unchanged", "version"), tables, indent=2)


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


def _run_ingest(ctx: click.Context, src, as_json: bool, fetch=None, run=None) -> None:
    from recipes.ingest.load import ingest as do_ingest

    report = (run or do_ingest)(_ws(ctx), src, fetch)
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
        from recipes.ingest.records import SourceError

        try:
            return fn(*args, **kwargs)
        except SourceError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@ingest.command("movielens")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--items-csv", type=click.Path(path_type=Path), help="TMDB-style items CSV with movie_id and overview."
)
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
@click.option(
    "--items", required=True, type=click.Path(path_type=Path), help="Items file (CSV, Parquet, JSONL)."
)
@click.option("--interactions", type=click.Path(path_type=Path), help="Interactions file.")
@click.option("--users", type=click.Path(path_type=Path), help="Users file.")
@click.option(
    "--images", type=click.Path(path_type=Path), help="Root folder that item image paths are under."
)
@click.option("--map", "maps", multiple=True, help="Rename a column: SOURCE_COLUMN=FIELD (repeatable).")
@click.option("--name", help="Source name recorded on every row.")
@click.option(
    "--image-template",
    help="Image path under --images from the item id where the items have no image column, "
    "e.g. '{item_id:.3}/{item_id}.jpg' (H&M); items whose file is absent get no image.",
)
@click.option(
    "--image-url-column",
    help="Items column of http(s) image URLs to download (default: a column named image_url).",
)
@click.option(
    "--allow-private-network",
    "allow_private",
    multiple=True,
    metavar="ADDRESS[/BITS]",
    help="Let image downloads reach this non-public address or network (repeatable), e.g. 127.0.0.1 or "
    "10.0.0.0/8. Link-local (169.254.169.254), multicast and unspecified addresses are never allowed.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_source_errors
def ingest_table(
    ctx,
    items,
    interactions,
    users,
    images,
    maps,
    name,
    image_template,
    image_url_column,
    allow_private,
    as_json,
):
    """Generic tables: items item_id,title,text,image|image_url; interactions user_id,item_id,timestamp[,event,value]."""
    from extractors.fetch import FetchPolicy, parse_allow
    from recipes.config import has_image_file, template_images
    from recipes.ingest.sources import parse_mapping, table

    try:
        fetch = FetchPolicy(allow=parse_allow(allow_private))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--allow-private-network") from None
    src = table(
        items, interactions, users, images, parse_mapping(maps), name, image_url_column=image_url_column
    )
    if image_template:
        src.items = template_images(src.items, image_template, images)
    if images is not None and not has_image_file(src.items, images):
        click.echo(
            f"warning: --images {images} given, but no item's image column or --image-template names a file "
            "there; pass --image-template '{item_id}.jpg' or --map COLUMN=image",
            err=True,
        )
    _run_ingest(ctx, src, as_json, fetch)


@ingest.command("amazon")
@click.argument("reviews", type=click.Path(path_type=Path))
@click.argument("meta", type=click.Path(path_type=Path))
@click.option("--name", help="Source name recorded on every row (default: amazon:<reviews file name>).")
@click.option("--no-images", is_flag=True, help="Do not download the items' image URLs.")
@click.option(
    "--allow-private-network",
    "allow_private",
    multiple=True,
    metavar="ADDRESS[/BITS]",
    help="Let image downloads reach this non-public address or network (repeatable).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@_source_errors
def ingest_amazon_cmd(ctx, reviews, meta, name, no_images, allow_private, as_json):
    """Amazon reviews + metadata JSON lines (2014/2018 or 2023 layout, gzipped or not): items with their image
    URLs, derived users, ratings as interactions, review texts in the reviews table."""
    from extractors.fetch import FetchPolicy, parse_allow
    from recipes.ingest.amazon import amazon, ingest_amazon

    try:
        fetch = FetchPolicy(allow=parse_allow(allow_private))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--allow-private-network") from None
    src = amazon(reviews, meta, name, images=not no_images)
    _run_ingest(ctx, src, as_json, fetch, run=ingest_amazon)


# ---- SQL ---------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("query")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    help="Output format (default: table on the terminal; with --out, from the file's suffix).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Stream the whole result to this file (outside the workspace).",
)
@click.option(
    "--version", "pins", multiple=True, help="Pin a table to a version: TABLE=VERSION (repeatable)."
)
@click.option("--snapshot", help="Read the tables as pinned by this snapshot.")
@click.option(
    "--timeout", default=60.0, show_default=True, help="Stop the query after this many seconds (0: never)."
)
@click.option(
    "--memory-limit", default="2GB", show_default=True, help="DuckDB's memory limit, e.g. 512MB or 4GB."
)
@click.option(
    "--max-rows", default=1000, show_default=True, help="Print at most this many rows (--out writes all)."
)
@click.pass_context
def sql(ctx, query, fmt, out, pins, snapshot, timeout, memory_limit, max_rows):
    """Read-only SQL (DuckDB) over every table of the workspace, bounded in time and memory."""
    from stores.sql import SqlLimits, SqlRefused, SqlStopped, open_sql

    ws = _ws(ctx, create=False)
    versions = {}
    for pin in pins:
        name, _, ver = pin.partition("=")
        if not ver.isdigit():
            raise click.ClickException(f"--version {pin!r}: write TABLE=VERSION, e.g. items=3")
        versions[name] = int(ver)
    if out is not None:
        _check_out(out, ws)
    fmt = fmt or (_format_of(out) if out else "table")
    if out is not None:
        if fmt == "table":
            raise click.ClickException(
                "--format table is for the terminal; write --out files as parquet, csv or json"
            )
    elif fmt == "parquet":
        raise click.ClickException("--format parquet needs --out FILE")
    try:
        limits = SqlLimits(timeout_s=timeout, memory=memory_limit)
        if snapshot:
            from stores.snapshots import snapshot_versions

            versions = snapshot_versions(ws, snapshot) | versions
        with open_sql(ws, query, versions=versions, limits=limits) as reader:
            if out is not None:
                _write_out(reader, fmt, out)
            else:
                _print_head(reader, fmt, max_rows)
    except (SqlRefused, SqlStopped, KeyError, ValueError) as exc:
        raise click.ClickException(str(exc).strip('"')) from None


def _format_of(out: Path) -> str:
    formats = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
    if out.suffix.lower() not in formats:
        raise click.ClickException(
            f"--out {out}: cannot tell the format from {out.suffix or 'no suffix'!r}; "
            "use .parquet, .csv or .json, or pass --format"
        )
    return formats[out.suffix.lower()]


def _check_out(out: Path, ws) -> None:
    """Refuse an --out path that would land inside the workspace or cannot be written, before the query runs."""
    target = out.expanduser().resolve()
    if ws.is_local and target.is_relative_to(Path(ws.uri)):
        raise click.ClickException(f"--out {out} is inside the workspace {ws.uri}; write results outside it")
    if target.is_dir():
        raise click.ClickException(
            f"--out {out} is a folder; give a file name, e.g. {out / 'result.parquet'}"
        )
    if not target.parent.is_dir():
        raise click.ClickException(f"--out {out}: folder {target.parent} does not exist; create it first")


def _write_out(reader, fmt: str, out: Path) -> None:
    """Stream every batch to `out` (through a .partial file renamed at the end, so a stopped query leaves none)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    partial = out.with_name(out.name + ".partial")
    try:
        if fmt == "parquet":
            with pq.ParquetWriter(str(partial), reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        elif fmt == "csv":
            with pacsv.CSVWriter(str(partial), reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        else:
            with open(partial, "w") as fh:
                fh.write("[")
                sep = "\n"
                for batch in reader:
                    for row in batch.to_pylist():
                        fh.write(sep + json.dumps(row, default=str))
                        sep = ",\n"
                fh.write("\n]\n")
        partial.replace(out)
    except OSError as exc:
        raise click.ClickException(f"cannot write --out {out}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


def _print_head(reader, fmt: str, max_rows: int) -> None:
    """Print the first `max_rows` rows and stop reading: the rest of the result is never computed."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    batches, rows = [], 0
    for batch in reader:
        batches.append(batch)
        rows += batch.num_rows
        if rows > max_rows:
            break
    head = pa.Table.from_batches(batches, schema=reader.schema)
    cut = head.num_rows > max_rows
    head = head.slice(0, max_rows)
    if fmt == "csv":
        sys.stdout.flush()
        pacsv.write_csv(head, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    elif fmt == "json":
        click.echo(json.dumps(head.to_pylist(), default=str, indent=1))
    else:
        print_table(head.column_names, (row.values() for row in head.to_pylist()))
    if cut:
        click.echo(
            f"output cut at {max_rows} rows (--max-rows); add a LIMIT, raise --max-rows, or write everything "
            "with --out FILE",
            err=True,
        )


def main() -> None:
    cli(obj={})


if __name__ == "__main__":
    main()
