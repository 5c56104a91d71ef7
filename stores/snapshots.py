"""Snapshots: a name for the exact table versions a trainer reads, so a run can be repeated months later.

A snapshot pins the current versions of `items` (and `users`, `interactions`), the chosen `feat_*` tables, one split,
the graphs built on it and any semantic-ID artifacts, and copies their manifests, so rebuilding a split or graph under the
same name later changes nothing a snapshot serves. It is an `artifacts` row of kind "snapshot" whose manifest holds
`tables: {table: version}`, and per feature what a trainer should know before using it (`feature_health`: rows,
missing items, coverage, untrained, degenerate; stores/features.py `describe_feature`). The versions of the tables that describe
the data but are not served (item images, captions, quarantine, forget requests) are recorded as `context`, for the
report; they are not checked when the snapshot is served. Erasure may clean up the versions a snapshot pins, or
flag it (`invalidate_snapshot`); either way reading it fails with an error that says to re-issue it, never
serving forgotten data.

    >>> create_snapshot(ws, "ml100k-v1", split="main", features=["text", "clip_image"], graphs=["main_ui_sym"])
    >>> run_sql(ws, "SELECT count(*) FROM feat_text", versions=snapshot_versions(ws, "ml100k-v1"))  # stores.sql
"""

from __future__ import annotations

from datetime import UTC, datetime

from stores import artifacts
from stores.features import describe_feature, feature_table
from stores.workspace import Workspace

KIND = "snapshot"
# Tables pinned whenever they exist: the catalogue and the raw interactions behind every split.
BASE_TABLES = ("items", "users", "interactions")
# Versions recorded for the report (what the snapshot's data looked like), never served to a trainer.
CONTEXT_TABLES = ("item_images", "captions", "quarantine", "forget_requests")


class SnapshotError(KeyError):
    """A snapshot that cannot be served: unknown, invalidated by erasure, or pinning versions that are gone."""

    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0]) if self.args else ""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pin_split(ws: Workspace, split: str) -> tuple[str, int, dict]:
    info = artifacts.manifest(ws, "split", split)
    return info["table"], int(info["table_version"]), info


def _pin_graph(ws: Workspace, graph: str, split: str, split_version: int) -> tuple[str, int, dict]:
    info = artifacts.manifest(ws, "graph", graph)
    if info.get("split") != split or int(info.get("split_version", -1)) != split_version:
        raise ValueError(
            f"graph {graph!r} was built on split {info.get('split')!r} version {info.get('split_version')}, but the "
            f"snapshot pins split {split!r} version {split_version}; rebuild the graph on this split "
            f"(`mmfeat graph ... --split {split}`) or leave it out"
        )
    return info["table"], int(info["table_version"]), info


def _pin_semantic_ids(ws: Workspace, name: str) -> tuple[str, int, dict]:
    infos = {a["name"]: a for a in artifacts.list_artifacts(ws, "semantic_ids")}
    if name not in infos:
        raise KeyError(
            f"semantic IDs {name!r} not found; built: {sorted(infos) or 'none'} "
            f"(`mmfeat semantic-ids --name {name} ...`)"
        )
    info = infos[name]
    return info["table"], int(info["table_version"]), info


def _pins(
    ws: Workspace, split: str, features: list[str], graphs: list[str], semantic_ids: list[str] = ()
) -> dict:
    """The manifest body of a snapshot over the workspace's current versions."""
    tables: dict[str, int] = {}
    for name in BASE_TABLES:
        if ws.exists(name):
            tables[name] = ws.version(name)
    split_table, split_version, split_info = _pin_split(ws, split)
    tables[split_table] = split_version
    feature_rows, feature_health = {}, {}
    items = ws.count("items")
    for feature in features:
        table = feature_table(feature)
        if not ws.exists(table):
            have = [
                n.removeprefix(artifacts.VECTOR_PREFIX)
                for n in ws.table_names()
                if n.startswith(artifacts.VECTOR_PREFIX)
            ]
            raise KeyError(f"feature {feature!r} not found (no table {table}); features are {have or 'none'}")
        tables[table] = ws.version(table)
        feature_rows[feature] = ws.count(table)
        info = describe_feature(ws, table, tables[table], items=items)
        feature_health[feature] = {
            "rows": info.rows,
            "missing": max(items - info.rows, 0),  # items without this feature (stores/missing.py policy)
            "coverage": round(info.coverage, 4),
            "untrained": info.untrained,
            "degenerate": info.degenerate,
        }
    graph_infos = {}
    for graph in graphs:
        table, version, info = _pin_graph(ws, graph, split, split_version)
        tables[table] = version
        graph_infos[graph] = {k: v for k, v in info.items() if k not in ("feature_provenance", "fingerprint")}
    sid_infos = {}
    for sid in semantic_ids:
        table, version, info = _pin_semantic_ids(ws, sid)
        tables[table] = version
        sid_infos[sid] = {k: v for k, v in info.items() if k not in ("inputs", "fingerprint")}
    return {
        "split": split,
        "features": features,
        "graphs": graphs,
        "semantic_ids": list(semantic_ids),
        "semantic_id_manifests": sid_infos,
        "tables": tables,
        "split_manifest": {k: v for k, v in split_info.items() if k != "fingerprint"},
        "graph_manifests": graph_infos,
        "feature_rows": feature_rows,
        "feature_health": feature_health,
        "context": {t: ws.version(t) for t in CONTEXT_TABLES if t not in tables and ws.exists(t)},
        "created_at": _now(),
        "invalidated": None,
    }


def _record(ws: Workspace, name: str, body: dict) -> dict:
    split_table = f"split_{body['split']}"
    return artifacts.record_artifact(ws, KIND, name, split_table, body["tables"][split_table], body)


def create_snapshot(
    ws: Workspace,
    name: str,
    split: str,
    features: list[str] | tuple[str, ...] = (),
    graphs: list[str] | tuple[str, ...] = (),
    replace: bool = False,
    semantic_ids: list[str] | tuple[str, ...] = (),
) -> dict:
    """Pin the current versions of items, `features` (names with or without `feat_`), `split`, `graphs` and
    `semantic_ids` (artifact names) under `name`; returns the manifest. An existing name is an error unless `replace` (use `reissue_snapshot` to keep
    the same contents at new versions)."""
    if not name or any(c in name for c in "'\"\n"):
        raise ValueError(f"snapshot name {name!r} is not allowed; use letters, digits, '-', '_' or '.'")
    if not replace and _exists(ws, name):
        raise ValueError(
            f"snapshot {name!r} already exists; pick another name, `mmfeat snapshot reissue {name}` to pin the "
            "current versions of the same tables, or pass --replace"
        )
    features = [f.removeprefix(artifacts.VECTOR_PREFIX) for f in features]
    return _record(ws, name, _pins(ws, split, list(features), list(graphs), list(semantic_ids)))


def _exists(ws: Workspace, name: str) -> bool:
    try:
        artifacts.manifest(ws, KIND, name)
    except KeyError:
        return False
    return True


def load_manifest(ws: Workspace, name: str) -> dict:
    """The stored manifest of snapshot `name`, whatever its state; raises `SnapshotError` when there is none."""
    try:
        return artifacts.manifest(ws, KIND, name)
    except KeyError:
        have = sorted(m["name"] for m in artifacts.list_artifacts(ws, KIND))
        raise SnapshotError(
            f"no snapshot named {name!r}; existing: {have or 'none'} (create one with `mmfeat snapshot create`)"
        ) from None


def missing_versions(ws: Workspace, info: dict) -> dict[str, int]:
    """The pinned `{table: version}` entries that no longer exist (table dropped or old version cleaned up)."""
    names = set(ws.table_names())
    missing = {}
    for table, version in info["tables"].items():
        if table not in names:
            missing[table] = version
            continue
        have = {v["version"] for v in ws.dataset(table).versions()}
        if version not in have:
            missing[table] = version
    return missing


def status(ws: Workspace, info: dict) -> str:
    """The state of a snapshot manifest: "ok", "invalidated" (flagged by erasure) or "stale" (versions gone)."""
    if info.get("invalidated"):
        return "invalidated"
    return "stale" if missing_versions(ws, info) else "ok"


def check_snapshot(ws: Workspace, name: str) -> dict:
    """The manifest of a snapshot that can be served; raises `SnapshotError` telling the user to re-issue it."""
    info = load_manifest(ws, name)
    fix = (
        f"Re-issue it with `mmfeat snapshot reissue {name}` (pins the current, erased versions under the same name) "
        "and retrain from it."
    )
    flag = info.get("invalidated")
    if flag:
        raise SnapshotError(
            f"snapshot {name!r} was invalidated at {flag.get('at')}: {flag.get('reason')}"
            f"{' (request ' + str(flag['request_id']) + ')' if flag.get('request_id') else ''}. {fix}"
        )
    missing = missing_versions(ws, info)
    if missing:
        pins = ", ".join(f"{t} v{v}" for t, v in sorted(missing.items()))
        raise SnapshotError(
            f"snapshot {name!r} pins versions that no longer exist ({pins}); erasure cleans up old versions that "
            f"held forgotten data. {fix}"
        )
    return info


def snapshot_versions(ws: Workspace, name: str) -> dict[str, int]:
    """`{table: version}` of a servable snapshot, for `run_sql(..., versions=...)` and `Workspace.read`."""
    return dict(check_snapshot(ws, name)["tables"])


def list_snapshots(ws: Workspace) -> list[dict]:
    """One summary per snapshot: name, created_at, split, features, graphs, status."""
    out = []
    for info in artifacts.list_artifacts(ws, KIND):
        out.append(
            {
                "name": info["name"],
                "created_at": info.get("created_at"),
                "split": info["split"],
                "features": info["features"],
                "graphs": info["graphs"],
                "status": status(ws, info),
                "reissues": len(info.get("previous", [])),
            }
        )
    return sorted(out, key=lambda r: r["name"])


def show_snapshot(ws: Workspace, name: str) -> dict:
    """The full manifest of a snapshot with its current status and any missing pinned versions."""
    info = load_manifest(ws, name)
    return info | {"status": status(ws, info), "missing_versions": missing_versions(ws, info)}


def invalidate_snapshot(ws: Workspace, name: str, reason: str, request_id: str | None = None) -> dict:
    """Flag a snapshot as not servable (erasure calls this for snapshots holding forgotten data)."""
    info = load_manifest(ws, name)
    body = {k: v for k, v in info.items() if k not in ("kind", "name", "table", "table_version")}
    body["invalidated"] = {"reason": reason, "request_id": request_id, "at": _now()}
    return _record(ws, name, body)


def reissue_snapshot(ws: Workspace, name: str) -> dict:
    """Pin the current versions of the same split, features and graphs under the same name; the previous
    manifest is kept in `previous` (newest first) so the history of what was served stays auditable."""
    old = load_manifest(ws, name)
    body = _pins(
        ws, old["split"], list(old["features"]), list(old["graphs"]), list(old.get("semantic_ids", []))
    )
    earlier = {k: v for k, v in old.items() if k != "previous"}
    body["previous"] = [earlier, *old.get("previous", [])]
    body["reissued_at"] = body["created_at"]
    return _record(ws, name, body)


def snapshots_pinning(ws: Workspace, table: str, key_filter: str | None = None) -> list[str]:
    """Names of snapshots pinning `table` whose pinned version holds rows matching `key_filter` (a Lance filter
    such as "item_id = '50'"); every snapshot pinning the table when no filter is given. For erasure reports."""
    names = []
    for info in artifacts.list_artifacts(ws, KIND):
        version = info["tables"].get(table)
        if version is None:
            continue
        if key_filter is None:
            names.append(info["name"])
            continue
        try:
            hit = ws.dataset(table, version).count_rows(key_filter)
        except Exception:  # a version already cleaned up holds nothing any more
            continue
        if hit:
            names.append(info["name"])
    return sorted(names)


def current_pins(
    ws: Workspace, split: str, features: list[str], graphs: list[str], semantic_ids: list[str] = ()
) -> dict[str, int]:
    """The versions a snapshot of `split`, `features`, `graphs` and `semantic_ids` would pin now (what decides
    whether a scheduled publish has anything new), without recording anything."""
    pins = {t: ws.version(t) for t in BASE_TABLES}
    pins[f"split_{split}"] = artifacts.manifest(ws, "split", split)["table_version"]
    pins |= {feature_table(f): ws.version(feature_table(f)) for f in features}
    pins |= {f"graph_{g}": artifacts.manifest(ws, "graph", g)["table_version"] for g in graphs}
    for sid in semantic_ids:
        table, version, _ = _pin_semantic_ids(ws, sid)
        pins[table] = version
    return pins


def free_name(ws: Workspace, name: str) -> str:
    """`name` if no snapshot has it, else the first free `name-2`, `name-3`, ...: a second publish on the same
    day under a dated template gets a suffix (snapshots are never overwritten), decided before any work."""
    if not _exists(ws, name):
        return name
    n = 2
    while _exists(ws, f"{name}-{n}"):
        n += 1
    return f"{name}-{n}"
