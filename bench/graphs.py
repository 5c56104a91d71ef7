"""k-core + per-user random split + normalised user-item CSR on synthetic power-law interactions, recipes
next to a straightforward pandas + SciPy baseline.

    .venv/bin/python bench/graphs.py [--rows 10000000] [--kcore 5] [--record]

Both sides start from the same Arrow table (string ids with leading zeros, UTC timestamps), regenerated
from the seed in separate subprocesses so each one's peak RSS is its own, and do the same work: keep the
first row of each repeated (user, item), iterate the k-core to its fixed point, label each user's rows
with MMRec's random 80/10/10 rule, and build FREEDOM's D^-1/2 A D^-1/2 over the train rows. The results
are compared (core size, label counts, graph size). --record appends a dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def power_law(rng: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """Indices 0..n-1 drawn with P(i) proportional to (i + 1)^-alpha, shuffled so popularity != id order."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    idx = np.searchsorted(cdf / cdf[-1], rng.random(size))
    return rng.permutation(n)[idx]


def make_data(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_users, n_items = max(rows // 10, 10), max(rows // 50, 10)
    u = power_law(rng, n_users, 0.7, rows)
    i = power_law(rng, n_items, 0.9, rows)
    user_ids = pa.array([f"u{x:08d}" for x in range(n_users)])
    item_ids = pa.array([f"{x:010d}" for x in range(n_items)])
    return pa.table(
        {
            "user_id": user_ids.take(pa.array(u)),
            "item_id": item_ids.take(pa.array(i)),
            "timestamp": pa.array(
                rng.integers(1_500_000_000, 1_700_000_000, rows), pa.timestamp("s", tz="UTC")
            ),
            "event": pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(rows, np.int8)), pa.array(["purchase"])
            ),
            "value": pa.array(rng.integers(1, 6, rows).astype(np.float64)),
        }
    )


def ours(table: pa.Table, k: int, seed: int) -> dict:
    import pyarrow.compute as pc

    from recipes.graphs.user_item import ui_adjacency
    from recipes.splits import SplitConfig, make_split, split_counts

    t0, c0 = time.perf_counter(), time.process_time()
    split = make_split(table, SplitConfig(scheme="random", kcore=k, seed=seed, dedup="first"))
    t1 = time.perf_counter()
    adj = ui_adjacency(split, "sym")
    t2, c2 = time.perf_counter(), time.process_time()
    counts = split_counts(split)
    del pc
    times = {"split_s": t1 - t0, "graph_s": t2 - t1, "cpu_s": c2 - c0}
    return times | {"nnz": int(adj.nnz), "nodes": adj.shape[0]} | counts


def baseline(table: pa.Table, k: int, seed: int) -> dict:
    """pandas + SciPy as one would write it: value_counts k-core loop (MMRec's notebook), groupby split,
    coo -> csr and diagonal scaling (FREEDOM's get_norm_adj_mat)."""
    import pandas as pd
    import scipy.sparse as sp

    t0, c0 = time.perf_counter(), time.process_time()
    df = table.to_pandas()
    df = df.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"], keep="first")
    while True:
        cu = df["user_id"].value_counts()
        ci = df["item_id"].value_counts()
        bad_u, bad_i = cu.index[cu < k], ci.index[ci < k]
        if len(bad_u) == 0 and len(bad_i) == 0:
            break
        df = df[~df["user_id"].isin(bad_u) & ~df["item_id"].isin(bad_i)]
    df = df.sample(frac=1, random_state=seed).sort_values("user_id", kind="stable")
    g = df.groupby("user_id", sort=False)
    n = g["item_id"].transform("size").to_numpy()
    pos = g.cumcount().to_numpy()
    held = np.where(n < 10, 2, (n * 0.2).astype(np.int64))
    n_valid = np.where(n < 10, 1, held // 2)
    n_test = held - n_valid
    from_end = n - pos
    df["label"] = np.where(from_end <= n_test, 2, np.where(from_end <= n_test + n_valid, 1, 0)).astype(
        np.int8
    )
    t1 = time.perf_counter()
    u_codes, users = pd.factorize(df["user_id"], sort=True)
    i_codes, items = pd.factorize(df["item_id"], sort=True)
    train = df["label"].to_numpy() == 0
    n_u, n_i = len(users), len(items)
    r = sp.coo_matrix((np.ones(train.sum(), np.float32), (u_codes[train], i_codes[train])), shape=(n_u, n_i))
    a = sp.bmat([[None, r], [r.T, None]], format="csr")
    a.data[:] = 1.0
    deg = np.asarray((a > 0).sum(axis=1)).ravel() + 1e-7
    d = sp.diags(np.power(deg, -0.5))
    adj = sp.csr_matrix(d @ a @ d, dtype=np.float32)
    t2, c2 = time.perf_counter(), time.process_time()
    labels = df["label"].value_counts()
    return {
        "split_s": t1 - t0,
        "graph_s": t2 - t1,
        "cpu_s": c2 - c0,
        "nnz": int(adj.nnz),
        "nodes": adj.shape[0],
        "rows": len(df),
        "users": n_u,
        "items": n_i,
        "train": int(labels.get(0, 0)),
        "valid": int(labels.get(1, 0)),
        "test": int(labels.get(2, 0)),
    }


def worker(method: str, rows: int, k: int, seed: int) -> None:
    if method == "pandas":
        import pandas  # noqa: F401
        import scipy.sparse  # noqa: F401
    else:
        import recipes.graphs.user_item  # noqa: F401
        import recipes.splits  # noqa: F401
    table = make_data(rows, seed)
    before = peak_mb()
    result = (ours if method == "ours" else baseline)(table, k, seed)
    result |= {"peak_mb": peak_mb(), "extra_mb": peak_mb() - before}
    print(json.dumps(result))


def run(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--rows", str(args.rows)]
    cmd += ["--kcore", str(args.kcore), "--seed", str(args.seed)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{method} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--kcore", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true")
    p.add_argument("--worker", choices=["ours", "pandas"])
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.rows, args.kcore, args.seed)
        return
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    res = {m: run(m, args) for m in ("ours", "pandas")}
    same = all(
        res["ours"][key] == res["pandas"][key] for key in ("rows", "users", "items", "train", "valid", "test")
    )
    same = (
        same and res["ours"]["nnz"] == res["pandas"]["nnz"] and res["ours"]["nodes"] == res["pandas"]["nodes"]
    )
    total = {m: r["split_s"] + r["graph_s"] for m, r in res.items()}
    o = res["ours"]
    import pandas as pd
    import scipy

    lines = [
        f"{args.rows:,} synthetic interactions (power-law users/items, {args.rows // 10:,} user and "
        f"{args.rows // 50:,} item ids, string ids with leading zeros), dedup first + {args.kcore}-core -> "
        f"{o['rows']:,} rows, {o['users']:,} users, {o['items']:,} items; random MMRec 80/10/10 split -> "
        f"{o['train']:,} / {o['valid']:,} / {o['test']:,}; sym-normalised CSR {o['nodes']:,} nodes, {o['nnz']:,} "
        f"entries. {os.cpu_count()} CPUs ({platform.machine()}), pandas {pd.__version__}, SciPy {scipy.__version__}.",
        "",
        "| method | dedup + k-core + split s | normalised CSR s | total s | total CPU s | peak RSS MB | extra MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, label in (("ours", "recipes (make_split + ui_adjacency)"), ("pandas", "pandas + SciPy baseline")):
        r = res[m]
        lines.append(
            f"| {label} | {r['split_s']:.1f} | {r['graph_s']:.1f} | {total[m]:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['extra_mb']:.0f} |"
        )
    lines += [
        "",
        f"speed-up: {total['pandas'] / total['ours']:.1f}x wall, "
        f"{res['pandas']['cpu_s'] / res['ours']['cpu_s']:.1f}x CPU time (goal >= 3x); same core, label counts "
        f"and graph size: {'yes' if same else 'NO'}. Load average before / after: {load_before} / "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine: wall times vary with it, CPU "
        "times much less).",
    ]
    print("\n".join(lines))
    if args.record:
        record(
            "k-core + split + normalised CSR vs pandas (bench/graphs.py)",
            " ".join(["python", "bench/graphs.py", *sys.argv[1:]]),
            lines,
        )


if __name__ == "__main__":
    main()
