"""CLI verbs for trainers: `mmfeat snapshot create|list|show|reissue` and `mmfeat train-example`."""

from __future__ import annotations

import json

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import print_table
from flows.cli_context import workspace_of as _ws


def _brief(info: dict) -> dict:
    skip = ("split_manifest", "graph_manifests", "semantic_id_manifests", "previous")
    return {k: v for k, v in info.items() if k not in skip} | {"reissues": len(info.get("previous", []))}


@click.group()
def snapshot() -> None:
    """Version-pinned snapshots of what a trainer reads (items, features, a split, graphs)."""


@snapshot.command("create")
@click.argument("name")
@click.option("--split", "split_name", required=True, help="Split to pin (table split_<name>).")
@click.option(
    "--feature", "features", multiple=True, help="Feature to pin (e.g. text, clip_image); repeatable."
)
@click.option("--graph", "graphs", multiple=True, help="Graph built on the split to pin; repeatable.")
@click.option(
    "--semantic-ids", "semantic_ids", multiple=True, help="Semantic-ID artifact to pin; repeatable."
)
@click.option("--replace", is_flag=True, help="Overwrite an existing snapshot of this name.")
@click.pass_context
@_errors
def create(ctx, name, split_name, features, graphs, semantic_ids, replace):
    """Pin the current versions of items, FEATUREs, the split, GRAPHs and SEMANTIC_IDS under NAME."""
    from stores.snapshots import create_snapshot

    info = create_snapshot(
        _ws(ctx),
        name,
        split_name,
        list(features),
        list(graphs),
        replace=replace,
        semantic_ids=list(semantic_ids),
    )
    click.echo(json.dumps(_brief(info), indent=2, default=str))


@snapshot.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx, as_json):
    """Every snapshot with its status: ok, invalidated (by erasure) or stale (pinned versions cleaned up)."""
    from stores.snapshots import list_snapshots

    rows = list_snapshots(_ws(ctx, create=False))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo(
            "no snapshots (create one with `mmfeat snapshot create NAME --split S --feature F --graph G`)"
        )
        return
    pins = [f"{','.join(r['features']) or '-'} / {','.join(r['graphs']) or '-'}" for r in rows]
    table = [
        (r["name"], r["status"], r["split"], r["created_at"], p) for r, p in zip(rows, pins, strict=True)
    ]
    print_table(("name", "status", "split", "created", "features / graphs"), table)


@snapshot.command("show")
@click.argument("name")
@click.pass_context
@_errors
def show(ctx, name):
    """The manifest of NAME: pinned tables and versions, split and graph manifests, status, history."""
    from stores.snapshots import show_snapshot

    click.echo(json.dumps(show_snapshot(_ws(ctx, create=False), name), indent=2, default=str))


@snapshot.command("reissue")
@click.argument("name")
@click.pass_context
@_errors
def reissue(ctx, name):
    """Pin the current versions of NAME's tables under the same name (after erasure); the old manifest is kept."""
    from stores.snapshots import reissue_snapshot

    info = reissue_snapshot(_ws(ctx), name)
    before = info["previous"][0]["tables"]
    click.echo(f"snapshot {name} re-issued:")
    for table, version in sorted(info["tables"].items()):
        old = before.get(table)
        click.echo(f"  {table:<32}{old!s:>6} -> {version}")


@click.command("train-example")
@click.option("--snapshot", "snapshot_name", required=True, help="Snapshot to train on.")
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(["popularity", "mf_bpr", "freedom"]),
    help="Models to train (default: all three).",
)
@click.option(
    "--feature", "features", multiple=True, help="Features for FREEDOM's modality terms (default: all)."
)
@click.option("--ui-graph", help="User-item graph (default: the snapshot's only one).")
@click.option("--item-graph", help="Item-item graph (default: the snapshot's only one).")
@click.option(
    "--epochs", default=120, show_default=True, help="At most; stops early on validation recall@20."
)
@click.option("--lr", default=2e-3, show_default=True, help="FREEDOM's learning rate.")
@click.option("--mf-lr", default=1e-3, show_default=True, help="MF-BPR's learning rate.")
@click.option(
    "--edge-keep", default=0.2, show_default=True, help="FREEDOM: share of user-item edges kept per epoch."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, help="Torch threads.")
@click.option(
    "--retain", "retain_split", help="Unlearning evaluation: the retain split (full vs retain-only)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
@_errors
def train_example(
    ctx,
    snapshot_name,
    models,
    features,
    ui_graph,
    item_graph,
    epochs,
    lr,
    mf_lr,
    edge_keep,
    seed,
    threads,
    retain_split,
    as_json,
):
    """Train FREEDOM-style, MF-BPR and popularity on a snapshot; MMRec all-ranking recall/NDCG@10/20."""
    from recipes.train_example import TrainConfig, compare, format_table, unlearning_eval
    from stores.reader import FeatureReader

    ws = _ws(ctx, create=False)
    cfg = TrainConfig(
        models=tuple(models) or TrainConfig.models,
        features=tuple(features) or None,
        ui_graph=ui_graph,
        item_graph=item_graph,
        epochs=epochs,
        lr=lr,
        mf_lr=mf_lr,
        edge_keep=edge_keep,
        seed=seed,
        threads=threads,
    )
    reader = FeatureReader(ws, snapshot_name)
    log = (lambda s: click.echo(s, err=True)) if not as_json else (lambda s: None)
    if retain_split:
        from stores.artifacts import load_split

        results = unlearning_eval(reader, load_split(ws, retain_split), cfg, log=log)
        if as_json:
            click.echo(json.dumps(results, indent=2, default=str))
            return
        click.echo(f"forget {results['counts']['forget']} interactions, retain {results['counts']['retain']}")
        metrics = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
        print_table(
            ("model", "set", *metrics),
            [
                (name, part, *(f"{r[part][m]:.4f}" for m in metrics))
                for name, r in results.items()
                if name != "counts"
                for part in ("forget", "retain", "test")
            ],
        )
        return
    results = compare(reader, cfg, log=log)
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
    else:
        click.echo(format_table(results))
