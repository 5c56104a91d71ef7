"""`mmfeat caption`, `mmfeat encode image|text|caption` and `mmfeat features`: thin wrappers over the runner.

Registered on the main group in flows/cli.py. Model classes are imported inside the commands, so `mmfeat --help`
does not pay for torch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import print_table
from flows.cli_context import workspace_of as _ws

if TYPE_CHECKING:
    from stores.features import FeatureInfo

# Models are chosen by extractors/registry.py (imported inside the commands, so the CLI does not import torch);
# these names select CLIP's text tower for `encode text|caption`.
CLIP_PREFIX = "clip:"
CLIP_TEST_NAMES = ("tiny-test", "test:tiny-clip")


def _run_options(fn):
    """Options every extraction shares: sizes, parallelism, engine and output format."""
    options = [
        click.option("--batch-size", default=64, show_default=True, help="Rows per model call."),
        click.option(
            "--chunk-rows",
            default=1024,
            show_default=True,
            help="Rows per commit: a crash loses at most this many rows of work.",
        ),
        click.option("--concurrency", type=int, help="Model actors (default: one per GPU, else CPUs - 1)."),
        click.option(
            "--threads", type=int, help="Torch threads per CPU actor (default 1: the CPU it claims)."
        ),
        click.option(
            "--engine",
            type=click.Choice(["ray", "local"]),
            default="ray",
            show_default=True,
            help="ray: local Ray, or the cluster at $RAY_ADDRESS; local: in this process, no Ray.",
        ),
        click.option(
            "--retry-failed", is_flag=True, help="Retry items that failed before on the same input."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(ctx, feature, spec, source, fields, opts, index_min_rows=None, overwrite=False):
    from extractors.ray_session import ray_errors
    from extractors.registry import preflight
    from extractors.runner import run_extraction
    from stores.errors import MmfeatError

    as_json = opts.pop("as_json")
    try:
        preflight(spec)
        with ray_errors(f"extract {feature}"):
            summary = run_extraction(
                _ws(ctx),
                feature,
                spec,
                source=source,
                fields=fields,
                index_min_rows=index_min_rows,
                overwrite=overwrite,
                **opts,
            )
    except MmfeatError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        print_summary(summary)


def print_summary(s) -> None:
    prov = s.provenance
    dim = f", {prov['dim']}-d" if prov.get("dim") else ""
    untrained = "  (UNTRAINED weights)" if prov.get("revision") == "untrained" else ""
    click.echo(
        f"{s.feature} -> {s.table}: {prov.get('model')} @ {prov.get('revision')}{dim}{untrained} [{s.engine}]"
    )
    click.echo(
        f"  {'items':>8}{'eligible':>10}{'done':>8}{'unchanged':>11}{'failed':>8}{'known fail':>12}"
        f"{'no input':>10}{'model calls':>13}{'items/s':>9}{'seconds':>9}"
    )
    click.echo(
        f"  {s.items:>8}{s.eligible:>10}{s.done:>8}{s.skipped:>11}{s.failed:>8}{s.known_failed:>12}"
        f"{s.no_input:>10}{s.model_calls:>13}{s.throughput:>9.1f}{s.seconds:>9.1f}"
    )
    if s.reasons:
        click.echo(
            "  failures: "
            + ", ".join(f"{k}={v}" for k, v in sorted(s.reasons.items()))
            + '  (mmfeat sql "select * from extract_failures")'
        )
    if s.pruned:
        click.echo(f"  removed {s.pruned} rows of items that no longer have input")
    if s.index != "none":
        click.echo(f"  ANN index: {s.index}")


# ---- caption -----------------------------------------------------------------------------------------------------


@click.command()
@click.option(
    "--model",
    help="Hugging Face VLM / BLIP id or local folder (default Salesforce/blip-image-captioning-large; "
    "tiny-test: an untrained toy for tests).",
)
@click.option("--prompt", help="Instruction for chat VLMs, or the caption's prefix for BLIP.")
@click.option("--max-new-tokens", default=40, show_default=True)
@click.option(
    "--caption-engine",
    type=click.Choice(["transformers", "vllm"]),
    default="transformers",
    show_default=True,
    help="transformers (CPU or GPU) or vllm (GPU only; the optional vllm extra, infra/docker/Dockerfile.gpu-vllm).",
)
@_run_options
@click.pass_context
@_errors
def caption(ctx, model, prompt, max_new_tokens, caption_engine, **opts):
    """Caption every item image into the `captions` table (one caption per item; a new model or prompt
    replaces the old caption, and each row records which model and prompt made it)."""
    from extractors.registry import caption_spec
    from stores.features import CAPTION_FEATURE

    spec = caption_spec(model, prompt, max_new_tokens, caption_engine)
    _run(ctx, CAPTION_FEATURE, spec, "image", ("title", "text"), opts)


# ---- encode ------------------------------------------------------------------------------------------------------


@click.command()
@click.argument("source", type=click.Choice(["image", "text", "caption"]))
@click.option(
    "--model",
    help="image: open_clip architecture (default ViT-B-32 with laion2b_s34b_b79k weights; tiny-test: an "
    "untrained toy for tests); text and caption: a sentence-transformers id or folder (default: the packaged "
    "all-MiniLM-L6-v2), or clip:ARCH for CLIP's text tower.",
)
@click.option("--pretrained", help="open_clip weights tag or checkpoint file (CLIP models only).")
@click.option("--clip-text", is_flag=True, help="Encode text with CLIP's text tower (titles by default).")
@click.option(
    "--fields", help="Item text columns to join as 'title. text' (default title,text; CLIP: title)."
)
@click.option("--feature", "feature", help="Output feature name: the table is feat_<NAME>.")
@click.option("--index-min-rows", type=int, help="Build the ANN index once the table has this many rows.")
@click.option("--overwrite", is_flag=True, help="Drop an existing feature table of another vector width.")
@_run_options
@click.pass_context
@_errors
def encode(ctx, source, model, pretrained, clip_text, fields, feature, index_min_rows, overwrite, **opts):
    """Embed item images, item text or captions into a vector table feat_<feature>.

    \b
    mmfeat encode image                          -> feat_clip_image
    mmfeat encode text --clip-text               -> feat_clip_title (CLIP text tower on titles)
    mmfeat encode text --fields text             -> feat_text (MiniLM on overviews)
    mmfeat encode caption                        -> feat_caption_text
    """
    from extractors import registry

    use_clip = (
        source == "image" or clip_text or (model or "").startswith(CLIP_PREFIX) or model in CLIP_TEST_NAMES
    )
    name = (model or "").removeprefix(CLIP_PREFIX) or None
    if source == "image":
        spec = registry.image_spec(name, pretrained)
        default_feature = "clip_image"
    elif use_clip:
        spec = registry.clip_text_spec(name, pretrained)
        default_feature = "clip_caption" if source == "caption" else None
    else:
        if pretrained:
            raise click.ClickException(
                "--pretrained applies to CLIP models; pass the sentence-transformers id as --model"
            )
        spec = registry.text_spec(name)
        default_feature = "caption_text" if source == "caption" else "text"
    field_list = (
        tuple(f.strip() for f in fields.split(",") if f.strip())
        if fields
        else (("title",) if use_clip else ("title", "text"))
    )
    if default_feature is None:  # CLIP text tower on item text
        default_feature = "clip_title" if field_list == ("title",) else "clip_text"
    _run(ctx, feature or default_feature, spec, source, field_list, opts, index_min_rows, overwrite)


# ---- features ----------------------------------------------------------------------------------------------------


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def features(ctx, as_json):
    """List the extracted features: width, rows, item coverage, failures, model and revision, ANN index, and
    flags: UNTRAINED (its weights, or the captions it embeds, are untrained) and DEGENERATE (its values are
    (nearly) all the same on a sample: see stores/features.py `degenerate_reason`)."""
    from stores.features import list_features

    infos = list_features(_ws(ctx, create=False))
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        click.echo("no features yet: run `mmfeat caption` or `mmfeat encode image|text|caption`")
        return
    header = ("feature", "table", "dim", "rows", "coverage", "failures", "model", "revision", "index")
    header += ("flags",)
    rows = [
        (
            i.feature,
            i.table,
            str(i.dim or "-"),
            str(i.rows),
            f"{100 * i.coverage:.1f}%",
            str(i.failures),
            i.model,
            i.revision + (" (UNTRAINED)" if i.untrained else ""),
            i.index,
            _flags(i),
        )
        for i in infos
    ]
    print_table(header, rows)
    for i in infos:
        if i.degenerate:
            click.echo(f"warning: feature {i.feature} is DEGENERATE: {i.degenerate}", err=True)


def _flags(info: FeatureInfo) -> str:
    """The table's flags column: UNTRAINED (own or caption weights) and DEGENERATE, or "-"."""
    flags = ["UNTRAINED" + (" captions" if info.untrained_input else "")] if info.untrained else []
    flags += ["DEGENERATE"] if info.degenerate else []
    return ", ".join(flags) or "-"
