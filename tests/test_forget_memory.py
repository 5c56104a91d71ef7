"""Erasure's memory is bounded by a record batch, not by the table: a forget that removes most of a table whose
rows are wide completes in a child whose address space is capped well under the table's size in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stores.workspace import Workspace
from tests.conftest import run_capped, wide_interactions

CHILD = """
import json, resource, sys
ws_dir, cap_mb, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if cap_mb:
    resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
from recipes.unlearning.forget import forget
from stores.erasure.requests import ForgetRequest
from stores.workspace import Workspace
receipt = forget(Workspace(ws_dir), ForgetRequest("cap", "user", users=(user,)))
vm = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
print(json.dumps({"removed": receipt["removed"], "verified": receipt["verification"]["verified"],
                  "VmPeak": vm["VmPeak"], "VmHWM": vm["VmHWM"]}))
"""

WIDE = (
    2_500  # characters of `source` per row: the table is ~1 GB in memory, a few MB on disk (repeated texts)
)
MARGIN_MB = 450  # over a tiny forget's address space: less than the table in memory, more than a few batches


def _workspace(root: Path, rows: int, heavy: int) -> Workspace:
    """`rows` interactions, `heavy` of them by user "u0" (enough for erasure to rewrite the table rather than
    commit row-id deletes), each with a WIDE-character source."""
    users = np.where(np.arange(rows) < heavy, "u0", np.char.add("u", (1 + np.arange(rows) % 997).astype(str)))
    return wide_interactions(root, users, WIDE)


def _child(ws: Workspace, cap_mb: int, user: str) -> dict:
    return run_capped(CHILD, ws.uri, str(cap_mb), user)


@pytest.mark.slow
def test_forget_fits_under_a_memory_cap_smaller_than_the_table(tmp_path: Path):
    """Forgetting a user who holds 300k of 400k wide interactions (~1 GB of rows in memory) completes, verified,
    in a child whose address space is capped at a tiny forget's peak + 450 MB: matching and rewriting stream the
    table batch by batch (the rewrite used to read the whole table, then copy its kept rows)."""
    tiny = _workspace(tmp_path / "tiny", 2_000, 1_500)
    cap = _child(tiny, 0, "u0")["VmPeak"] + MARGIN_MB
    rows, heavy = 400_000, 300_000
    ws = _workspace(tmp_path / "big", rows, heavy)
    out = _child(ws, cap, "u0")
    assert out["verified"] and out["removed"]["interactions"] == heavy
    assert Workspace(ws.uri).count("interactions") == rows - heavy
