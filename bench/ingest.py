"""Ingest throughput and peak memory: `mmfeat ingest table` vs pandas read_csv + LanceDB create_table.

Usage: .venv/bin/python bench/ingest.py [--interactions 10000000] [--items 100000] [--repeats 2] [--record]
       .venv/bin/python bench/ingest.py --images 300 [--record]   (image ingest: peak RSS vs total image bytes)

Both sides run as separate child processes on the same files in the same run, alternating (baseline, ours,
baseline, ours, ...) so both see the same load; the ratios are medians of the pairs, in wall time and in the
child's CPU seconds over the same timed window (user + system, all threads); both import lancedb before their clock
starts (it takes seconds: timing it on one side only was unfair); peak memory is the child's max RSS (VmHWM). Thread pools, load
average and CPU seconds of the whole run are recorded (bench/_env.py).
The baseline does no validation, no keys and no quarantine: it is the floor a validated ingest is measured against.
The image figure ingests folders of 4, N/4 and N noise JPEGs (~3.9 MB each) in child processes: with images
streamed in batches, peak RSS should stay flat as the folder grows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._env import RunEnv  # noqa: E402

# Peak RSS of the child itself: /proc VmHWM starts afresh at exec (ru_maxrss would inherit the parent's peak).
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
"""

MMFEAT = """
import json, sys, time
import lancedb  # noqa: F401  (imported before the clock, as the baseline does; it is imported lazily otherwise)
from recipes.ingest.load import ingest
from recipes.ingest.sources import table
from stores.workspace import Workspace
t, c = time.perf_counter(), cpu()
report = ingest(Workspace(sys.argv[1]), table(sys.argv[2], sys.argv[3], name="bench"))
wall = time.perf_counter() - t
assert report.balanced
print(json.dumps({"wall": wall, "cpu": cpu() - c, "rss_mb": hwm(),
                  "rows": report.tables["interactions"].inserted}))
"""

BASELINE = """
import json, sys, time
import lancedb, pandas as pd
t, c = time.perf_counter(), cpu()
db = lancedb.connect(sys.argv[1])
items = pd.read_csv(sys.argv[2], dtype=str)
inter = pd.read_csv(sys.argv[3], dtype={"user_id": str, "item_id": str, "event": str})
db.create_table("items", items)
db.create_table("interactions", inter)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "cpu": cpu() - c, "rss_mb": hwm(),
                  "rows": len(inter)}))
"""

IMAGES = """
import json, sys, time
from recipes.ingest.load import ingest
from recipes.ingest.sources import table
from stores.workspace import Workspace
t, c = time.perf_counter(), cpu()
ws = Workspace(sys.argv[1])
report = ingest(ws, table(sys.argv[2], images=sys.argv[3], name="bench"))
wall = time.perf_counter() - t
assert report.balanced
print(json.dumps({"wall": wall, "rss_mb": hwm(), "stored": ws.count("item_images")}))
"""

IDLE = """
import json
import lancedb, duckdb, pandas, pyarrow  # noqa: F401  (the libraries both sides load)
print(json.dumps({"rss_mb": hwm()}))
"""


def make_source(root: Path, n_inter: int, n_items: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    item_ids = pc.utf8_lpad(pa.array(np.arange(n_items).astype(str)), 10, "0")
    items = pa.table(
        {
            "item_id": item_ids,
            "title": pc.binary_join_element_wise("item ", item_ids, ""),
            "text": pa.array(np.full(n_items, "a synthetic product description")),
        }
    )
    pacsv.write_csv(items, root / "items.csv")
    n_users = max(n_inter // 50, 1)
    users = pa.array(np.char.add("u", (rng.zipf(1.3, n_inter) % n_users).astype(str)))
    its = pc.take(item_ids, pa.array(rng.zipf(1.2, n_inter) % n_items))
    ts = pa.array(1_600_000_000 + rng.integers(0, 3e7, n_inter))
    events = pc.take(pa.array(["view", "cart", "purchase"]), pa.array(rng.integers(0, 3, n_inter)))
    inter = pa.table(
        {
            "user_id": users,
            "item_id": its,
            "timestamp": ts,
            "event": events,
            "value": pa.array(rng.integers(1, 6, n_inter).astype(float)),
        }
    )
    pacsv.write_csv(inter, root / "interactions.csv", pacsv.WriteOptions(batch_size=1 << 20))
    return root / "items.csv", root / "interactions.csv"


def make_images(root: Path, n: int, seeds: int = 16) -> tuple[Path, Path]:
    """`n` items whose images are hard links to `seeds` noise JPEGs (1000x1000, quality 100, ~3.9 MB each: noise
    does not compress), so a GB-sized folder costs little disk; every file still reads and decodes in full."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(seeds):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=100, subsampling=0
        )
        paths.append(root / f"seed{k}.jpg")
        paths[-1].write_bytes(buf.getvalue())
    lines = ["item_id,title,image"]
    for i in range(n):
        os.link(paths[i % seeds], images / f"{i:06d}.jpg")
        lines.append(f"{i:06d},item {i},{i:06d}.jpg")
    (root / "items.csv").write_text("\n".join(lines) + "\n")
    return root / "items.csv", images


def image_figure(n: int, record: bool) -> None:
    """Peak RSS of `mmfeat`'s image ingest for folders of 4, n/4 and n images."""
    rows = []
    for count in sorted({4, max(n // 4, 5), n}):
        with tempfile.TemporaryDirectory() as tmp:
            items, images = make_images(Path(tmp), count)
            total_mb = sum(p.stat().st_size for p in images.iterdir()) / 2**20
            r = child(IMAGES, str(Path(tmp) / "ws"), str(items), str(images))
            assert r["stored"] == count, r
            rows.append((count, total_mb, r))
    lines = [
        f"| {'images':>7} | {'total MB':>9} | {'wall s':>7} | {'MB/s':>6} | {'peak RSS MB':>11} |",
        f"|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 13}|",
    ]
    for count, total_mb, r in rows:
        lines.append(
            f"| {count:>7,} | {total_mb:>9.0f} | {r['wall']:>7.1f} | {total_mb / r['wall']:>6.0f} | "
            f"{r['rss_mb']:>11.0f} |"
        )
    (_, small_mb, small), (_, big_mb, big) = rows[-2], rows[-1]
    summary = (
        f"peak RSS {rows[0][2]['rss_mb']:.0f} MB with {rows[0][1]:.0f} MB of images; from {small_mb:.0f} to "
        f"{big_mb:.0f} MB of images it grows {big['rss_mb'] - small['rss_mb']:.0f} MB "
        f"({(big['rss_mb'] - small['rss_mb']) / (big_mb - small_mb):.2f} MB per MB of images; streamed "
        "batches bound it by the batch size, not the folder)"
    )
    print("\n".join(lines))
    print(summary)
    if record:
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write(
                f"\n## Image ingest memory ({dt.date.today()}, up to {n:,} noise JPEGs of ~3.9 MB, 2-core CPU)\n\n"
                f"`.venv/bin/python bench/ingest.py --images {n} --record`\n\n"
                + "\n".join(lines)
                + f"\n\n{summary}\n"
            )


def child(code: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", HWM + code, *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interactions", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=0, help="run only the image-ingest figure, up to N images")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    if args.images:
        image_figure(args.images, args.record)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        items, inter = make_source(root, args.interactions, args.items)
        import gc

        gc.collect()
        raw_mb = (items.stat().st_size + inter.stat().st_size) / 2**20
        print(
            f"generated {args.interactions:,} interactions, {args.items:,} items ({raw_mb:.0f} MB CSV) "
            f"in {time.perf_counter() - t:.1f}s"
        )
        env = RunEnv.start()
        idle = child(IDLE)
        runs: dict[str, list[dict]] = {"base": [], "ours": []}
        for rep in range(args.repeats):
            runs["base"].append(child(BASELINE, str(root / f"base{rep}"), str(items), str(inter)))
            runs["ours"].append(child(MMFEAT, str(root / f"ours{rep}"), str(items), str(inter)))
        env.stop()
    lines = [
        f"| {'run':<28} | {'#':>2} | {'wall s':>7} | {'CPU s':>6} | {'rows/s':>10} | {'peak RSS MB':>11} | "
        f"{'RSS - libs MB':>13} |",
        f"|{'-' * 30}|{'-' * 4}|{'-' * 9}|{'-' * 8}|{'-' * 12}|{'-' * 13}|{'-' * 15}|",
    ]
    for key, name in (("base", "pandas + create_table"), ("ours", "mmfeat ingest (validated)")):
        for i, r in enumerate(runs[key]):
            lines.append(
                f"| {name:<28} | {i + 1:>2} | {r['wall']:>7.1f} | {r['cpu']:>6.1f} | "
                f"{args.interactions / r['wall']:>10,.0f} | {r['rss_mb']:>11.0f} | {r['rss_mb'] - idle['rss_mb']:>13.0f} |"
            )

    def ratio(key: str) -> float:
        return statistics.median(b[key] / o[key] for b, o in zip(runs["base"], runs["ours"], strict=True))

    speed, cpu_speed = ratio("wall"), ratio("cpu")
    peak = statistics.median(r["rss_mb"] for r in runs["ours"]) / raw_mb
    above = statistics.median(r["rss_mb"] - idle["rss_mb"] for r in runs["ours"]) / raw_mb
    base_above = statistics.median(r["rss_mb"] - idle["rss_mb"] for r in runs["base"]) / raw_mb
    summary = (
        f"raw CSV {raw_mb:.0f} MB; libraries alone {idle['rss_mb']:.0f} MB RSS. Speed vs baseline (median of the "
        f"pairs): {speed:.2f}x wall, {cpu_speed:.2f}x CPU (goal >= 1.0 in both, CPU being the less noisy: {'met' if min(speed, cpu_speed) >= 1 else 'MISSED'}); "
        f"mmfeat peak RSS / raw size: {peak:.2f} absolute, {above:.2f} above the libraries (goal <= 2.0: "
        f"{'met' if above <= 2 else 'MISSED'}; the baseline: {base_above:.2f} above the libraries)"
    )
    print("\n".join(lines))
    print(summary)
    print("\n".join(env.lines()))
    if args.record:
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write(
                f"\n## Ingest ({dt.date.today()}, {args.interactions:,} interactions, {args.items:,} items, "
                f"2-core CPU)\n\n`.venv/bin/python bench/ingest.py {' '.join(sys.argv[1:])}`\n\n"
                + "\n".join(lines)
                + f"\n\n{summary}\n"
                + "\n".join(env.lines())
                + "\n"
            )


if __name__ == "__main__":
    main()
