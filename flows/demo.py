"""`mmfeat demo`: a synthetic catalog, ingested and summarised, offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from recipes.demo_data import generate_catalog
from recipes.ingest import ingest
from recipes.sources import table
from stores.workspace import Workspace


def run_demo(ws: Workspace, n_items: int = 120, n_users: int = 60, seed: int = 0, echo: Callable = print) -> dict:
    """Generate the demo catalog next to the workspace, ingest it, and print what landed where."""
    from flows.cli import print_ingest_report

    source_dir = Path(ws.uri).parent / "mmfeat-demo-source" if ws.is_local else Path("mmfeat-demo-source")
    cat = generate_catalog(source_dir, n_items=n_items, n_users=n_users, seed=seed)
    echo(f"demo catalog: {n_items} items, {n_users} users -> {cat.root}")
    report = ingest(ws, table(cat.items, cat.interactions, cat.users, cat.images, name="demo"))
    print_ingest_report(report)
    counts = {name: ws.count(name) for name in ("items", "item_images", "users", "interactions", "quarantine")}
    echo("workspace " + ws.uri + ": " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    echo('next: mmfeat sql "select category, count(*) from (select json_extract_string(attributes, \'$.category\') '
         'category from items) group by 1"')
    return counts
