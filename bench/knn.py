"""Exact cosine top-k graph (recipes.knn_graph) next to faiss.IndexFlatIP on the same random unit vectors.

    .venv/bin/python bench/knn.py [--n 100000] [--d 512] [--k 10] [--threads 1] [--repeats 2] [--record]
    .venv/bin/python bench/knn.py --ann [--n 1000000] [--d 128] [--index ivf_flat|hnsw] [--sample 10000] [--record]

Each method runs in its own subprocess on identical data (same seed), so peak RSS (VmHWM) is its own;
"extra MB" is the peak growth during the search, on top of the data and the imports. Both sides get the same
thread count (--threads: torch, faiss's OpenMP and every BLAS pool through threadpoolctl), and the runs alternate
(ours, faiss, ours, faiss, ...) so both see the same load; the ratios reported are medians of the pairs, in CPU
seconds (less noisy on a shared machine) and in wall time. Also checks that both return the same neighbours.
Thread pools, load average and CPU seconds are recorded (bench/_env.py). --record appends to BENCHMARKS.md.

--ann times the approximate path (recipes/graphs/knn_ann.py: faiss index build, probe tuning on a seeded sample,
search of every row, FREEDOM weights) on clustered vectors (a Gaussian mixture, closer to real embeddings than
uniform noise, on which every ANN index needs near-exhaustive probing); its recall@10 is measured against the
exact kernel on `--sample` query rows, the same figure the graph's manifest records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._env import RunEnv, describe, peak_mb, thread_settings  # noqa: E402


def make_data(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_clustered(n: int, d: int, seed: int, clusters: int = 1024, spread: float = 1.5) -> np.ndarray:
    """Unit vectors around `clusters` random centres (within-cluster noise `spread` per coordinate)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)]
    x += spread * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def ann_worker(args: argparse.Namespace) -> None:
    import faiss

    from recipes.graphs.knn import KnnConfig, knn_edges
    from recipes.graphs.knn_ann import AnnConfig, AnnSearch

    x = make_clustered(args.n, args.d, args.seed)
    before = peak_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    search = AnnSearch(AnnConfig(index=args.index, sample=args.sample, seed=args.seed))
    edges = knn_edges(x, KnnConfig(k=args.k, norm="freedom"), search=search)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_s": cpu,
                "peak_mb": peak_mb(),
                "extra_mb": peak_mb() - before,
                "edges": edges.num_rows,
                "ann": search.info,
                "faiss": faiss.__version__,
                "faiss_threads": faiss.omp_get_max_threads(),
            }
        )
    )


def run_ann(args: argparse.Namespace) -> None:
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = [sys.executable, __file__, "--worker", "ann", "--n", str(args.n), "--d", str(args.d)]
    cmd += ["--k", str(args.k), "--seed", str(args.seed), "--index", args.index, "--sample", str(args.sample)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    ann = r["ann"]
    recall = ann[f"recall_at_{args.k}"]
    lines = [
        f"Approximate top-{args.k} cosine graph (recipes/graphs/knn_ann.py, FREEDOM weights) over {args.n:,} x "
        f"{args.d} clustered unit vectors (1,024 Gaussian centres, spread 1.5, seed {args.seed}), all rows as "
        f"queries. {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), faiss {r['faiss']} "
        f"({r['faiss_threads']} threads). Time includes the index build, the probe tuning and the exact "
        f"sample it is measured against.",
        "",
        "| index | params | recall@10 (sample) | sample | seconds | CPU s | peak RSS MB | extra MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| {ann['index']} | {ann['params']} | {recall:.4f} | {ann['sample']:,} | {r['seconds']:.1f} | "
        f"{r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} |",
        "",
        f"recall@{args.k} goal >= 0.95: {'met' if recall >= 0.95 else 'MISSED'}. Load average before / after: "
        f"{load_before} / {', '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine).",
    ]
    print("\n".join(lines))
    if args.record:
        record(
            "approximate kNN graph (bench/knn.py --ann)",
            " ".join(["python", "bench/knn.py", *sys.argv[1:]]),
            lines,
        )


def worker(method: str, n: int, d: int, k: int, seed: int, out: str, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
    else:
        from recipes.graphs.knn import KnnConfig, knn_edges
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    threadpool_limits(threads)
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
        json.dumps(
            {
                "seconds": seconds,
                "cpu_s": cpu,
                "peak_mb": peak_mb(),
                "extra_mb": peak_mb() - before,
                "threads": describe(thread_settings()),
            }
        )
    )


def run(method: str, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--d", str(args.d)]
    cmd += ["--k", str(args.k), "--seed", str(args.seed), "--out", out, "--threads", str(args.threads)]
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
    p.add_argument("--ann", action="store_true", help="time the approximate path instead (see above)")
    p.add_argument("--index", choices=["ivf_flat", "hnsw"], default="ivf_flat")
    p.add_argument("--sample", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1, help="threads for both sides (torch, faiss, BLAS)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each method")
    p.add_argument("--worker", choices=["ours", "faiss", "ann"])
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker == "ann":
        ann_worker(args)
        return
    if args.ann:
        run_ann(args)
        return
    if args.worker:
        worker(args.worker, args.n, args.d, args.k, args.seed, args.out, args.threads)
        return

    env = RunEnv.start()
    runs: dict[str, list[dict]] = {"ours": [], "faiss": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for m in runs:
                runs[m].append(run(m, args, os.path.join(tmp, f"{m}.npy")))
        ours, ref = np.load(os.path.join(tmp, "ours.npy")), np.load(os.path.join(tmp, "faiss.npy"))
    env.stop()
    agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ours, ref, strict=True)])

    def ratio(key: str) -> float:
        return statistics.median(o[key] / f[key] for o, f in zip(runs["ours"], runs["faiss"], strict=True))

    cpu_ratio, wall_ratio, mem_ratio = ratio("cpu_s"), ratio("seconds"), ratio("peak_mb")
    import faiss

    lines = [
        f"Exact top-{args.k} cosine graph over {args.n:,} x {args.d} random unit vectors (float32), all "
        f"{args.n:,} rows as queries. {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"faiss {faiss.__version__}; {args.threads} thread(s) on both sides, {args.repeats} alternating runs "
        "each (ours, faiss, ours, faiss, ...).",
        "",
        "| method | run | seconds | CPU s (all threads) | peak RSS MB | extra MB during search |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, label in (
        ("ours", "recipes.graphs.knn.knn_edges (blocked exact top-k, FREEDOM weights)"),
        ("faiss", f"faiss.IndexFlatIP add + search(k={args.k})"),
    ):
        for i, r in enumerate(runs[m]):
            lines.append(
                f"| {label} | {i + 1} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | "
                f"{r['extra_mb']:.0f} |"
            )
    lines += [
        "",
        f"ours / faiss, median of the pairs: CPU {cpu_ratio:.2f}x (goal <= 1.2x: "
        f"{'met' if cpu_ratio <= 1.2 else 'MISSED'}), wall {wall_ratio:.2f}x, peak RSS {mem_ratio:.2f}x (goal <= 2x: "
        f"{'met' if mem_ratio <= 2 else 'MISSED'}); neighbour agreement with faiss: {agree:.4f}.",
        f"Thread settings seen by the workers: ours: {runs['ours'][0]['threads']}; faiss: "
        f"{runs['faiss'][0]['threads']}.",
        *env.lines(),
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
