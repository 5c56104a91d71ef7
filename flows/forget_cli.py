"""CLI verbs for unlearning: `mmfeat forget ...`, `mmfeat verify-erasure`, `mmfeat unlearn-split`.

    mmfeat forget user 1 --reason "GDPR art. 17" --requester dpo@example.org
    mmfeat forget item 50 --request-id licence-2024-07
    mmfeat forget interactions --pair 1:50 --pair 2:50          (or --file pairs.csv with user_id,item_id)
    mmfeat forget modality image 12 13 14                       (images, image vectors, captions; text stays)
    mmfeat forget before 1998-01-01T00:00:00Z
    mmfeat forget attribute rights tmdb                          (items whose rights tags include "tmdb")
    mmfeat forget --resume                                       (finish every request a crash left pending)
    mmfeat verify-erasure fr-20240611T101500-1a2b3c4d
    mmfeat unlearn-split --split main --scenario cure4rec --mode most_active --percent 5 --seed 42

Each `forget` prints the JSON receipt; it exits non-zero when verification did not pass.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import workspace_of as _ws


def _request_options(fn):
    fn = click.option("--reason", default="", help="Why (recorded in the request log).")(fn)
    fn = click.option("--requester", default="", help="Who asked (recorded in the request log).")(fn)
    fn = click.option("--request-id", help="Idempotency key; the same id twice does the work once.")(fn)
    return fn


def _run(ctx: click.Context, **fields) -> None:
    from recipes.unlearning.forget import forget as do_forget
    from stores.erasure.requests import ForgetRequest, new_request_id

    request_id = fields.pop("request_id", None) or new_request_id()
    request = ForgetRequest(request_id, **fields)
    receipt = do_forget(_ws(ctx), request)
    click.echo(json.dumps(receipt, indent=2, default=str))
    if not receipt["verification"]["verified"]:
        raise click.ClickException(
            f"request {request_id}: verification found what should be gone: {receipt['verification']['problems']}"
        )


@click.group(invoke_without_command=True)
@click.option("--resume", is_flag=True, help="Finish every forget request a crash left pending, then exit.")
@click.pass_context
@_errors
def forget(ctx, resume) -> None:
    """Forget users, items, interactions, a modality, old interactions or items by attribute, everywhere."""
    if resume and ctx.invoked_subcommand is not None:
        raise click.UsageError("--resume takes no subcommand: `mmfeat forget --resume`")
    if not resume:
        if ctx.invoked_subcommand is None:
            click.echo(ctx.get_help())
        return
    from recipes.unlearning.forget import resume_pending

    receipts = resume_pending(_ws(ctx, create=False))
    click.echo(json.dumps({"resumed": receipts}, indent=2, default=str))
    failed = [r["request"]["request_id"] for r in receipts if not r["verification"]["verified"]]
    if failed:
        raise click.ClickException(f"resumed requests not verified: {failed}; see their problems above")


@forget.command("user")
@click.argument("user_ids", nargs=-1, required=True)
@_request_options
@click.pass_context
@_errors
def forget_user(ctx, user_ids, reason, requester, request_id):
    """All interactions and the user rows of USER_IDS; re-ingesting them is refused (deny-list)."""
    _run(ctx, kind="user", users=tuple(user_ids), reason=reason, requester=requester, request_id=request_id)


@forget.command("item")
@click.argument("item_ids", nargs=-1, required=True)
@_request_options
@click.pass_context
@_errors
def forget_item(ctx, item_ids, reason, requester, request_id):
    """Items with their interactions, images, captions, vectors and graph edges; re-ingest is refused."""
    _run(ctx, kind="item", items=tuple(item_ids), reason=reason, requester=requester, request_id=request_id)


@forget.command("interactions")
@click.option("--pair", "pairs", multiple=True, help="USER:ITEM (repeatable).")
@click.option(
    "--file", "path", type=click.Path(exists=True, path_type=Path), help="CSV with user_id,item_id."
)
@_request_options
@click.pass_context
@_errors
def forget_interactions(ctx, pairs, path, reason, requester, request_id):
    """Every interaction of the listed user-item pairs."""
    out = []
    for pair in pairs:
        user, sep, item = pair.partition(":")
        if not sep:
            raise click.ClickException(f"--pair {pair!r}: write USER:ITEM, e.g. 1:50")
        out.append((user, item))
    if path is not None:
        with open(path, newline="") as fh:
            out += [(r["user_id"], r["item_id"]) for r in csv.DictReader(fh)]
    if not out:
        raise click.ClickException("give --pair USER:ITEM or --file CSV")
    _run(
        ctx, kind="interactions", pairs=tuple(out), reason=reason, requester=requester, request_id=request_id
    )


@forget.command("modality")
@click.argument("modality", type=click.Choice(["image"]))
@click.argument("item_ids", nargs=-1, required=True)
@_request_options
@click.pass_context
@_errors
def forget_modality(ctx, modality, item_ids, reason, requester, request_id):
    """Everything derived from one modality of ITEM_IDS (image: bytes, image vectors, captions, image-graph
    edges); text-derived features stay."""
    _run(
        ctx,
        kind="modality",
        modality=modality,
        items=tuple(item_ids),
        reason=reason,
        requester=requester,
        request_id=request_id,
    )


@forget.command("before")
@click.argument("when")
@_request_options
@click.pass_context
@_errors
def forget_before(ctx, when, reason, requester, request_id):
    """Interactions older than WHEN (ISO date or date-time; UTC unless it says otherwise)."""
    moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    _run(ctx, kind="before", before=moment, reason=reason, requester=requester, request_id=request_id)


@forget.command("attribute")
@click.argument("attribute")
@click.argument("value")
@_request_options
@click.pass_context
@_errors
def forget_attribute(ctx, attribute, value, reason, requester, request_id):
    """Items whose ATTRIBUTE matches VALUE ("rights": a `;`-separated rights tag; else a key of the items'
    attributes JSON), forgotten as whole items."""
    _run(
        ctx,
        kind="attribute",
        attribute=attribute,
        value=value,
        reason=reason,
        requester=requester,
        request_id=request_id,
    )


@click.command("verify-erasure")
@click.argument("request_id")
@click.option("--details", is_flag=True, help="Print the per-table scan too.")
@click.pass_context
@_errors
def verify_erasure(ctx, request_id, details):
    """Re-scan every table, version, index and file for what REQUEST_ID forgot."""
    from stores.erasure.verify import verify

    result = verify(_ws(ctx, create=False), request_id)
    if not details:
        result = {k: v for k, v in result.items() if k != "tables"}
    click.echo(json.dumps(result, indent=2, default=str))
    if not result["verified"]:
        raise click.ClickException(f"request {request_id} is not verified: {result['problems']}")


@click.command("unlearn-split")
@click.option("--split", "split_name", required=True, help="The split to cut.")
@click.option(
    "--scenario",
    required=True,
    type=click.Choice(["cure4rec", "l2unrank_interaction", "l2unrank_item", "erase_sensitive"]),
)
@click.option("--percent", default=5.0, show_default=True, help="Share of users (items for l2unrank_item).")
@click.option("--seed", default=42, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["random", "most_active", "least_active"]),
    default="random",
    show_default=True,
    help="cure4rec only.",
)
@click.option("--interaction-ratio", default=0.2, show_default=True, help="l2unrank_interaction only.")
@click.option("--category", help="erase_sensitive: the sensitive value, e.g. Horror.")
@click.option(
    "--attribute", default="genres", show_default=True, help="erase_sensitive: the items attribute."
)
@click.option("--batch-users", default=1, show_default=True, help="erase_sensitive: users per request.")
@click.option("--parts", type=click.Choice(["train", "all"]), help="Forget train rows only, or all parts.")
@click.option("--name", help="Output name: splits <name>_forget and <name>_gold.")
@click.option(
    "--graph", "graphs", multiple=True, help="Also build this graph's retained version (repeatable)."
)
@click.pass_context
@_errors
def unlearn_split(
    ctx,
    split_name,
    scenario,
    percent,
    seed,
    mode,
    interaction_ratio,
    category,
    attribute,
    batch_users,
    parts,
    name,
    graphs,
):
    """Forget/retain splits of a benchmark scenario, the gold retain-only split and retained graphs."""
    from recipes.unlearning.scenarios import ScenarioConfig
    from recipes.unlearning.split import build_unlearning_split

    cfg = ScenarioConfig(
        scenario=scenario,
        percent=percent,
        seed=seed,
        mode=mode,
        interaction_ratio=interaction_ratio,
        category=category,
        attribute=attribute,
        batch_users=batch_users,
        parts=parts,
    )
    out = build_unlearning_split(_ws(ctx), split_name, cfg, name, list(graphs))
    brief = {
        "forget": {k: out["forget"][k] for k in ("name", "table", "table_version", "counts")},
        "gold": {k: out["gold"][k] for k in ("name", "table", "table_version", "counts")},
        "unlearning": out["gold"]["counts_unlearning"],
        "graphs": out["graphs"],
    }
    click.echo(json.dumps(brief, indent=2, default=str))
