"""CLI verb `mmfeat unlearn-check`: does the model still remember what a forget request erased?

    mmfeat unlearn-check --snapshot ml100k --request cure-core-5 --cure4rec most_active --percent 5
    mmfeat unlearn-check --snapshot ml100k --request gdpr-7 --user 42 --user 43
    mmfeat unlearn-check --snapshot research-copy --request cure-core-5        (a request already carried out)

With a scope (--cure4rec or --user), the request is carried out between the two trainings: the model before the
forget trains while the snapshot still holds the rows, the gold model on the retained rows after. Without one,
the request must be in the log and the snapshot must still serve its rows. Prints the `unlearn_check` section it
appends to the request's receipt (recipes/unlearn_check.py).
"""

from __future__ import annotations

import json

import click

from flows.cli_context import cli_errors as _errors
from flows.cli_context import workspace_of as _ws


@click.command("unlearn-check")
@click.option("--snapshot", required=True, help="The snapshot taken before the forget.")
@click.option("--request", "request_id", required=True, help="The forget request's id.")
@click.option(
    "--cure4rec",
    type=click.Choice(["random", "most_active", "least_active"]),
    help="Forget CURE4Rec's users of the snapshot's split under this request id, then check.",
)
@click.option("--percent", default=5.0, show_default=True, help="--cure4rec: share of users.")
@click.option("--seed", default=42, show_default=True, help="--cure4rec: the draw's seed.")
@click.option("--user", "users", multiple=True, help="Forget these users under this request id, then check.")
@click.option("--model", type=click.Choice(["mf_bpr", "freedom"]), default="mf_bpr", show_default=True)
@click.option("--epochs", default=20, show_default=True)
@click.option("--reason", default="", help="Why (recorded in the request log) when the check carries it out.")
@click.pass_context
@_errors
def unlearn_check(ctx, snapshot, request_id, cure4rec, percent, seed, users, model, epochs, reason) -> None:
    """Train the example model before and after a forget (gold: retrained on the retain set), compare forget- and
    retain-set recall/NDCG and the membership-inference AUC, and record it in the request's receipt."""
    from recipes.unlearn_check import CheckConfig, cure4rec_request
    from recipes.unlearn_check import unlearn_check as check
    from stores.erasure.requests import ForgetRequest

    if cure4rec and users:
        raise click.UsageError("give --cure4rec or --user, not both")
    ws = _ws(ctx)
    request: ForgetRequest | str = request_id
    if cure4rec:
        request = cure4rec_request(ws, snapshot, request_id, cure4rec, percent, seed)
    elif users:
        request = ForgetRequest(request_id, "user", users=users, reason=reason)
    section = check(ws, snapshot, request, CheckConfig(model=model, epochs=epochs), log=click.echo)
    click.echo(json.dumps(section, indent=2, default=str))
