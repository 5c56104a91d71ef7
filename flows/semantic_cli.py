"""CLI verb `mmfeat semantic-ids`: residual k-means or RQ-VAE codes per item, a versioned artifact (recipes/pipeline.py)."""

from __future__ import annotations

import json

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import workspace_of as _ws


@click.command("semantic-ids")
@click.option("--feature", "features", multiple=True, required=True, help="Feature to code (repeatable).")
@click.option(
    "--weight", "weights", multiple=True, type=float, help="One weight per --feature (default equal)."
)
@click.option("--levels", default=3, show_default=True, help="Codes per item (residual k-means levels).")
@click.option("--codebook", default=256, show_default=True, help="Centroids per level.")
@click.option("--method", type=click.Choice(["rq-kmeans", "rq-vae"]), default="rq-kmeans", show_default=True)
@click.option(
    "--balanced", is_flag=True, help="rq-kmeans: capacity-constrained assignment, codes spread evenly."
)
@click.option("--steps", default=1000, show_default=True, help="rq-vae: training steps (256 items each).")
@click.option("--latent", default=64, show_default=True, help="rq-vae: the encoder's output dimension.")
@click.option(
    "--pca",
    type=click.IntRange(min=1),
    default=None,
    help="Quantise the vectors' top PCA components (centred) instead of the vectors.",
)
@click.option(
    "--missing",
    type=click.Choice(["mean", "drop"]),
    default="mean",
    show_default=True,
    help="With several features, an item lacking some: mean-fill those, or give it no codes.",
)
@click.option("--name", required=True, help="Artifact name (table semantic_ids_<name>).")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even when the features are unchanged.")
@click.pass_context
@_errors
def semantic_ids(
    ctx, features, weights, levels, codebook, method, balanced, steps, latent, pca, missing, name, seed, force
):
    """Semantic IDs (TIGER-style): L codes per item plus a collision suffix, skipped when the features are unchanged.

    \b
    mmfeat semantic-ids --feature text --levels 3 --codebook 256 --name text_rq
    mmfeat semantic-ids --feature text --method rq-vae --pca 32 --latent 32 --name text_vae
    mmfeat export recbole --split main --out out/ --semantic-ids text_rq
    """
    from recipes.pipeline import build_semantic_ids
    from recipes.semantic_ids import SemanticIdConfig

    cfg = SemanticIdConfig(
        levels=levels,
        codebook=codebook,
        method=method,
        balanced=balanced,
        seed=seed,
        steps=steps,
        latent=latent,
        pca=pca,
    )
    info = build_semantic_ids(_ws(ctx), name, list(features), cfg, list(weights) or None, missing, force)
    brief = {k: v for k, v in info.items() if k not in ("inputs", "fingerprint")}
    click.echo(json.dumps(brief, indent=2, default=str))
