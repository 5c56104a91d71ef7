"""BPR triples with item features per second from `FeatureReader`, next to the same batches cut from NumPy arrays.

    .venv/bin/python bench/reader.py [--users 6040] [--items 3706] [--interactions 1000000] [--dims 384,512]
                                     [--batch 4096] [--epochs 3] [--plain-workers] [--record]

Builds a synthetic workspace (random interactions, one feature table per entry of --dims, a random split and a
snapshot), then times, in the same process and on the same batches (checked equal), interleaved epoch by epoch:
  in-memory:   a loop over NumPy arrays already in memory (permutation slice, the same negative sampler,
               `take` of the feature rows), its positive-pair keys computed once before the clock starts, as a
               competent user would: the rate any reader has to be compared with;
  reader:      `FeatureReader(ws, snapshot).bpr(...)` through `DataLoader(batch_size=None)` with 0 workers, and
               through the product's worker path `ds.loader(num_workers=2)` (persistent workers started once,
               at the first epoch, whose start-up that epoch's time includes; they send index arrays and the
               feature rows are gathered in this process); --plain-workers also times `DataLoader(ds,
               num_workers=2)` started afresh each epoch (--start-method: the workers' multiprocessing
               context; spawn is what Lance-safe code uses).
Ratios are per epoch (same epoch, same load) and the median is reported. Goal: the reader at >= half the
in-memory rate and >= 100,000 triples/s. Thread settings, load average and CPU seconds are recorded
(bench/_env.py). --record appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench._env import RunEnv, cpu_seconds  # noqa: E402
from recipes.pipeline import build_split  # noqa: E402
from recipes.splits import SplitConfig  # noqa: E402
from stores.features import feature_spec  # noqa: E402
from stores.reader import FeatureReader, pair_keys, sample_negatives  # noqa: E402
from stores.schema import INTERACTIONS, ITEMS, TIMESTAMP  # noqa: E402
from stores.snapshots import create_snapshot  # noqa: E402
from stores.workspace import Workspace, conform  # noqa: E402


def build(ws: Workspace, users: int, items: int, interactions: int, dims: list[int], seed: int) -> list[str]:
    """A synthetic workspace with a split "main" and a snapshot "bench" over features f0, f1, ..."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:07d}" for i in range(items)])
    ws.upsert(ITEMS, conform(pa.table({"item_id": ids, "content_hash": ids}), ITEMS.schema))
    # Zipf-like item popularity, as in real logs; repeated pairs are dropped by the split's dedup.
    pop = 1.0 / np.arange(1, items + 1) ** 0.8
    u = rng.integers(0, users, interactions)
    i = rng.choice(items, interactions, p=pop / pop.sum())
    rows = pa.table(
        {
            "user_id": pa.array(np.char.add("u", u.astype(str))),
            "item_id": pa.array(ids[i]),
            "timestamp": pa.array(1_600_000_000 + np.arange(interactions), pa.timestamp("s", tz="UTC")),
            "event": pa.array(["click"] * interactions),
            "seq": pa.array(np.zeros(interactions, np.int32)),
        }
    )
    ws.upsert(INTERACTIONS, conform(rows, INTERACTIONS.schema))
    features = []
    for k, d in enumerate(dims):
        name = f"f{k}"
        spec = feature_spec(name, d)
        vec = rng.standard_normal((items, d), dtype=np.float32)
        table = pa.table(
            {
                "item_id": ids,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d),
                "model": ["random"] * items,
                "revision": ["-"] * items,
                "params": ["{}"] * items,
                "input_hash": ids,
                "created_at": pa.array([datetime.now(UTC)] * items, TIMESTAMP),
            }
        )
        ws.upsert(spec, conform(table, spec.schema))
        features.append(name)
    build_split(ws, "main", SplitConfig(scheme="random", seed=seed))
    create_snapshot(ws, "bench", "main", features)
    return features


def in_memory_batches(user, item, keys, feats, n_items, batch, seed, epoch):
    """The reference: the same batches as `BprDataset`, cut straight from arrays held by the caller (`keys`:
    `pair_keys` of the positives, computed once outside the timed loop)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(user))
    for b in range(-(-len(user) // batch)):
        rows = order[b * batch : (b + 1) * batch]
        u, p = user[rows], item[rows]
        n = sample_negatives(np.random.default_rng([seed, epoch, b]), u, n_items, keys)
        out = {"user": u, "pos": p, "neg": n}
        for name, m in feats.items():
            out[f"pos_{name}"] = m.take(p, axis=0)
            out[f"neg_{name}"] = m.take(n, axis=0)
        yield out


def children_cpu() -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def timed(batches) -> tuple[int, float, float, dict]:
    """(triples, wall s, CPU s of this process and reaped children such as DataLoader workers, first batch)."""
    start, cpu, count, first = time.perf_counter(), cpu_seconds(), 0, None
    for b in batches:
        count += len(b["user"])
        first = first or b
    return count, time.perf_counter() - start, cpu_seconds() - cpu, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=6040)
    p.add_argument("--items", type=int, default=3706)
    p.add_argument("--interactions", type=int, default=1_000_000)
    p.add_argument("--dims", default="384,512", help="Feature widths, one feature table each.")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-workers", action="store_true", help="Also time DataLoader(ds, num_workers=2).")
    p.add_argument("--workdir", help="Where the workspace goes (default: a temporary folder).")
    p.add_argument("--record", action="store_true", help="Append the results to BENCHMARKS.md.")
    args = p.parse_args()
    torch.set_num_threads(1)
    env = RunEnv.start()
    dims = [int(d) for d in args.dims.split(",")]
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    ws = Workspace(Path(args.workdir or tmp.name) / "ws")
    t0 = time.perf_counter()
    features = build(ws, args.users, args.items, args.interactions, dims, args.seed)
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    reader = FeatureReader(ws, "bench")
    ds = reader.bpr(batch_size=args.batch, features=features, seed=args.seed)
    load_s = time.perf_counter() - t0
    user, item = reader.interaction_arrays("train")
    feats = {f: reader.feature_array(f)[0].copy() for f in features}
    n_items = reader.n_items

    keys = pair_keys(user, item, n_items)

    rates: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    # Persistent workers are reaped only at close(), so their CPU is added then, as an equal share per epoch;
    # the plain DataLoader's workers are reaped inside their own timed epoch and counted there.
    loader_name = f"reader, ds.loader(num_workers=2) ({args.start_method}, persistent)"
    loader = ds.loader(num_workers=2, multiprocessing_context=args.start_method)
    kids0, plain_kids = children_cpu(), 0.0
    for epoch in range(args.epochs):
        n, s, c, ref = timed(
            in_memory_batches(user, item, keys, feats, n_items, args.batch, args.seed, epoch)
        )
        rates.setdefault("in-memory NumPy", []).append(n / s)
        cpus.setdefault("in-memory NumPy", []).append(c / n * 1e6)
        ds.set_epoch(epoch)
        for workers in (0, 2, "loader"):
            if workers == 2 and not args.plain_workers:
                continue
            if workers == "loader":
                source, name = loader, loader_name
            else:
                ctx = args.start_method if workers else None
                source = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=ctx)
                name = f"reader, DataLoader {workers} workers" + (
                    f" ({args.start_method})" if workers else ""
                )
            k0 = children_cpu()
            n2, s2, c2, got = timed(source)
            plain_kids += children_cpu() - k0 if workers == 2 else 0.0
            assert n2 == n and all(np.array_equal(np.asarray(got[k]), ref[k]) for k in ref), "batches differ"
            rates.setdefault(name, []).append(n2 / s2)
            cpus.setdefault(name, []).append(c2 / n2 * 1e6)
    loader.close()
    worker_share = (children_cpu() - kids0 - plain_kids) / args.epochs / len(user) * 1e6
    cpus[loader_name] = [c + worker_share for c in cpus[loader_name]]
    env.stop()
    base = rates["in-memory NumPy"]
    ratio = {k: statistics.median(r / b for r, b in zip(v, base, strict=True)) for k, v in rates.items()}
    per_triple = 8 * 3 + 2 * 4 * sum(dims)
    lines = [
        f"{args.interactions:,} interactions ({len(user):,} train triples per epoch), {args.users:,} users, "
        f"{args.items:,} items, features {dims} (float32), batch {args.batch}; {per_triple:,} bytes per triple "
        f"with features. Build {build_s:.1f} s; reader load (snapshot check, split, id maps, features) "
        f"{load_s:.2f} s. {args.epochs} epochs, the sources interleaved in each; in-memory keys hoisted out of "
        "the timed loop. Median over epochs of the rate and of the same-epoch ratio to in-memory; the "
        "persistent loader's first epoch (worker start-up included) is listed apart.",
        "",
        "| source | triples/s (median) | vs in-memory (median same-epoch ratio) | CPU us per triple | MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in rates.items():
        rate = statistics.median(v)
        lines.append(
            f"| {name} | {rate:,.0f} | {ratio[name]:.2f} | {statistics.median(cpus[name]):.2f} | "
            f"{rate * per_triple / 1e6:,.0f} |"
        )
    first = rates[loader_name][0] / base[0]
    lines += [
        "",
        f"Persistent loader, first epoch (2 {args.start_method} workers starting): {first:.2f}x in-memory.",
    ]
    w_rate, w_ratio = statistics.median(rates[loader_name]), ratio[loader_name]
    verdict = "meets" if w_ratio >= 0.5 and w_rate >= 100_000 else "misses"
    lines += [
        "",
        f"Goal (DataLoader with workers >= half the in-memory rate and >= 100,000 triples/s): {verdict} it "
        f"({w_ratio:.2f}x, {w_rate:,.0f} triples/s); 0 workers: {ratio['reader, DataLoader 0 workers']:.2f}x.",
        *env.lines(),
    ]
    print("\n".join(lines))
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python bench/reader.py " + " ".join(sys.argv[1:])
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(
                f"\n## {stamp}: reader BPR triples with features\n\n`{cmd}`; torch {torch.__version__}, "
                "1 torch thread.\n\n" + "\n".join(lines) + "\n"
            )
        print("appended to BENCHMARKS.md")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
