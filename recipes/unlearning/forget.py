"""Erasure: a forget request carried out in every table and every file of the workspace, with a receipt.

`forget(ws, request)` holds the workspace's write lease throughout (stores/lease.py). It resolves the request,
fingerprints what is to be forgotten (`Targets`: keyed hashes of users and items as the deny-list names them,
digests of vectors, captions and image bytes, and anchored slices of the image bytes) and writes the request
ahead: its log row (targets and deny-list keys, hashes only, no receipt: pending) and its deny-list entries go in
before anything is deleted, so a re-ingest after a crash cannot bring the data back. Then, each phase appending
its results to the log row: it scans the workspace for the targets (found before), deletes the matching rows from
every table that holds them (interactions, users, items, item_images, captions, feat_*, extract_failures,
split_*, quarantine, ...), re-derives the splits and graphs built from them (recipes/unlearning/graphs.py),
erases physically (fragments holding deleted rows rewritten even for one row, indexes rebuilt, tags on old
versions dropped, every old version cleaned up, unreferenced and temporary files removed, on s3 too), scans again
and closes the log row with the receipt. The same request id twice does the work once.

A crashed request stays pending: `resume_pending(ws)` (`mmfeat forget --resume`, and the refresh flow) carries
it out again from its log row: the ids are re-derived from the hashes (`recover_scope`), and the receipt sums
what every attempt removed. The verification scan (`verify`, stores/erasure/verify.py) fails closed: anything it
cannot read is a problem. Exports mmfeat wrote outside the workspace from a split that held the data are listed
under `outside_guarantee`.

The steps live in stores/erasure/, by role: targets.py (what to forget, as hashes: `capture`, `classify`,
`recover_scope`), match.py (which rows mention it), verify.py (`scan`, `verify`), physical.py (`delete_rows`,
`compact`, `purge_versions`), files.py (workspace files, local or s3) and log.py (the `forget_requests` log,
deny-list rows, recorded exports, affected snapshots) and keys.py (the workspace secret, the deny-list as ingest
checks it).

    >>> receipt = forget(ws, ForgetRequest("gdpr-0042", "user", users=("1",), reason="art. 17"))
    >>> receipt["verification"]["verified"], verify(ws, "gdpr-0042")["verified"]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pyarrow as pa

from stores.erasure.keys import workspace_secret
from stores.erasure.log import (
    affected_snapshots,
    deny_rows,
    exports_holding,
    invalidate_snapshots,
    logged,
    open_request,
    pending_requests,
    update_request,
)
from stores.erasure.physical import (
    compact,
    delete_rows,
    parallel,
    purge_versions,
    remove_temp_files,
)
from stores.erasure.requests import ForgetRequest, ForgetScope, resolve
from stores.erasure.targets import (
    capture,
    classify,
    clear_keys,
    image_feature_tables,
    recover_scope,
)
from stores.erasure.verify import logged_targets, scan
from stores.lease import write_lease
from stores.schema import DENY_LIST
from stores.workspace import Workspace


def forget(ws: Workspace, request: ForgetRequest) -> dict:
    """Carry out `request` everywhere and return its receipt (see the module docstring). A request id already
    done is not carried out again: its stored receipt comes back with `"duplicate": true`; one left pending by a
    crash is resumed."""
    with write_lease(ws, holder=f"forget:{request.request_id}"):
        row = logged(ws, request.request_id)
        if row is not None and row["status"] == "done":
            return row["receipt"] | {"duplicate": True}
        scope = None
        if row is None:
            row, scope = _write_ahead(ws, request)
        return _carry_out(ws, row, scope)


def resume_pending(ws: Workspace) -> list[dict]:
    """Carry out again every request a crash left pending (oldest first) and return their receipts; [] when
    none is pending. The refresh flow and `mmfeat forget --resume` call it."""
    receipts = []
    for pending in pending_requests(ws):
        with write_lease(ws, holder=f"forget:{pending['request_id']}"):
            row = logged(ws, pending["request_id"])  # another process may have finished it meanwhile
            receipts.append(
                row["receipt"] | {"duplicate": True} if row["status"] == "done" else _carry_out(ws, row)
            )
    return receipts


def _write_ahead(ws: Workspace, request: ForgetRequest) -> tuple[dict, ForgetScope]:
    """Resolve and fingerprint the request, then log it as pending: nothing is deleted before this returns."""
    started = time.perf_counter()
    items = (
        ws.read("items", columns=["item_id", "rights", "attributes"]) if request.kind == "attribute" else None
    )
    scope = resolve(request, items)
    secret = workspace_secret(ws, create=True)
    targets = capture(ws, scope, secret)
    deny = [
        {"kind": r["kind"], "key_hash": r["key_hash"]} for r in deny_rows(scope, request.request_id, secret)
    ]
    params = {
        "scope": scope.counts()
        | ({"attribute": request.attribute, "value": request.value} if request.kind == "attribute" else {}),
        "targets": targets.to_json(),
        "deny_list": deny,
        "resolve_s": round(time.perf_counter() - started, 3),
        "attempts": [],
    }
    open_request(ws, request, params)
    return logged(ws, request.request_id), scope


def _carry_out(ws: Workspace, row: dict, scope: ForgetScope | None = None) -> dict:
    """One attempt at a logged request: every phase appends its results to the log row; the receipt closes it."""
    from recipes.unlearning.graphs import manifest_body, prepare_refresh, refresh_artifacts
    from stores import artifacts as art
    from stores.features import feature_table

    request_id = row["request_id"]
    params = row["params"]
    targets = logged_targets(ws, params)
    if scope is not None:  # the request's own ids: complete, so rows are matched by a direct lookup
        targets.clear = clear_keys(scope)
    else:
        # a resumed request knows only the hashes: the ids left in the latest rows are enough to re-derive the
        # artifacts, but old versions may hold ids no latest row has, so matching hashes every value
        scope = recover_scope(ws, targets)
    attempt: dict = {"attempt": len(params["attempts"]) + 1, "started_at": _now(), "phases": {}}
    params["attempts"].append(attempt)
    earlier = params["attempts"][:-1]
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def phase(name: str, result: dict) -> None:
        """Record a finished phase in the log row (what a crash after it leaves behind)."""
        nonlocal clock, cpu_clock
        now, now_cpu = time.perf_counter(), time.process_time()
        timings[name], cpu[name] = round(now - clock, 3), round(now_cpu - cpu_clock, 3)
        clock, cpu_clock = now, now_cpu
        attempt["phases"][name] = result
        update_request(ws, row, params)

    # 1. the deny-list entries, before any deletion (idempotent: a keyed upsert of the logged keys)
    now = datetime.now(UTC)
    deny = [d | {"request_id": request_id, "created_at": now} for d in params["deny_list"]]
    if deny:
        ws.upsert(DENY_LIST, pa.Table.from_pylist(deny, schema=DENY_LIST.schema))
    phase("deny_list", {"entries": len(deny)})

    # 2. what the workspace holds now
    classes = classify(ws)
    before_versions = ws.versions()
    found = scan(ws, targets, classes)
    held = {
        n: sorted(set(r["versions_with_mentions"]) | set(r["transactions_with_mentions"]))
        for n, r in found["tables"].items()
        if r["versions_with_mentions"] or r["transactions_with_mentions"]
    }
    phase(
        "scan_before",
        {
            "versions": before_versions,
            "held": held,
            "tables": {
                n: {"rows": r["rows"], "versions": r["versions_with_mentions"]}
                for n, r in found["tables"].items()
                if r["rows"] or r["versions_with_mentions"]
            },
            "raw_files_with_slices": found["raw"].get("hits", []),
            "unverified": found["unverified"],
            "clean": found["clean"],
        },
    )

    # 3. delete the rows (graphs that can be re-derived are skipped: step 5 re-derives them)
    refreshable = {g["table"] for g in art.list_artifacts(ws, "graph")} if ws.exists("artifacts") else set()
    gone: dict[str, pa.Table] = {}  # the deleted rows' ids and labels: split counts are recorded minus these
    removed = delete_rows(
        ws,
        targets,
        classes,
        skip=refreshable,
        planned=lambda counts: phase("delete_plan", {"rows": counts}),
        deleted=gone,
    )
    phase("delete", {"removed": removed})
    removed_ever = set(removed).union(
        *(
            a["phases"].get(p, {}).get(k, {})
            for a in earlier
            for p, k in (("delete_plan", "rows"), ("delete", "removed"))
        )
    )

    # 4. rewrite every table holding the targets in any data file, deleted rows included, before the artifacts
    # are re-derived, so the versions their manifests pin are the ones that stay. The heavy reads of the
    # re-derivation need only the rows left, so they run meanwhile.
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(prepare_refresh, ws, removed_ever, scope, gone, before_versions)
        rewrite = [n for n in sorted(set(removed) | set(held)) if ws.exists(n)]
        physical = parallel(lambda n: compact(ws, n), rewrite)
        prepared = early.result()
    phase("compact", {"physical": physical})

    # 5. re-derive splits and graphs
    image_feats = image_feature_tables(ws)

    def excluded(feature: str) -> set[str]:
        image = feature_table(feature) in image_feats
        return set(scope.items) | (set(scope.image_items) if image else set())

    changed = removed_ever | {n for n, p in physical.items() if p}
    refreshed = refresh_artifacts(ws, changed, excluded, request_id, scope, prepared)
    # graphs that could not be re-derived, or held targets without being re-derived: their rows go like any
    # other table's (re-derived graphs are clean by construction, and the final scan checks them)
    derived = {g["table"] for g in refreshed["graphs"].values()}
    leftover = delete_rows(ws, targets, classify(ws), only=(refreshable & set(held)) - derived)
    for name in leftover:
        physical[name] = compact(ws, name)
        for info in art.list_artifacts(ws, "graph"):
            if info["table"] == name:  # pin the version that stays, and say the graph was not re-derived
                body = manifest_body(info)
                body["erasures"] = [*body.get("erasures", []), request_id]
                body["stale"] = f"rows deleted by {request_id} without re-deriving the graph; rebuild it"
                art.record_artifact(ws, "graph", info["name"], name, ws.version(name), body)
    phase("artifacts", {"refreshed": refreshed, "removed": leftover})

    # 6. make it physical: old versions, unreferenced files, temporary files
    rewritten = {g["table"] for g in refreshed["graphs"].values() if not g["action"].startswith("unchanged")}
    erase = (set(held) | set(removed) | set(leftover) | rewritten) & set(ws.table_names())
    for name in sorted(erase):
        if ws.version(name) in held.get(name, ()):
            # the latest version itself names a target (a delete predicate written by someone else): commit a
            # config-only version on top so that cleanup can remove it
            ws.dataset(name).update_config({"mmfeat.erasure": request_id})
    for name, done in parallel(lambda n: purge_versions(ws, n), sorted(erase)).items():
        physical[name] = physical.get(name, {}) | done
    physical["_temp_files_removed"] = remove_temp_files(ws)
    phase("physical", {"physical": physical, "erased_tables": sorted(erase)})

    # 7. verify and close the request with its receipt
    check = scan(ws, targets, classify(ws))
    timings["verify"] = round(time.perf_counter() - clock, 3)
    receipt = _receipt(ws, row, params, refreshed, check, timings, cpu)
    update_request(ws, row, params, receipt)
    return receipt


def _receipt(ws, row, params, refreshed, check, timings, cpu) -> dict:
    """The receipt of a request over all its attempts: removed counts summed, the first scan as found_before."""
    attempts = params["attempts"]
    first = next((a["phases"]["scan_before"] for a in attempts if "scan_before" in a["phases"]), {})
    removed: dict[str, int] = {}
    physical: dict[str, dict] = {}
    erased: set[str] = set()
    held: dict[str, set[int]] = {}
    for k, a in enumerate(attempts):
        p = a["phases"]
        for name, n in _deleted(p, attempts[k + 1 :]).items():
            removed[name] = removed.get(name, 0) + n
        for name, n in p.get("artifacts", {}).get("removed", {}).items():
            removed[name] = removed.get(name, 0) + n
        for name, v in p.get("scan_before", {}).get("held", {}).items():
            held.setdefault(name, set()).update(v)
        for source in ("compact", "physical"):
            for name, v in p.get(source, {}).get("physical", {}).items():
                physical[name] = physical.get(name, {}) | v if isinstance(v, dict) else v
        erased.update(p.get("physical", {}).get("erased_tables", []))
    before_versions = first.get("versions", {})
    after_versions = ws.versions()
    snapshots = affected_snapshots(ws, held)
    invalidated = invalidate_snapshots(ws, snapshots, row["request_id"])
    exports = exports_holding(ws, set(held) | set(removed))
    unverified = list(check["unverified"])
    return {
        "request": {
            "request_id": row["request_id"],
            "kind": row["kind"],
            "reason": row["reason"],
            "requester": row["requester"],
            "created_at": row["created_at"].isoformat()
            if hasattr(row["created_at"], "isoformat")
            else row["created_at"],
        },
        "scope": params["scope"],
        "targets": {k: (len(v) if isinstance(v, list) else v) for k, v in params["targets"].items()},
        "found_before": {
            "tables": first.get("tables", {}),
            "raw_files_with_slices": first.get("raw_files_with_slices", []),
            "clean": first.get("clean"),
        },
        "removed": removed,
        "attempts": [
            {"attempt": a["attempt"], "started_at": a["started_at"], "phases_done": list(a["phases"])}
            for a in attempts
        ],
        "versions": {
            n: {"before": before_versions.get(n), "after": after_versions.get(n)}
            for n in sorted(set(before_versions) | set(after_versions))
            if before_versions.get(n) != after_versions.get(n)
        },
        "artifacts": refreshed,
        "physical": physical,
        "erased_tables": sorted(erased),
        "deny_list_added": len(params["deny_list"]),
        "snapshots_invalidated": snapshots,
        "snapshots_note": (
            "these snapshots pinned versions that held forgotten data; erasure removed those versions, so reading "
            "them fails instead of serving forgotten data: re-issue them"
            + (" (flagged invalidated)" if invalidated else "")
        )
        if snapshots
        else None,
        "outside_guarantee": exports,
        "verification": {
            "verified": check["clean"],
            "problems": check["problems"],
            "unverified": unverified,
            "tables_checked": len(check["tables"]),
            "versions_checked": sum(r["versions"] for r in check["tables"].values()),
            "data_files_decoded": sum(r["data_files"] for r in check["tables"].values()),
            "raw_scan": {k: v for k, v in check["raw"].items() if k != "hits"},
        },
        "timings_s": {"resolve": params.get("resolve_s", 0.0)} | timings,
        "cpu_s": cpu,
        "duplicate": False,
    }


def _deleted(phases: dict, later: list[dict]) -> dict[str, int]:
    """What one attempt's delete phase removed: its logged result, or, when it was killed between its plan and
    that result, the planned rows the next attempt's plan no longer found."""
    if "delete" in phases:
        return phases["delete"]["removed"]
    plan = phases.get("delete_plan", {}).get("rows", {})
    after = next((a["phases"]["delete_plan"]["rows"] for a in later if "delete_plan" in a["phases"]), None)
    if after is None:
        return {}
    return {name: n - after.get(name, 0) for name, n in plan.items() if n > after.get(name, 0)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
