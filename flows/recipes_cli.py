"""CLI verbs for training recipes: `mmfeat split`, `mmfeat graph ...`, `mmfeat export ...`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import workspace_of as _ws


def _show(info: dict) -> None:
    brief = {k: v for k, v in info.items() if k not in ("feature_provenance", "fingerprint")}
    click.echo(json.dumps(brief, indent=2, default=str))


RECIPE_ENGINE = click.option(
    "--engine",
    type=click.Choice(["auto", "memory", "stream", "ray"]),
    default="auto",
    show_default=True,
    help="memory: whole table; stream: batches, bounded memory; ray: Ray tasks over partitions ($RAY_ADDRESS "
    "or a local Ray); auto: stream above 2M rows. All write the same rows.",
)
"""The engine option of `split` and `graph user-item` (recipes.pipeline.ENGINES)."""


@click.command()
@click.option("--name", required=True, help="Split name (table split_<name>).")
@click.option(
    "--scheme",
    type=click.Choice(["random", "temporal", "loo", "cutoff"]),
    default="random",
    show_default=True,
)
@click.option("--kcore", default=0, show_default=True, help="Iterative k-core on users and items (0 = none).")
@click.option(
    "--kcore-counts",
    type=click.Choice(["partners", "rows"]),
    default="partners",
    show_default=True,
    help="What k counts when a user-item pair repeats (--dedup all): distinct partners, or every row.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--ratios", default="0.8,0.1,0.1", show_default=True, help="train,valid,test for random/temporal."
)
@click.option("--cutoff", help="valid_start,test_start as ISO dates, for --scheme cutoff.")
@click.option("--dedup", type=click.Choice(["first", "last", "all"]), default="first", show_default=True)
@RECIPE_ENGINE
@click.pass_context
@_errors
def split(ctx, name, scheme, kcore, kcore_counts, seed, ratios, cutoff, dedup, engine):
    """Filter and split the interactions into a versioned split table with a manifest."""
    from recipes.pipeline import build_split
    from recipes.splits import SplitConfig

    parts = tuple(float(x) for x in ratios.split(","))
    cut = None
    if cutoff:
        a, b = cutoff.split(",")
        cut = tuple(datetime.fromisoformat(x).replace(tzinfo=UTC) for x in (a, b))
    cfg = SplitConfig(
        scheme=scheme,
        kcore=kcore,
        kcore_counts=kcore_counts,
        seed=seed,
        ratios=parts,
        cutoff=cut,
        dedup=dedup,
    )
    _show(build_split(_ws(ctx), name, cfg, engine=engine))


@click.group()
def graph() -> None:
    """Build graphs from the train part of a named split."""


@graph.command("user-item")
@click.option("--split", "split_name", required=True)
@click.option("--norm", type=click.Choice(["none", "sym", "lattice"]), default="sym", show_default=True)
@click.option("--name", help="Graph name (default derived from the parameters).")
@RECIPE_ENGINE
@click.pass_context
@_errors
def graph_ui(ctx, split_name, norm, name, engine):
    """User-item graph: raw, D^-1/2 A D^-1/2 (FREEDOM/LightGCN) or LATTICE row-normalised with self-loops."""
    from recipes.pipeline import build_ui_graph

    _show(build_ui_graph(_ws(ctx), split_name, norm, name, engine=engine))


@graph.command("knn")
@click.option("--split", "split_name", required=True)
@click.option("--feature", "features", multiple=True, required=True, help="Feature name(s); repeat to fuse.")
@click.option(
    "--weight", "weights", multiple=True, type=float, help="Per-feature fusion weight (FREEDOM: 0.1, 0.9)."
)
@click.option("-k", "--k", default=10, show_default=True)
@click.option(
    "--norm", type=click.Choice(["freedom", "lattice", "none"]), default="freedom", show_default=True
)
@click.option("--symmetric", is_flag=True, help="Add the reverse of every edge.")
@click.option("--no-self-loops", is_flag=True, help="Pick k neighbours other than the item itself.")
@click.option(
    "--method",
    type=click.Choice(["exact", "ann", "auto"]),
    default="exact",
    show_default=True,
    help="ann: faiss (pip install faiss-cpu), recall@k on a sample in the manifest; auto: ann above 200k items.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: exact search over Ray actors by query block ($RAY_ADDRESS, else a local Ray); same graph.",
)
@click.option("--ann-index", type=click.Choice(["ivf_flat", "hnsw"]), default="ivf_flat", show_default=True)
@click.option("--name")
@click.pass_context
@_errors
def graph_knn(
    ctx, split_name, features, weights, k, norm, symmetric, no_self_loops, method, engine, ann_index, name
):
    """Item-item cosine top-k graph(s), MMRec-exact LATTICE / FREEDOM normalisation, optional fusion."""
    from recipes.pipeline import build_knn_graph

    _show(
        build_knn_graph(
            _ws(ctx),
            split_name,
            list(features),
            k,
            norm,
            list(weights) or None,
            symmetric,
            not no_self_loops,
            name,
            method=method,
            engine=engine,
            ann_index=ann_index,
        )
    )


@graph.command("cooccur")
@click.option("--split", "split_name", required=True)
@click.option("--kind", type=click.Choice(["item", "user"]), default="item", show_default=True)
@click.option("-k", "--k", default=10, show_default=True, help="Neighbours kept (DualGNN: 200 users).")
@click.option("--weight", type=click.Choice(["count", "jaccard"]), default="count", show_default=True)
@click.option("--name")
@click.pass_context
@_errors
def graph_cooccur(ctx, split_name, kind, k, weight, name):
    """Item-item (shared users) or user-user (shared items) co-occurrence graph."""
    from recipes.pipeline import build_cooccur_graph

    _show(build_cooccur_graph(_ws(ctx), split_name, kind, k, weight, name))


@graph.command("hyper")
@click.option("--split", "split_name", required=True)
@click.option("--kind", type=click.Choice(["user", "item"]), default="user", show_default=True)
@click.option("--knn", "knn_graphs", multiple=True, help="Stored kNN graph(s) for the item hypergraph.")
@click.option("--name")
@click.pass_context
@_errors
def graph_hyper(ctx, split_name, kind, knn_graphs, name):
    """MMHCL-style user or item hypergraph operator."""
    from recipes.pipeline import build_hypergraph

    _show(build_hypergraph(_ws(ctx), split_name, kind, list(knn_graphs) or None, name))


@click.command()
@click.argument("fmt", type=click.Choice(["mmrec", "recbole", "pyg"]))
@click.option("--split", "split_name", required=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--feature", "features", multiple=True, help="OUT_NAME=FEATURE, e.g. image_feat=clip_image.")
@click.option("--name", help="Dataset name (default: the split name).")
@click.option(
    "--user-graph-k", default=0, help="MMRec: also write DualGNN's user graph with this k (e.g. 200)."
)
@click.option(
    "--missing",
    type=click.Choice(["mean", "zero", "drop"]),
    default="mean",
    show_default=True,
    help="Items without a feature: the mean vector (MMRec's convention), zeros, or drop them and their rows.",
)
@click.option(
    "--semantic-ids",
    help="Also write this semantic-ID artifact (mmfeat semantic-ids): MMRec semantic_ids.tsv, RecBole sid column.",
)
@click.pass_context
@_errors
def export(ctx, fmt, split_name, out, features, name, user_graph_k, missing, semantic_ids):
    """Export a split to MMRec, RecBole or PyG format (id maps saved beside it)."""
    from recipes.pipeline import export as do_export

    mapping = {}
    for pair in features:
        out_name, sep, feature = pair.partition("=")
        if not sep:
            raise click.ClickException(
                f"--feature {pair!r}: write OUT_NAME=FEATURE, e.g. image_feat=clip_image"
            )
        mapping[out_name] = feature
    report = do_export(_ws(ctx), split_name, fmt, out, mapping, name, user_graph_k, missing, semantic_ids)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    written = ", ".join(sorted(p.name for p in report.files.values()))
    click.echo(
        f"exported {fmt} to {out}: {report.n_rows} rows, {report.n_users} users, {report.n_items} items "
        f"({written})"
    )
