"""The streamed split and user-item graph (recipes/streamed.py) equal the in-memory recipes, and run in bounded
memory: a child process under `RLIMIT_AS` splits and graphs interactions larger than its margin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recipes.pipeline import build_split, build_ui_graph
from recipes.splits import SplitConfig
from stores import artifacts
from stores.schema import INTERACTIONS
from stores.workspace import Workspace
from tests.conftest import run_capped


def interactions(n: int, n_users: int, n_items: int, seed: int = 0, skewed: bool = True) -> pa.Table:
    """H&M-shaped rows: zero-padded string ids, day-resolution times (many ties), repeated pairs, random order.
    `skewed` draws users and items from Zipf laws (most rows repeat a pair), else uniformly (few repeats)."""
    rng = np.random.default_rng(seed)
    if skewed:
        user, item = rng.zipf(1.6, n) % n_users, rng.zipf(1.4, n) % n_items
    else:
        user, item = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    day = rng.integers(0, 60, n)
    return pa.table(
        {
            "user_id": pa.array(np.char.zfill(user.astype(str), 10)),
            "item_id": pa.array(np.char.zfill(item.astype(str), 10)),
            "timestamp": pa.array((day * 86_400_000_000).astype("datetime64[us]")),
            "event": pa.array(["purchase"] * n),
            "seq": pa.array(np.arange(n, dtype=np.int32)),
            "value": pa.array(rng.random(n)),
            "source": pa.array(["synthetic"] * n),
        }
    ).cast(INTERACTIONS.schema)


def _workspace(root: Path, table: pa.Table) -> Workspace:
    ws = Workspace(str(root))
    ws.db.create_table("interactions", data=table, schema=INTERACTIONS.schema)
    return ws


CONFIGS = [
    SplitConfig(scheme="random", kcore=2, seed=7),
    SplitConfig(scheme="random", kcore=(3, 2), seed=1, dedup="all", kcore_counts="rows"),
    SplitConfig(scheme="temporal", kcore=2, dedup="last"),
    SplitConfig(scheme="temporal", kcore=3, dedup="all", kcore_counts="partners", ratios=(0.7, 0.1, 0.2)),
    SplitConfig(scheme="loo", kcore=2, dedup="all"),
    SplitConfig(scheme="cutoff", cutoff_quantiles=(0.8, 0.9), dedup="first"),
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return _workspace(tmp_path_factory.mktemp("ooc"), interactions(6_000, 400, 150))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.dedup}-{c.kcore_counts}")
def test_streamed_split_and_graph_equal_in_memory(ws: Workspace, cfg: SplitConfig):
    """For every scheme and dedup/k-core policy, on data with time ties and repeated pairs, the streamed split has
    the in-memory split's rows, labels and order and the same manifest counts, and its user-item graph (built from
    batches) stores the same edges in the same order."""
    tag = f"{cfg.scheme}_{cfg.dedup}_{cfg.kcore_counts}_{cfg.seed}".replace("-", "")
    mem = build_split(ws, f"m_{tag}", cfg, engine="memory")
    out = build_split(ws, f"s_{tag}", cfg, engine="stream")
    assert out["counts"] == mem["counts"]
    a, b = artifacts.load_split(ws, f"m_{tag}"), artifacts.load_split(ws, f"s_{tag}")
    assert b.num_rows > 0 and a.equals(b)

    from recipes import streamed

    g_mem = build_ui_graph(ws, f"m_{tag}", "sym")
    threshold = streamed.STREAM_ABOVE_ROWS
    streamed.STREAM_ABOVE_ROWS = 0
    try:
        g_str = build_ui_graph(ws, f"s_{tag}", "sym")
    finally:
        streamed.STREAM_ABOVE_ROWS = threshold
    assert {k: g_mem[k] for k in ("nodes", "edges")} == {k: g_str[k] for k in ("nodes", "edges")}
    ea = ws.read(f"graph_m_{tag}_ui_sym")
    eb = ws.read(f"graph_s_{tag}_ui_sym")
    assert ea.num_rows > 0 and ea.equals(eb)


CHILD = """
import json, resource, sys
ws_dir, cap_mb, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if cap_mb:
    resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
from recipes.pipeline import build_split, build_ui_graph
from recipes.splits import SplitConfig
from stores.workspace import Workspace
ws = Workspace(ws_dir)
split = build_split(ws, "big", SplitConfig(scheme="temporal", kcore=2), engine=engine)
graph = build_ui_graph(ws, "big", "sym")
peak = {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
print(json.dumps({"rows": split["counts"]["rows"], "edges": graph["edges"], "VmPeak": peak["VmPeak"], "VmHWM": peak["VmHWM"]}))
"""

MARGIN_MB = 4000  # address space, not RSS: Lance and DuckDB reserve far more than they touch


def _child(ws_dir: Path, cap_mb: int, engine: str = "stream") -> dict:
    return run_capped(CHILD, str(ws_dir), str(cap_mb), engine)


@pytest.mark.slow
def test_split_and_graph_fit_under_a_memory_cap(tmp_path: Path):
    """k-core + temporal split + user-item graph of 4M interactions complete in a child whose address space is
    capped at (tiny-run peak + margin) with the streamed engine, while the in-memory engine, which reads the
    whole string table, runs out under the same cap: the streamed path holds integer codes, never the table."""
    small = _workspace(tmp_path / "small", interactions(2_000, 200, 100))
    cap = _child(Path(small.uri), 0)["VmPeak"] + MARGIN_MB
    n = 4_000_000
    for name in ("stream", "memory"):
        ws = Workspace(str(tmp_path / name))
        for seed in (1, 2, 3, 4):
            part = interactions(n // 4, 300_000, 40_000, seed=seed, skewed=False)
            if seed == 1:
                ws.db.create_table("interactions", data=part, schema=INTERACTIONS.schema)
            else:
                ws.open("interactions").add(part)
    out = _child(tmp_path / "stream", cap)
    assert out["rows"] > n * 0.9 and out["edges"] > n
    with pytest.raises(AssertionError, match="MemoryError|Cannot allocate|bad_alloc|memory"):
        _child(tmp_path / "memory", cap, "memory")
