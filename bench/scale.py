"""Scale run: an H&M-shaped catalogue through the product's CLI, each stage a child process with its wall time,
CPU seconds and peak RSS, plus the workspace size.

Usage: .venv/bin/python bench/scale.py --interactions 10000000 [--workdir DIR] [--record]
       .venv/bin/python bench/scale.py --full            (images, encoders, kNN, exports, forget: not built yet)

`--interactions N` is synthetic and has no images: N dated purchases (day resolution, so many time ties; repeat
purchases of a pair) by ~1.4M users of ~105k articles scaled with N (H&M's 31M), ids as zero-padded strings
("0108775015"). The parquet files are written in chunks; then `mmfeat ingest table`, `mmfeat split` (5-core,
temporal) and `mmfeat graph user-item` run as separate children, and each child's rusage (os.wait4) gives its
own CPU seconds and max RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import describe, loadavg, thread_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MMFEAT = str(REPO / ".venv" / "bin" / "mmfeat")
HM_PURCHASES, HM_USERS, HM_ITEMS = 31_000_000, 1_400_000, 105_000
CHUNK = 2_000_000
START = dt.datetime(2018, 9, 20)
DAYS = 734


def generate(root: Path, n: int, seed: int = 0) -> tuple[Path, Path, int, int]:
    """items.parquet and interactions.parquet (written CHUNK rows at a time); returns their paths and counts."""
    scale = n / HM_PURCHASES
    n_users = max(1000, round(HM_USERS * min(scale, 1.0) if scale < 1 else HM_USERS * scale**0.5))
    n_items = max(200, round(HM_ITEMS * min(scale, 1.0) if scale < 1 else HM_ITEMS * scale**0.5))
    rng = np.random.default_rng(seed)
    item_ids = np.char.zfill(rng.choice(10**9, n_items, replace=False).astype(str), 10)
    user_ids = np.char.zfill(rng.choice(10**12, n_users, replace=False).astype(str), 13)
    items = root / "items.parquet"
    pq.write_table(pa.table({"item_id": item_ids, "title": [f"article {i}" for i in range(n_items)]}), items)
    # Popularity: Zipf-like weights over a random permutation, so activity is skewed as in H&M.
    item_w = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_w = rng.permutation(item_w / item_w.sum())
    user_w = rng.pareto(1.5, n_users) + 1
    user_w /= user_w.sum()
    inter = root / "interactions.parquet"
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.timestamp("s"))])
    epoch = int(START.replace(tzinfo=dt.UTC).timestamp())
    with pq.ParquetWriter(inter, schema) as writer:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            u = rng.choice(n_users, m, p=user_w)
            i = rng.choice(n_items, m, p=item_w)
            # ~10% repeat the previous row's pair (a repeat purchase), some on the same day
            rep = rng.random(m) < 0.1
            rep[0] = False
            idx = np.flatnonzero(rep)
            u[idx], i[idx] = u[idx - 1], i[idx - 1]
            day = rng.integers(0, DAYS, m)
            ts = (epoch + day * 86_400).astype("datetime64[s]")
            writer.write_table(pa.table([user_ids[u], item_ids[i], ts], schema=schema))
    return items, inter, n_users, n_items


def stage(name: str, args: list[str]) -> dict:
    """Run one CLI stage as a child; its own wall, CPU seconds and max RSS (os.wait4 rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage {name} failed:\n{out.decode(errors='replace')[-4000:]}")
    return {
        "stage": name,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_gb": usage.ru_maxrss / 2**20,
    }


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def run_interactions(n: int, workdir: Path) -> tuple[list[dict], dict]:
    data, ws = workdir / "data", workdir / "ws"
    shutil.rmtree(workdir, ignore_errors=True)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    items, inter, n_users, n_items = generate(data, n)
    info = {"generate_s": time.perf_counter() - t0, "users": n_users, "items": n_items}
    info["parquet_gb"] = dir_gb(data)
    base = [MMFEAT, "--workspace", str(ws)]
    rows = [
        stage("ingest", [*base, "ingest", "table", "--items", str(items), "--interactions", str(inter)]),
        stage(
            "split (5-core, temporal)",
            [*base, "split", "--name", "main", "--scheme", "temporal", "--kcore", "5"],
        ),
        stage("user-item graph (sym)", [*base, "graph", "user-item", "--split", "main", "--norm", "sym"]),
    ]
    info["workspace_gb"] = dir_gb(ws)
    return rows, info


def table(n: int, rows: list[dict], info: dict, settings: dict, load: tuple[str, str]) -> list[str]:
    lines = [
        f"### `bench/scale.py --interactions {n:,}` ({dt.date.today()})",
        "",
        f"Synthetic H&M-shaped purchases, no images: {n:,} rows, {info['users']:,} users, {info['items']:,} items; "
        f"parquet {info['parquet_gb']:.2f} GB (generated in {info['generate_s']:.0f} s), workspace after the run "
        f"{info['workspace_gb']:.2f} GB. Each stage is a CLI child; CPU and peak RSS are that child's own.",
        "",
        "| stage | wall s | CPU s | peak RSS GB |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['stage']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_gb']:.2f} |" for r in rows]
    lines += ["", f"Load average at start / end: {load[0]} / {load[1]}. {describe(settings)}", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--full", action="store_true", help="the end-to-end image run (issue 15 item 1)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temp folder, removed afterwards"
    )
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    if args.full:
        raise SystemExit(
            "--full (images, encoders, kNN, exports, forget, report) is not built yet; see issue 15"
        )
    settings, start_load = thread_settings(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmfeat-scale-"))
    try:
        rows, info = run_interactions(args.interactions, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    lines = table(args.interactions, rows, info, settings, (start_load, loadavg()))
    print("\n".join(lines))
    if args.record:
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
