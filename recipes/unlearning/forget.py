"""Erasure: a forget request carried out in every table and every file of the workspace, with a receipt.

`forget(ws, request)` resolves the request, fingerprints what is to be forgotten (`Targets`: sha256 key hashes of
users and items as the deny-list names them, digests of vectors, captions and image bytes, and anchored slices of
the image bytes), scans the workspace for it (what the receipt reports as found before), deletes the matching rows
from every table that holds them (interactions, users, items, item_images, captions, feat_*, extract_failures,
split_*, quarantine, ...), re-derives the splits and graphs built from them (recipes/unlearning_graphs.py), erases
physically (fragments holding deleted rows rewritten even for one row, indexes rebuilt, tags on old versions
dropped, every old version cleaned up, unreferenced and temporary files removed), adds the deny-list entries,
scans again and appends the receipt to the `forget_requests` log. The same request id twice does the work once.

The verification scan (`verify`, stores/erasure_verify.py) decodes, for every table, every data file that any
remaining version references, deleted rows included, plus the index files, each version's transaction and the raw
bytes of every file under the workspace. Nothing it needs is stored in clear: the log holds only hashes
(unsalted sha256, like the deny-list: pseudonyms, not anonymity), so `verify(ws, request_id)` can be re-run at any
time.

This module is the orchestration; the steps live beside it, by role: erasure_targets.py (what to forget, as
hashes: `capture`, `classify`), erasure_match.py (which rows mention it), erasure_verify.py (`scan`, `verify`),
erasure_physical.py (`delete_rows`, `compact`, `purge_versions`) and erasure_log.py (the `forget_requests` log,
deny-list rows, affected snapshots). Every public name of those modules is importable from here. Erasure assumes
it is the only writer of the tables it erases while it runs (it deletes files no version references).

    >>> receipt = forget(ws, ForgetRequest("gdpr-0042", "user", users=("1",), reason="art. 17"))
    >>> receipt["verification"]["verified"], verify(ws, "gdpr-0042")["verified"]
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from stores.erasure.log import (
    affected_snapshots,
    deny_rows,
    invalidate_snapshots,
    logged,
    record,
)
from stores.erasure.physical import (
    compact,
    delete_rows,
    parallel,
    purge_versions,
    remove_temp_files,
)
from stores.erasure.targets import (
    capture,
    classify,
    image_feature_tables,
)
from stores.erasure.verify import scan
from stores.schema import DENY_LIST
from stores.workspace import Workspace

if TYPE_CHECKING:
    from stores.erasure.requests import ForgetRequest


def forget(ws: Workspace, request: ForgetRequest) -> dict:
    """Carry out `request` everywhere and return its receipt (see the module docstring). A request id already
    in the log is not carried out again: its stored receipt comes back with `"duplicate": true`."""
    from recipes.unlearning.graphs import manifest_body, prepare_refresh, refresh_artifacts
    from stores.erasure.requests import resolve

    done = logged(ws, request.request_id)
    if done is not None:
        return done["receipt"] | {"duplicate": True}
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(phase: str) -> None:
        nonlocal clock, cpu_clock
        now, now_cpu = time.perf_counter(), time.process_time()
        timings[phase], cpu[phase] = round(now - clock, 3), round(now_cpu - cpu_clock, 3)
        clock, cpu_clock = now, now_cpu

    items = (
        ws.read("items", columns=["item_id", "rights", "attributes"]) if request.kind == "attribute" else None
    )
    scope = resolve(request, items)
    targets = capture(ws, scope)
    classes = classify(ws)
    before_versions = ws.versions()
    lap("resolve")
    found = scan(ws, targets, classes)
    held = {
        n: set(r["versions_with_mentions"]) | set(r["transactions_with_mentions"])
        for n, r in found["tables"].items()
        if r["versions_with_mentions"] or r["transactions_with_mentions"]
    }
    lap("scan_before")
    from stores import artifacts as art

    refreshable = {g["table"] for g in art.list_artifacts(ws, "graph")} if ws.exists("artifacts") else set()
    removed = delete_rows(ws, targets, classes, skip=refreshable)
    lap("delete")
    # Every table holding the targets in any data file, deleted rows included, is rewritten before the
    # artifacts are re-derived, so the versions their manifests pin are the ones that stay. The heavy reads of
    # the re-derivation need only the rows left, so they run meanwhile.
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(prepare_refresh, ws, set(removed), scope)
        rewrite = [n for n in sorted(set(removed) | set(held)) if ws.exists(n)]
        physical = parallel(lambda n: compact(ws, n), rewrite)
        prepared = early.result()
    lap("compact")
    excluded_whole = set(scope.items)
    image_feats = image_feature_tables(ws)

    def excluded(feature: str) -> set[str]:
        image = art.feature_table(feature) in image_feats
        return excluded_whole | (set(scope.image_items) if image else set())

    changed = set(removed) | {n for n, p in physical.items() if p}
    refreshed = refresh_artifacts(ws, changed, excluded, request.request_id, scope, prepared)
    # graphs that could not be re-derived, or held targets without being re-derived: their rows go like any
    # other table's (re-derived graphs are clean by construction, and the final scan checks them)
    derived = {g["table"] for g in refreshed["graphs"].values()}
    leftover = delete_rows(ws, targets, classify(ws), only=(refreshable & set(held)) - derived)
    for name, n in leftover.items():
        removed[name] = removed.get(name, 0) + n
        physical[name] = compact(ws, name)
        for info in art.list_artifacts(ws, "graph"):
            if info["table"] == name:  # pin the version that stays, and say the graph was not re-derived
                body = manifest_body(info)
                body["erasures"] = [*body.get("erasures", []), request.request_id]
                body["stale"] = (
                    f"rows deleted by {request.request_id} without re-deriving the graph; rebuild it"
                )
                art.record_artifact(ws, "graph", info["name"], name, ws.version(name), body)
    lap("artifacts")
    rewritten = {g["table"] for g in refreshed["graphs"].values() if not g["action"].startswith("unchanged")}
    erase = (set(held) | set(removed) | rewritten) & set(ws.table_names())
    for name in sorted(erase):
        if ws.version(name) in held.get(name, ()):
            # the latest version itself names a target (a delete predicate written by someone else): commit a
            # config-only version on top so that cleanup can remove it
            ws.dataset(name).update_config({"mmfeat.erasure": request.request_id})
    for name, done in parallel(lambda n: purge_versions(ws, n), sorted(erase)).items():
        physical[name] = physical.get(name, {}) | done
    physical["_temp_files_removed"] = remove_temp_files(ws)
    deny = deny_rows(scope, request.request_id)
    if deny:
        ws.upsert(DENY_LIST, pa.Table.from_pylist(deny, schema=DENY_LIST.schema))
    lap("physical")
    check = scan(ws, targets, classify(ws))
    lap("verify")
    snapshots = affected_snapshots(ws, held)
    invalidated = invalidate_snapshots(ws, snapshots, request.request_id)
    after_versions = ws.versions()
    receipt = {
        "request": {
            "request_id": request.request_id,
            "kind": request.kind,
            "reason": request.reason,
            "requester": request.requester,
            "created_at": request.created_at.isoformat(),
        },
        "scope": scope.counts()
        | ({"attribute": request.attribute, "value": request.value} if request.kind == "attribute" else {}),
        "targets": targets.summary(),
        "found_before": {
            "tables": {
                n: {"rows": r["rows"], "versions": r["versions_with_mentions"]}
                for n, r in found["tables"].items()
                if r["rows"] or r["versions_with_mentions"]
            },
            "raw_files_with_slices": found["raw"].get("hits", []),
            "clean": found["clean"],
        },
        "removed": removed,
        "versions": {
            n: {"before": before_versions.get(n), "after": after_versions.get(n)}
            for n in sorted(set(before_versions) | set(after_versions))
            if before_versions.get(n) != after_versions.get(n)
        },
        "artifacts": refreshed,
        "physical": physical,
        "erased_tables": sorted(erase),
        "deny_list_added": len(deny),
        "snapshots_invalidated": snapshots,
        "snapshots_note": (
            "these snapshots pinned versions that held forgotten data; erasure removed those versions, so reading "
            "them fails instead of serving forgotten data: re-issue them"
            + (" (flagged invalidated)" if invalidated else "")
        )
        if snapshots
        else None,
        "verification": {
            "verified": check["clean"],
            "problems": check["problems"],
            "tables_checked": len(check["tables"]),
            "versions_checked": sum(r["versions"] for r in check["tables"].values()),
            "data_files_decoded": sum(r["data_files"] for r in check["tables"].values()),
            "raw_scan": {k: v for k, v in check["raw"].items() if k != "hits"},
        },
        "timings_s": timings,
        "cpu_s": cpu,
        "duplicate": False,
    }
    params = {"scope": receipt["scope"], "targets": targets.to_json(), "erased_tables": sorted(erase)}
    record(ws, request, params, receipt)
    return receipt
