"""A user-level forget request on a synthetic workspace, physical erasure and verification included, timed next
to rebuilding everything from the retained data in the same run.

    .venv/bin/python bench/forget.py [--interactions 10000000] [--items 100000] [--dim 64] [--record]

The workspace holds users, items, power-law interactions (generated in random order, then rewritten ordered by
user_id in fragments of --cluster-rows rows, so one user's rows sit in one or two fragments; --cluster-rows 0 keeps
the random order, which spreads them over every fragment), a `feat_text` vector per item with its IVF_HNSW_SQ index, a random 80/10/10 split with 5-core, its
symmetric user-item graph and a 10-NN item graph. The forget deletes the most active user everywhere, rewrites
every fragment that held one of its rows, re-derives the split manifest and the graphs, cleans up every old
version, and scans every table and version again. The rebuild writes the retained users, items, interactions
and vectors into a fresh workspace, builds the index, the split and both graphs. Goal: forget < 10% of rebuild.
CPU seconds (self + reaped children), thread pools and load average are recorded (bench/_env.py); the ratio is
given in wall and CPU time. --record appends a dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._env import RunEnv, cpu_seconds  # noqa: E402


def power_law(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    return rng.permutation(n)[np.searchsorted(cdf / cdf[-1], rng.random(size))]


def make_data(n_inter: int, n_items: int, dim: int, seed: int) -> dict[str, pa.Table]:
    from stores.schema import INTERACTIONS, ITEMS, USERS

    rng = np.random.default_rng(seed)
    n_users = max(n_inter // 100, 10)
    user_ids = pa.array([f"u{x:08d}" for x in range(n_users)])
    item_ids = pa.array([f"{x:010d}" for x in range(n_items)])
    now = datetime(2024, 1, 1, tzinfo=UTC)
    inter = pa.table(
        {
            "user_id": user_ids.take(pa.array(power_law(rng, n_users, 0.5, n_inter))),
            "item_id": item_ids.take(pa.array(power_law(rng, n_items, 0.8, n_inter))),
            "timestamp": pa.array(
                rng.integers(1_500_000_000, 1_700_000_000, n_inter), pa.timestamp("s", tz="UTC")
            ),
            "event": pa.array(["rating"] * n_inter),
            "seq": pa.array(np.zeros(n_inter, np.int32)),
            "value": pa.array(rng.integers(1, 6, n_inter).astype(np.float64)),
            "source": pa.array(["synthetic"] * n_inter),
        },
        schema=INTERACTIONS.schema,
    )
    items = pa.table(
        {
            "item_id": item_ids,
            "title": pc.binary_join_element_wise("item ", item_ids, ""),
            "text": pa.nulls(n_items, pa.string()),
            "attributes": pa.array(["{}"] * n_items),
            "source": pa.array(["synthetic"] * n_items),
            "rights": pa.array(["synthetic"] * n_items),
            "content_hash": item_ids,
            "created_at": pa.array([now] * n_items, ITEMS.schema.field("created_at").type),
            "updated_at": pa.array([now] * n_items, ITEMS.schema.field("updated_at").type),
        },
        schema=ITEMS.schema,
    )
    users = pa.table(
        {
            "user_id": user_ids,
            "attributes": pa.array(["{}"] * n_users),
            "source": pa.array(["synthetic"] * n_users),
            "created_at": pa.array([now] * n_users, USERS.schema.field("created_at").type),
        },
        schema=USERS.schema,
    )
    vectors = rng.standard_normal((n_items, dim)).astype(np.float32)
    feats = pa.table(
        {
            "item_id": item_ids,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            "model": pa.array(["synthetic"] * n_items),
            "revision": pa.array(["0"] * n_items),
            "params": pa.array(['{"modality": "text"}'] * n_items),
            "input_hash": item_ids,
            "created_at": pa.array([now] * n_items, pa.timestamp("us", tz="UTC")),
        }
    )
    return {"interactions": inter, "items": items, "users": users, "feat_text": feats}


def build(root: Path, data: dict[str, pa.Table], k: int, cluster_rows: int) -> dict[str, float]:
    """Everything derived from the data: tables (interactions clustered by user in fragments of `cluster_rows`
    rows; 0: left in arrival order), vector index, 5-core split, user-item and kNN graphs."""
    from recipes.pipeline import build_knn_graph, build_split, build_ui_graph
    from recipes.splits import SplitConfig
    from stores.erasure.physical import cluster
    from stores.schema import INTERACTIONS, ITEMS, USERS, TableSpec
    from stores.workspace import Workspace

    ws = Workspace(root)
    t: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        t[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    ws.upsert(ITEMS, data["items"])
    ws.upsert(USERS, data["users"])
    ws.upsert(INTERACTIONS, data["interactions"])
    lap("write tables")
    if cluster_rows:
        cluster(ws, "interactions", "user_id", cluster_rows)
        lap("cluster interactions by user")
    feats = data["feat_text"]
    ws.upsert(TableSpec("feat_text", feats.schema, key=("item_id",), compare=("input_hash",)), feats)
    lap("write vectors")
    n = feats.num_rows
    ws.dataset("feat_text").create_index(
        "vector", "IVF_HNSW_SQ", metric="cosine", num_partitions=max(1, min(int(n**0.5), n // 256 or 1))
    )
    lap("vector index")
    build_split(ws, "main", SplitConfig(scheme="random", kcore=5, seed=0))
    lap("split (5-core, random)")
    build_ui_graph(ws, "main", "sym", name="main_ui")
    lap("user-item graph")
    build_knn_graph(ws, "main", ["text"], k=k, name="main_knn_text")
    lap(f"{k}-NN item graph")
    return t


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu(receipt: dict, step: str) -> str:
    """The step's CPU seconds from the receipt ("-" where it records none, as for "resolve")."""
    cpu = receipt.get("cpu_s", {}).get(step)
    return "-" if cpu is None else f"{cpu:.1f}"


def record(title: str, command: str, lines: list[str]) -> None:
    path = REPO / "BENCHMARKS.md"
    head = (
        "" if path.exists() else "# Benchmarks\n\nAppended by the scripts in bench/ when run with --record.\n"
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"{head}\n## {stamp}: {title}\n\n`{command}`\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cluster-rows",
        type=int,
        default=131_072,
        help="Rewrite interactions ordered by user_id in fragments of this many rows (both workspaces); 0: keep "
        "arrival order, so the user's rows are in every fragment.",
    )
    p.add_argument("--workdir", help="Where the workspaces go (default: a temporary folder, removed after).")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()

    from recipes.unlearning.forget import forget
    from stores.erasure.requests import ForgetRequest
    from stores.workspace import Workspace

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-forget-"))
    shutil.rmtree(work / "ws", ignore_errors=True)
    shutil.rmtree(work / "rebuild", ignore_errors=True)
    t0 = time.perf_counter()
    data = make_data(args.interactions, args.items, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    build(work / "ws", data, args.k, args.cluster_rows)
    counts = pc.value_counts(data["interactions"]["user_id"])
    top = int(np.argmax(counts.field("counts").to_numpy()))
    user = counts.field("values")[top].as_py()
    degree = int(counts.field("counts")[top].as_py())
    ws = Workspace(work / "ws")
    size_mb = sum(f.stat().st_size for f in (work / "ws").rglob("*") if f.is_file()) / 2**20

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    env = RunEnv.start()
    t0, c0 = time.perf_counter(), cpu_seconds()
    receipt = forget(ws, ForgetRequest("bench-user", "user", users=(user,), reason="benchmark"))
    forget_s, forget_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert receipt["verification"]["verified"], receipt["verification"]

    keep = pc.not_equal(data["interactions"]["user_id"], user)
    retained = {
        "interactions": data["interactions"].filter(keep),
        "users": data["users"].filter(pc.not_equal(data["users"]["user_id"], user)),
        "items": data["items"],
        "feat_text": data["feat_text"],
    }
    del data
    t0, c0 = time.perf_counter(), cpu_seconds()
    rebuild = build(work / "rebuild", retained, args.k, args.cluster_rows)
    rebuild_s, rebuild_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    env.stop()
    ratio = forget_s / rebuild_s
    ok = ws.count("interactions") == Workspace(work / "rebuild").count("interactions")
    # the patched user-item graph (pairs layout: the user's rows deleted) is a rebuild on the erased split, row
    # for row up to order (the rebuilt workspace's split differs: its 5-core random split is drawn again on the retained rows)
    from recipes.pipeline import build_ui_graph

    build_ui_graph(ws, "main", "sym", name="check_ui")
    # as a set of rows: compaction appends the fragment it rewrote, so the patched table's row order differs
    order = [("src", "ascending"), ("dst", "ascending")]
    same_ui = ws.read("graph_main_ui").sort_by(order).equals(ws.read("graph_check_ui").sort_by(order))

    layout = (
        f"clustered by user_id in {args.cluster_rows:,}-row fragments"
        if args.cluster_rows
        else "random order"
    )
    lines = [
        f"{args.interactions:,} interactions ({layout}), {args.interactions // 100:,} users, {args.items:,} items "
        f"with {args.dim}-d vectors + IVF_HNSW_SQ index, 5-core random split, sym user-item graph, {args.k}-NN graph; "
        f"workspace {size_mb:,.0f} MiB. Forgotten: the most active user ({degree:,} interactions). "
        f"{os.cpu_count()} CPUs ({platform.machine()}), peak RSS {peak_mb():,.0f} MiB. "
        f"Interactions left equal in both workspaces: {ok}; patched user-item graph equals a rebuild on the erased split: {same_ui}. Data generated in {gen_s:.0f} s (not timed). Load "
        f"average when the forget started: {load} (the machine is shared; CPU seconds are less noisy).",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    lines += [f"| forget: {k} | {v:.2f} (CPU {_cpu(receipt, k)}) |" for k, v in receipt["timings_s"].items()]
    lines += [
        f"| **forget total** (erasure + verification, receipt verified) | **{forget_s:.2f}** "
        f"(CPU {forget_cpu:.1f}) |"
    ]
    lines += [f"| rebuild: {k} | {v:.2f} |" for k, v in rebuild.items()]
    lines += [
        f"| **rebuild total** | **{rebuild_s:.2f}** (CPU {rebuild_cpu:.1f}) |",
        f"| **forget / rebuild** | **{ratio:.1%}** wall, {forget_cpu / rebuild_cpu:.1%} CPU (goal < 10%) |",
    ]
    lines += [
        "",
        f"Erased tables: {', '.join(receipt['erased_tables'])}; rows removed: {receipt['removed']}; "
        f"graphs: { {g: v['action'] for g, v in receipt['artifacts']['graphs'].items()} }; "
        f"verification decoded {receipt['verification']['data_files_decoded']} data files over "
        f"{receipt['verification']['versions_checked']} versions.",
        *env.lines(),
    ]
    print("\n".join(lines))
    if args.record:
        cmd = (
            f"python bench/forget.py --interactions {args.interactions} --items {args.items} --dim {args.dim} "
            f"--cluster-rows {args.cluster_rows}"
        )
        record("forget one user vs rebuild from retained data", cmd, lines)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
