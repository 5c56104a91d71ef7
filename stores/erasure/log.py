"""Erasure bookkeeping: the `forget_requests` log, deny-list entries and the snapshots a request affected.

The log holds, per request id, the request's non-identifying parameters, its `Targets` (hashes only) and the
receipt `forget` returned, so that `verify` can be re-run at any time and a repeated request id is served from it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from stores.schema import DENY_LIST, TIMESTAMP, TableSpec, key_hash
from stores.workspace import Workspace

if TYPE_CHECKING:
    from stores.erasure.requests import ForgetRequest, ForgetScope

FORGET_REQUESTS = TableSpec(
    "forget_requests",
    pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),
            pa.field("reason", pa.string()),
            pa.field("requester", pa.string()),
            pa.field("created_at", TIMESTAMP),
            # JSON: the request's non-identifying parameters and its `Targets` (hashes only).
            pa.field("params", pa.string()),
            # JSON: the receipt `forget` returned.
            pa.field("receipt", pa.string()),
        ]
    ),
    key=("request_id",),
)
# tables erasure never deletes rows from: they hold hashes and manifests, not the data itself
BOOKKEEPING = {DENY_LIST.name, FORGET_REQUESTS.name, "artifacts"}


def logged(ws: Workspace, request_id: str) -> dict | None:
    """The log row of `request_id` (params and receipt decoded), None when it was never carried out."""
    if not ws.exists(FORGET_REQUESTS.name):
        return None
    rows = ws.read(FORGET_REQUESTS.name, where=f"request_id = '{request_id.replace(chr(39), chr(39) * 2)}'")
    if not rows.num_rows:
        return None
    row = rows.to_pylist()[0]
    return row | {"params": json.loads(row["params"]), "receipt": json.loads(row["receipt"])}


def deny_rows(scope: ForgetScope, request_id: str) -> list[dict]:
    now = datetime.now(UTC)
    keys = [("user", key_hash("user", u)) for u in scope.users]
    keys += [("item", key_hash("item", i)) for i in scope.items]
    keys += [("image", key_hash("image", i)) for i in scope.image_items]
    keys += [
        ("interaction", key_hash("interaction", f"{key_hash('user', u)}:{key_hash('item', i)}"))
        for u, i in scope.pairs
    ]
    # lets ingest test only the rows of users with a forgotten pair (see recipes/ingest/interactions.py)
    keys += [("interaction_user", key_hash("interaction_user", u)) for u in {u for u, _ in scope.pairs}]
    return [{"key_hash": h, "kind": k, "request_id": request_id, "created_at": now} for k, h in keys]


def affected_snapshots(ws: Workspace, held: dict[str, set[int]]) -> list[dict]:
    """Snapshots (artifacts of kind "snapshot") pinning a version of a table that held forgotten data."""
    from stores import artifacts

    out = []
    for info in artifacts.list_artifacts(ws, "snapshot") if ws.exists("artifacts") else []:
        pins = {t: v for t, v in (info.get("tables") or {}).items() if t in held and v in held[t]}
        if pins:
            out.append({"name": info["name"], "pinned_versions_with_forgotten_data": pins})
    return out


def invalidate_snapshots(ws: Workspace, snapshots: list[dict], request_id: str) -> bool:
    """Flag affected snapshots through stores/snapshots.py when it offers `invalidate_snapshot`; each snapshot
    records whether that worked (the erasure itself is done either way, and its versions are gone)."""
    try:
        from stores.snapshots import invalidate_snapshot
    except ImportError:
        return False
    for snap in snapshots:
        try:
            invalidate_snapshot(ws, snap["name"], "pinned data erased by a forget request", request_id)
            snap["flagged"] = True
        except Exception as exc:  # a snapshot module error must not lose the receipt
            snap["flagged"] = f"not flagged: {type(exc).__name__}: {exc}"
    return any(s.get("flagged") is True for s in snapshots)


def record(ws: Workspace, request: ForgetRequest, params: dict, receipt: dict) -> None:
    """Append a carried-out request to the log: its parameters (hashes only) and its receipt, as JSON."""
    row = {
        "request_id": request.request_id,
        "kind": request.kind,
        "reason": request.reason,
        "requester": request.requester,
        "created_at": request.created_at,
        "params": json.dumps(params, sort_keys=True),
        "receipt": json.dumps(receipt, sort_keys=True, default=str),
    }
    ws.upsert(FORGET_REQUESTS, pa.Table.from_pylist([row], schema=FORGET_REQUESTS.schema))
