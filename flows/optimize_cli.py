"""`mmfeat optimize`: lay the interactions out by user so that a forget rewrites only a few fragments.

The refresh flow runs the same step on its own (recipes/refresh.py `cluster_interactions`) once enough rows were
appended since the last clustering; this command runs it now.
"""

from __future__ import annotations

import json

import click

from flows.cli_context import workspace_of as _ws


@click.command("optimize")
@click.option(
    "--rows-per-fragment",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per fragment of the clustered table (default 131072): a forget rewrites one or two of them.",
)
@click.option(
    "--min-rows",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Leave smaller tables as they are.",
)
@click.option("--force", is_flag=True, help="Cluster even when the table is already clustered.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def optimize(
    ctx: click.Context, rows_per_fragment: int | None, min_rows: int, force: bool, as_json: bool
) -> None:
    """Cluster interactions by user_id in bounded fragments (bounded memory; one new table version), unless
    fewer than 5% of its rows were appended since the last clustering."""
    from stores.erasure.physical import CLUSTER_ROWS, cluster_if_needed

    ws = _ws(ctx)
    out = cluster_if_needed(
        ws,
        "interactions",
        "user_id",
        min_rows,
        rows_per_fragment=rows_per_fragment or CLUSTER_ROWS,
        force=force,
    )
    if as_json:
        click.echo(json.dumps(out, default=str))
    elif out.get("skipped"):
        click.echo(f"{out['table']}: {out['skipped']} ({out.get('rows', 0):,} rows), nothing written")
    else:
        click.echo(
            f"{out['table']}: clustered by {out['by']}, {out['rows']:,} rows in {out['fragments']} fragments "
            f"(version {out['version']}; {out['unclustered_rows']:,} rows were out of place)"
        )
