"""`bench/scale.py --full` at a tiny scale: every product stage runs through the CLI and reports its figures, so the
scale benchmark cannot rot when a command or option changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stores.artifacts import load_graph, load_split
from stores.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "ingest (items, images, users, purchases)",
    "encode text (MiniLM)",
    "encode image (tiny CLIP)",
    "split (5-core, temporal)",
    "user-item graph (sym)",
    "kNN graph (text + image, auto)",
    "export (MMRec)",
    "snapshot",
    "forget user",
    "forget item",
    "report",
]


@pytest.mark.slow
def test_full_scale_bench_runs_every_stage(tmp_path: Path) -> None:
    """Each stage of the --full run succeeds and reports wall, CPU, peak RSS and workspace size; the H&M-layout
    images are ingested, the split's parts add up to its rows, both graphs have edges, the MMRec export is written
    and both forget receipts are verified (the forgotten ids gone from the split, the outside export named)."""
    work = tmp_path / "run"
    args = ["--full", "--items", "200", "--users", "300", "--interactions", "5000", "--workdir", str(work)]
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    info, rows = summary["info"], summary["stages"]
    assert [r["stage"] for r in rows] == STAGES
    for r in rows:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and 0 < r["peak_gb"] < 6, r
        assert r["workspace_gb"] > 0, r
        assert f"| {r['stage']} |" in proc.stdout
    out = {r["stage"]: r["out"] for r in rows}

    # Images under images/{id[:3]}/{id}.jpg reach the item_images table through --image-template.
    ingest = out[STAGES[0]]["tables"]
    assert ingest["item_images"]["written"] == info["images"] > 190
    assert ingest["interactions"]["written"] == 5000 and ingest["users"]["written"] == 300
    assert out[STAGES[1]]["done"] == info["with_text"] and out[STAGES[2]]["done"] == info["images"]

    ws = Workspace(work / "ws", create=False)
    counts = out[STAGES[3]]["counts"]
    assert counts["train"] + counts["valid"] + counts["test"] == counts["rows"] > 0
    split = load_split(ws, "main")
    assert info["forgotten_user"] not in set(split["user_id"].to_pylist())
    assert info["forgotten_item"] not in set(split["item_id"].to_pylist())
    assert out[STAGES[4]]["edges"] > 0 and out[STAGES[5]]["edges"] > 0
    for graph in ("ui", "knn"):
        matrix, _ = load_graph(ws, graph)
        assert matrix.nnz > 0 and np.isfinite(matrix.data).all()

    export = work / "export"
    for name in ("main.inter", "i_id_mapping.csv", "u_id_mapping.csv", "text_feat.npy", "image_feat.npy"):
        assert (export / name).stat().st_size > 0, name
    assert np.load(export / "image_feat.npy").shape[0] == counts["items"]

    assert out["snapshot"]["graphs"] == ["ui", "knn"]
    for verb in ("forget user", "forget item"):
        receipt = out[verb]
        assert receipt["verification"]["verified"] is True, receipt["verification"]
        # The export sits outside the workspace: the receipt names it rather than claiming it was erased.
        assert [e["path"] for e in receipt["outside_guarantee"]] == [str(export)]
    assert out["forget user"]["snapshots_invalidated"][0]["name"] == "scale"
    assert (work / "report.html").stat().st_size > 0
