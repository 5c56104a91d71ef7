"""Benchmark `mmfeat report` on a synthetic workspace: 100k items, 1M interactions, two 64-d feature tables,
captions, images, a forget request; timed without and then with a split. Prints a table; --record appends it to
BENCHMARKS.md.

    .venv/bin/python bench/report.py                  # 100k items, 1M interactions
    .venv/bin/python bench/report.py --items 20000 --interactions 200000 --record
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stores.schema import INTERACTIONS, ITEM_IMAGES, ITEMS, TIMESTAMP, USERS  # noqa: E402
from stores.workspace import Workspace, conform  # noqa: E402

WORDS = np.array(
    [
        "the",
        "a",
        "story",
        "of",
        "love",
        "war",
        "city",
        "night",
        "young",
        "old",
        "family",
        "secret",
        "journey",
        "dark",
        "light",
        "world",
        "man",
        "woman",
        "child",
        "friend",
        "enemy",
        "music",
        "dream",
        "past",
        "future",
        "house",
        "road",
        "river",
        "sea",
        "king",
        "queen",
        "game",
        "power",
        "truth",
        "lie",
        "heart",
    ]
)


def _words(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi, n)
    pool = WORDS[rng.integers(0, len(WORDS), int(lengths.sum()))]
    cuts = np.cumsum(lengths)[:-1]
    return [" ".join(part) for part in np.split(pool, cuts)]


def _jpegs(rng: np.random.Generator, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=70
        )
        out.append(buf.getvalue())
    return out


def _features(ids: list[str], centres: np.ndarray, category: np.ndarray, noise: float, rng) -> pa.Table:
    vectors = (centres[category] + noise * rng.standard_normal((len(ids), centres.shape[1]))).astype(
        np.float32
    )
    now = datetime.now(UTC)
    return pa.table(
        {
            "item_id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
            "model": ["synthetic"] * len(ids),
            "created_at": pa.array([now] * len(ids), TIMESTAMP),
        }
    )


def build(ws: Workspace, n_items: int, n_inter: int, seed: int = 0) -> None:
    """Items with 20 categories, Zipf-popular interactions over two years, features near category centres."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    ids = [f"i{i:07d}" for i in range(n_items)]
    category = rng.integers(0, 20, n_items)
    items = pa.table(
        {
            "item_id": ids,
            "title": [f"Item {i}" for i in range(n_items)],
            "text": _words(rng, n_items, 10, 60),
            "attributes": [json.dumps({"category": f"cat{c:02d}"}) for c in category],
            "content_hash": [str(i) for i in range(n_items)],
            "created_at": pa.array([now] * n_items, TIMESTAMP),
        }
    )
    ws.upsert(ITEMS, conform(items, ITEMS.schema))
    pool = _jpegs(rng, 64)
    with_image = np.flatnonzero(rng.random(n_items) < 0.95)
    images = pa.table(
        {
            "item_id": [ids[i] for i in with_image],
            "sha256": [str(i % 64) for i in with_image],
            "format": ["JPEG"] * len(with_image),
            "image": pa.array([pool[i % 64] for i in with_image], pa.large_binary()),
        }
    )
    ws.upsert(ITEM_IMAGES, conform(images, ITEM_IMAGES.schema))
    n_users = max(n_inter // 20, 10)
    users = [f"u{u:07d}" for u in range(n_users)]
    ws.upsert(USERS, conform(pa.table({"user_id": users}), USERS.schema))
    item_idx = np.minimum(rng.zipf(1.3, n_inter) - 1, n_items - 1)
    item_idx = rng.permutation(n_items)[item_idx]
    user_idx = np.minimum(rng.zipf(1.5, n_inter) - 1, n_users - 1)
    ts = 1_600_000_000 + rng.integers(0, 2 * 365 * 86400, n_inter)
    inter = pa.table(
        {
            "user_id": pa.array(np.array(users, dtype=object)[user_idx], pa.string()),
            "item_id": pa.array(np.array(ids, dtype=object)[item_idx], pa.string()),
            "timestamp": pa.array(ts, pa.timestamp("s", tz="UTC")),
            "event": ["click"] * n_inter,
            "seq": pa.array(np.zeros(n_inter, dtype=np.int32)),
        }
    )
    # Zipf draws repeat (user, item, timestamp) rarely; number the repeats so keys stay unique.
    import duckdb

    con = duckdb.connect()
    con.register("raw", inter)
    inter = con.sql(
        "SELECT user_id, item_id, timestamp, event, (row_number() OVER (PARTITION BY user_id, item_id, timestamp)"
        " - 1)::INTEGER AS seq FROM raw"
    ).to_arrow_table()
    ws.upsert(INTERACTIONS, conform(inter, INTERACTIONS.schema))
    centres = rng.standard_normal((20, 64))
    ws.db.create_table("feat_image", _features(ids, centres, category, 1.5, rng), mode="overwrite")
    ws.db.create_table("feat_text", _features(ids, centres, category, 1.0, rng), mode="overwrite")
    captioned = [i for i in range(n_items) if i % 10]
    captions = pa.table(
        {
            "item_id": [ids[i] for i in captioned],
            "caption": _words(rng, len(captioned), 8, 40),
            "model": ["synthetic-captioner"] * len(captioned),
            "created_at": pa.array([now] * len(captioned), TIMESTAMP),
        }
    )
    ws.db.create_table("captions", captions, mode="overwrite")
    receipt = json.dumps({"status": "done", "rows_deleted": {"interactions": 12}})
    forget = pa.table(
        {
            "request_id": ["fr-1"],
            "kind": ["user"],
            "reason": ["bench"],
            "requester": ["bench"],
            "created_at": pa.array([now], TIMESTAMP),
            "receipt": [receipt],
        }
    )
    ws.db.create_table("forget_requests", forget, mode="overwrite")


def add_split(ws: Workspace) -> None:
    from recipes.splits import SplitConfig, make_split

    split = make_split(ws.read("interactions"), SplitConfig(scheme="random", kcore=5))
    ws.db.create_table(
        "split_random", split.select(["user_id", "item_id", "timestamp", "label"]), mode="overwrite"
    )


def run_report(workspace: str, out: Path) -> float:
    """Wall time of `mmfeat report` in a fresh process (imports included, as a user would see it)."""
    script = (
        "from flows.cli import cli\nfrom flows.report_cli import report\n"
        "cli.commands.setdefault('report', report)\ncli(obj={})\n"
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", script, "--workspace", workspace, "report", "--out", str(out)],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mmfeat-bench-report-") as tmp:
        ws = Workspace(Path(tmp) / "ws")
        start = time.perf_counter()
        build(ws, args.items, args.interactions)
        built = time.perf_counter() - start
        rows = []
        for label in ("no split (5-core on the fly)", "with split_random"):
            if label.startswith("with"):
                add_split(ws)
            out = Path(tmp) / "report.html"
            seconds = run_report(ws.uri, out)
            rows.append((label, seconds, out.stat().st_size / 1e6))

    header = "| case | items | interactions | report s | file MB |\n|---|---:|---:|---:|---:|"
    lines = [f"| {c} | {args.items:,} | {args.interactions:,} | {s:.1f} | {mb:.1f} |" for c, s, mb in rows]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load}"
    table = "\n".join([header, *lines])
    print(f"synthetic workspace built in {built:.1f} s ({machine})\n{table}")
    if args.record:
        section = (
            f"\n## mmfeat report — {datetime.now(UTC):%Y-%m-%d %H:%M UTC}\n\n"
            f"`bench/report.py --items {args.items} --interactions {args.interactions}`: synthetic workspace (two "
            f"64-d feature tables, captions, images, a forget request), {machine}. Wall time of `mmfeat report` in "
            f"a fresh process; kNN graphs on a 20,000-item sample, projections on 5,000 points.\n\n{table}\n"
        )
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write(section)
        print(f"appended to {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
