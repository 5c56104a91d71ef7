"""`mmfeat report`: render the workspace's dataset report to one self-contained HTML file.

Registered lazily in flows/cli.py (LAZY_COMMANDS); the workspace comes from the group's --workspace.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from flows.cli_context import workspace_of


@click.command()
@click.option("--snapshot", help="Report the tables as pinned by this snapshot (default: current tables).")
@click.option("--split", "split", help="Split to show (table split_NAME; default: the first split, if any).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="HTML file to write.",
)
@click.option("--kcore", default=5, show_default=True, help="k of the core shown when there is no split.")
@click.option("--max-points", default=5000, show_default=True, help="Items per embedding projection.")
@click.option(
    "--knn-items", default=20000, show_default=True, help="Items per computed kNN graph (a sample)."
)
@click.pass_context
def report(ctx, snapshot, split, out, kcore, max_points, knn_items):
    """Dataset report: counts, degrees, time, coverage, captions, projections, kNN graphs, forget requests."""
    from recipes.report.data import load_report_data
    from recipes.report.render import ReportConfig, ReportError, render_report

    try:
        cfg = ReportConfig(kcore=kcore, max_points=max_points, knn_max_items=knn_items)
        start = time.perf_counter()
        data = load_report_data(workspace_of(ctx, create=False), cfg, snapshot=snapshot, split=split)
        page = render_report(data, cfg)
    except (ReportError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc).strip('"')) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    size = out.stat().st_size / 1e6
    click.echo(f"wrote {out} ({size:.1f} MB) in {time.perf_counter() - start:.1f} s")
