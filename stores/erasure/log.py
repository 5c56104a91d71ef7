"""Erasure bookkeeping: the `forget_requests` log, the workspace secret and deny-list entries, recorded exports
and the snapshots a request affected.

The log is written ahead: a request's row (its `Targets`, hashes only, and its deny-list keys) is written before
anything is deleted, with no receipt (pending); each phase appends its results to the row's params, and the receipt
closes it. A crash leaves a pending row that `pending_requests` finds and `forget` resumes; `verify` re-runs from
the stored hashes at any time, and a repeated request id is served from the receipt.

Keys are hashed with HMAC-SHA256 under the workspace secret (stores/erasure/keys.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
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
            # JSON: the receipt `forget` returned; null while the request is pending (written ahead, not done).
            pa.field("receipt", pa.string()),
        ]
    ),
    key=("request_id",),
    compare=("params", "receipt"),
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
    return _decoded(rows.to_pylist()[0])


def _decoded(row: dict) -> dict:
    receipt = json.loads(row["receipt"]) if row["receipt"] is not None else None
    status = "done" if receipt is not None else "pending"
    return row | {"params": json.loads(row["params"]), "receipt": receipt, "status": status}


def pending_requests(ws: Workspace) -> list[dict]:
    """Log rows of requests written ahead but never finished (a crash or a kill mid-erasure), oldest first."""
    if not ws.exists(FORGET_REQUESTS.name):
        return []
    rows = ws.read(FORGET_REQUESTS.name, where="receipt IS NULL").to_pylist()
    return sorted((_decoded(r) for r in rows), key=lambda r: (r["created_at"], r["request_id"]))


def open_request(ws: Workspace, request: ForgetRequest, params: dict) -> None:
    """Write a request ahead of any deletion: its row with `params` (hashes only) and no receipt (pending)."""
    _write(
        ws,
        request.request_id,
        request.kind,
        request.reason,
        request.requester,
        request.created_at,
        params,
        None,
    )


def update_request(ws: Workspace, row: dict, params: dict, receipt: dict | None = None) -> None:
    """Rewrite a logged request's params (phase results appended) and, to close it, its receipt."""
    _write(
        ws,
        row["request_id"],
        row["kind"],
        row["reason"],
        row["requester"],
        row["created_at"],
        params,
        receipt,
    )


def append_to_receipt(ws: Workspace, request_id: str, key: str, section: dict) -> dict:
    """Add (or replace) one section `key` of a done request's receipt, keeping every other section and the params;
    other requests' rows are not rewritten (a keyed upsert of this row). Returns the updated receipt."""
    row = logged(ws, request_id)
    if row is None:
        raise KeyError(
            f"no forget request {request_id!r} in the log; carry it out first (`mmfeat forget ...`)"
        )
    if row["status"] != "done":
        raise ValueError(
            f"forget request {request_id!r} is pending (no receipt yet); finish it with `mmfeat forget --resume`"
        )
    receipt = row["receipt"] | {key: section}
    update_request(ws, row, row["params"], receipt)
    return receipt


def _write(ws, request_id, kind, reason, requester, created_at, params: dict, receipt: dict | None) -> None:
    row = {
        "request_id": request_id,
        "kind": kind,
        "reason": reason,
        "requester": requester,
        "created_at": created_at,
        "params": json.dumps(params, sort_keys=True, default=str),
        "receipt": json.dumps(receipt, sort_keys=True, default=str) if receipt is not None else None,
    }
    ws.upsert(FORGET_REQUESTS, pa.Table.from_pylist([row], schema=FORGET_REQUESTS.schema))


# ---- deny-list rows ----------------------------------------------------------------------------------------------


def deny_rows(scope: ForgetScope, request_id: str, secret: bytes) -> list[dict]:
    """The deny-list rows of a scope (keyed hashes): users, items, images, interactions, interaction users."""
    now = datetime.now(UTC)
    keys = [("user", key_hash(secret, "user", u)) for u in scope.users]
    keys += [("item", key_hash(secret, "item", i)) for i in scope.items]
    keys += [("image", key_hash(secret, "image", i)) for i in scope.image_items]
    keys += [
        (
            "interaction",
            key_hash(secret, "interaction", f"{key_hash(secret, 'user', u)}:{key_hash(secret, 'item', i)}"),
        )
        for u, i in scope.pairs
    ]
    # lets ingest test only the rows of users with a forgotten pair (see recipes/ingest/interactions.py)
    keys += [
        ("interaction_user", key_hash(secret, "interaction_user", u)) for u in {u for u, _ in scope.pairs}
    ]
    return [{"key_hash": h, "kind": k, "request_id": request_id, "created_at": now} for k, h in keys]


# ---- exports ----------------------------------------------------------------------------------------------------

EXPORT_KIND = "export"


def record_export(
    ws: Workspace, path: str | Path, fmt: str, split: str, split_table: str | None = None
) -> dict:
    """Record that mmfeat wrote an export of `split` to `path` (outside the workspace): forget lists it in its
    receipt under `outside_guarantee`, since erasure cannot reach files it does not own."""
    from stores import artifacts

    where = str(Path(path).resolve()) if "://" not in str(path) else str(path)
    table = split_table or f"split_{split}"
    version = ws.version(table) if ws.exists(table) else -1
    return artifacts.record_artifact(
        ws,
        EXPORT_KIND,
        f"{fmt}:{where}",
        table,
        version if version is not None else -1,
        {"path": where, "format": fmt, "split": split, "written_at": datetime.now(UTC).isoformat()},
    )


def exports_holding(ws: Workspace, tables: set[str]) -> list[dict]:
    """Recorded exports built from one of `tables` (split tables that held forgotten data), for the receipt."""
    from stores import artifacts

    if not ws.exists("artifacts"):
        return []
    out = []
    for info in artifacts.list_artifacts(ws, EXPORT_KIND):
        if info.get("table") in tables:
            out.append(
                {
                    "path": info["path"],
                    "format": info["format"],
                    "split": info["split"],
                    "written_at": info["written_at"],
                    "why": "written outside the workspace from a split that held forgotten rows; erasure does not "
                    "touch it: delete it or export again",
                }
            )
    return out


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
