"""Exact cosine top-k graph (recipes.knn_graph) next to faiss.IndexFlatIP on the same random unit vectors.

    .venv/bin/python bench/knn.py [--n 100000] [--d 512] [--k 10] [--record]

Each method runs in its own subprocess on identical data (same seed), so peak RSS (ru_maxrss) is its own;
"extra MB" is the peak growth during the search, on top of the data and the imports. Also checks that
both return the same neighbours. --record appends a dated section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def worker(method: str, n: int, d: int, k: int, seed: int, out: str) -> None:
    if method == "faiss":
        import faiss
    else:
        import torch  # noqa: F401  (imported before the baseline so both sides count their library)

        from recipes.graphs.knn import KnnConfig, knn_edges
    x = make_data(n, d, seed)
    before = peak_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "faiss":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        _, idx = index.search(x, k)
    else:
        edges = knn_edges(x, KnnConfig(k=k, norm="freedom"))
        idx = edges["dst"].to_numpy().reshape(n, k)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(out, idx.astype(np.int64))
    print(
        json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_mb": peak_mb(), "extra_mb": peak_mb() - before})
    )


def run(method: str, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--d", str(args.d)]
    cmd += ["--k", str(args.k), "--seed", str(args.seed), "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
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
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true")
    p.add_argument("--worker", choices=["ours", "faiss"])
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.d, args.k, args.seed, args.out)
        return

    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run(m, args, os.path.join(tmp, f"{m}.npy")) for m in ("ours", "faiss")}
        ours, ref = np.load(os.path.join(tmp, "ours.npy")), np.load(os.path.join(tmp, "faiss.npy"))
    agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ours, ref, strict=True)])
    ratio = results["ours"]["seconds"] / results["faiss"]["seconds"]
    import faiss
    import torch

    lines = [
        f"Exact top-{args.k} cosine graph over {args.n:,} x {args.d} random unit vectors (float32), all "
        f"{args.n:,} rows as queries. {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__}.",
        "",
        "| method | seconds | CPU s (all threads) | peak RSS MB | extra MB during search |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, label in (
        ("ours", "recipes.knn_graph.knn_edges (torch.mm tiles + topk, FREEDOM weights)"),
        ("faiss", f"faiss.IndexFlatIP add + search(k={args.k})"),
    ):
        r = results[m]
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |"
        )
    lines += [
        "",
        f"ours / faiss time: {ratio:.2f}x (goal <= 1.2x); neighbour agreement with faiss: {agree:.4f}; "
        f"peak RSS goal < 2048 MB: {'met' if results['ours']['peak_mb'] < 2048 else 'MISSED'}. Load average "
        f"before / after: {load_before} / {', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine).",
    ]
    print("\n".join(lines))
    if args.record:
        record(
            "exact kNN graph vs faiss (bench/knn.py)",
            " ".join(["python", "bench/knn.py", *sys.argv[1:]]),
            lines,
        )


if __name__ == "__main__":
    main()
