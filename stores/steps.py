"""One step runner: every skip-if-unchanged in mmfeat (splits, graphs, erasure's re-derived artifacts, and the
refresh's ingest, extract, export, snapshot and report records) goes through `run_step`.

A step is named by (kind, name) in the `artifacts` table. Its fingerprint hashes its inputs (table versions,
content hashes, file stats) and parameters. `run_step` skips the build when the stored manifest has the same
fingerprint and the artifact still exists (its table, or what `Step.fresh` checks); otherwise it calls `build`,
which writes the artifact and returns (table, version, body), and records the manifest
`body | {inputs, params, fingerprint}` pinning that table version.

    >>> run_step(ws, Step("split", "main", {"interactions": 7}, {"seed": 1}, build=lambda: ("split_main", 3, {})))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stores import artifacts
from stores.errors import network_boundary
from stores.workspace import Workspace

# What `build` returns: the table it wrote (or the step's anchor table), that table's version, the manifest body.
Built = tuple[str, int, dict]


@dataclass(frozen=True)
class Step:
    """kind: "split", "graph" or "step" (a flow record); inputs: what the step read, pinned (versions, hashes);
    params: how it was built; build: does the work; fresh: whether a stored manifest's artifact is still usable
    (default: its table exists)."""

    kind: str
    name: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    build: Callable[[], Built]
    fresh: Callable[[dict], bool] | None = None


def fingerprint(inputs: Any, params: Any) -> str:
    """The content address of a step: sha256 over its inputs and parameters (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps([inputs, params], sort_keys=True, default=str).encode()).hexdigest()


def last_manifest(ws: Workspace, kind: str, name: str) -> dict | None:
    """The stored manifest of step (kind, name), or None when it never ran."""
    try:
        return artifacts.manifest(ws, kind, name)
    except KeyError:
        return None


def unchanged(ws: Workspace, step: Step) -> dict | None:
    """The stored manifest of `step` when a run would skip it (same fingerprint, artifact still usable), else None."""
    done = last_manifest(ws, step.kind, step.name)
    if done is None or done.get("fingerprint") != fingerprint(step.inputs, step.params):
        return None
    return done if (step.fresh(done) if step.fresh is not None else ws.exists(done["table"])) else None


def run_step(ws: Workspace, step: Step, force: bool = False) -> dict:
    """Run `step` unless it is unchanged; returns its manifest, with skipped=True when the build was skipped."""
    # the step's reads and writes meet the workspace (maybe an object store) and model hubs: a timeout or a
    # dropped connection there is transient
    with network_boundary(f"{step.kind} {step.name} on {ws.uri}"):
        if not force and (done := unchanged(ws, step)) is not None:
            return done | {"skipped": True}
        table, version, body = step.build()
        body = body | {
            "inputs": step.inputs,
            "params": step.params,
            "fingerprint": fingerprint(step.inputs, step.params),
        }
        return artifacts.record_artifact(ws, step.kind, step.name, table, version, body) | {"skipped": False}
