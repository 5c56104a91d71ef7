"""Scale run: an H&M-shaped catalogue through the product's CLI, each stage a child process with its wall time,
CPU seconds and peak RSS, plus the workspace size.

Usage: .venv/bin/python bench/scale.py --interactions 10000000 [--workdir DIR] [--record]
       .venv/bin/python bench/scale.py --full [--items 105000 --users 1400000 --interactions 31000000] [--record]

`--interactions N` is synthetic and has no images: N dated purchases (day resolution, so many time ties; repeat
purchases of a pair) by ~1.4M users of ~105k articles scaled with N (H&M's 31M), ids as zero-padded strings
("0108775015"). The parquet files are written in chunks; then `mmfeat ingest table`, `mmfeat split` (5-core,
temporal) and `mmfeat graph user-item` run as separate children, and each child's rusage (os.wait4) gives its
own CPU seconds and max RSS.

`--full` is the product end to end on an H&M-shaped catalogue: `--items` articles (zero-padded string ids) with
real JPEGs of varied size and aspect drawn by PIL from seeded noise and gradients, in H&M's layout
`images/{item_id[:3]}/{item_id}.jpg` (~2% of items have no file), a description for ~70% of them, `--users` users
with attributes and `--interactions` dated purchases with repeats. Then, each a CLI child: ingest (items, images
through `--image-template`, users, interactions), encode text (packaged MiniLM over the descriptions) and image
(tiny CLIP), split (5-core, temporal), user-item graph, fused text+image kNN graph (`--method auto`), MMRec export,
snapshot, forget one user and one item (erasure verified), report. Encoders run with `--engine local`, so every
process a stage uses is that child and its rusage covers it (a Ray worker is not the CLI's child). The per-stage
figures, the workspace size after each stage and the stages' own JSON outputs go to WORKDIR/summary.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
    n_users, n_items = shape(n)
    rng = np.random.default_rng(seed)
    item_ids, user_ids = hm_ids(rng, n_items, n_users)
    items = root / "items.parquet"
    pq.write_table(pa.table({"item_id": item_ids, "title": [f"article {i}" for i in range(n_items)]}), items)
    inter = root / "interactions.parquet"
    purchases(inter, rng, n, item_ids, user_ids)
    return items, inter, n_users, n_items


def shape(n: int) -> tuple[int, int]:
    """Users and items for n purchases: H&M's in proportion below its size, growing with sqrt(n) above it."""
    scale = n / HM_PURCHASES
    n_users = max(1000, round(HM_USERS * min(scale, 1.0) if scale < 1 else HM_USERS * scale**0.5))
    n_items = max(200, round(HM_ITEMS * min(scale, 1.0) if scale < 1 else HM_ITEMS * scale**0.5))
    return n_users, n_items


def hm_ids(rng: np.random.Generator, n_items: int, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded string ids as in H&M: 10-digit articles ("0108775015"), 13-digit customers."""
    item_ids = np.char.zfill(rng.choice(10**9, n_items, replace=False).astype(str), 10)
    user_ids = np.char.zfill(rng.choice(10**12, n_users, replace=False).astype(str), 13)
    return item_ids, user_ids


def purchases(
    inter: Path, rng: np.random.Generator, n: int, item_ids: np.ndarray, user_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Write n dated purchases to `inter` CHUNK rows at a time; returns the item and user popularity weights."""
    n_items, n_users = len(item_ids), len(user_ids)
    # Popularity: Zipf-like weights over a random permutation, so activity is skewed as in H&M.
    item_w = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_w = rng.permutation(item_w / item_w.sum())
    user_w = rng.pareto(1.5, n_users) + 1
    user_w /= user_w.sum()
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
    return item_w, user_w


def stage(name: str, args: list[str], ws: Path | None = None) -> dict:
    """Run one CLI stage as a child; its own wall, CPU seconds and max RSS (os.wait4 rusage). With `ws`, also the
    workspace size after the stage and the JSON object the command printed (`out`), if any."""
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
        raise SystemExit(f"stage {name} failed: {' '.join(args)}\n{out.decode(errors='replace')[-4000:]}")
    row = {
        "stage": name,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_gb": usage.ru_maxrss / 2**20,
    }
    if ws is not None:
        row["workspace_gb"] = dir_gb(ws)
        row["out"] = printed_json(out.decode(errors="replace"))
    print(
        f"{name}: {wall:.1f} s wall, {row['cpu_s']:.1f} s CPU, {row['peak_gb']:.2f} GB",
        file=sys.stderr,
        flush=True,
    )
    return row


def printed_json(text: str) -> object:
    """The JSON object a command printed (from the first line that opens one), else its last line."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("{"):
            try:
                return json.loads("\n".join(lines[k:]))
            except json.JSONDecodeError:
                continue
    return lines[-1] if lines else ""


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def run_interactions(n: int, workdir: Path, reuse: bool = False) -> tuple[list[dict], dict]:
    """Generate N purchases (or, with `reuse`, keep the parquet an earlier run of the same N left in WORKDIR/data),
    then ingest, split and user-item graph as CLI children."""
    data, ws = workdir / "data", workdir / "ws"
    items, inter = data / "items.parquet", data / "interactions.parquet"
    if reuse and pq.ParquetFile(inter).metadata.num_rows == n:
        shutil.rmtree(ws, ignore_errors=True)
        n_users, n_items = shape(n)
        info = {"generate_s": float("nan"), "users": n_users, "items": n_items, "reused_data": True}
    else:
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


WORDS = (
    "jersey",
    "cotton",
    "slim",
    "fit",
    "soft",
    "denim",
    "relaxed",
    "ribbed",
    "knit",
    "linen",
    "wool",
    "blend",
    "stretch",
    "organic",
    "shirt",
    "dress",
    "trousers",
    "skirt",
    "jacket",
    "hoodie",
    "collar",
    "sleeve",
    "pocket",
    "button",
    "zip",
    "waist",
    "hem",
    "print",
    "striped",
    "washed",
)


def catalogue(root: Path, n_items: int, n_users: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """items.parquet (title for all, text for ~70%), users.parquet, and JPEGs under images/ in H&M's layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    item_ids, user_ids = hm_ids(rng, n_items, n_users)
    words = np.array(WORDS)
    has_text = rng.random(n_items) < 0.7
    text = [
        " ".join(words[rng.integers(0, len(words), rng.integers(8, 30))]) if t else None for t in has_text
    ]
    titles = [" ".join(words[rng.integers(0, len(words), 3)]) for _ in range(n_items)]
    pq.write_table(
        pa.table({"item_id": item_ids, "title": titles, "text": pa.array(text, pa.string())}),
        root / "items.parquet",
    )
    ages = rng.integers(16, 90, n_users)
    pq.write_table(
        pa.table({"user_id": user_ids, "attributes": [f'{{"age": {a}}}' for a in ages]}),
        root / "users.parquet",
    )
    images, n_images, image_bytes = root / "images", 0, 0
    for item_id in item_ids[rng.random(n_items) < 0.98]:
        # Varied size and aspect: width 60-400 px, height/width 0.5-2 (H&M's are mostly portrait).
        w = int(rng.integers(60, 401))
        h = max(16, int(w * rng.uniform(0.5, 2.0)))
        noise = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.BILINEAR)
        folder = images / item_id[:3]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{item_id}.jpg"
        img.save(path, quality=85)
        n_images += 1
        image_bytes += path.stat().st_size
    info = {"with_text": int(has_text.sum()), "images": n_images, "image_mb": image_bytes / 2**20}
    return item_ids, user_ids, info


def run_full(
    n: int, n_items: int, n_users: int, workdir: Path, checkpoint: str | None = None, redo: bool = False
) -> tuple[list[dict], dict]:
    """Generate the catalogue and purchases, then every product stage as a CLI child (see the module docstring).

    With `checkpoint` (a stage name), the workspace is copied aside just before that stage; with `redo`, an earlier
    run's data and checkpoint in `workdir` are reused and only the stages from the checkpoint on run again (their
    earlier rows are kept from its summary.json), so a fix to a late stage is measured without regenerating."""
    data, ws, out = workdir / "data", workdir / "ws", workdir / "export"
    summary, saved = workdir / "summary.json", workdir / "ws.checkpoint"
    if redo:
        earlier = json.loads(summary.read_text())
        info, checkpoint = earlier["info"], earlier["info"]["checkpoint"]
        shutil.rmtree(ws, ignore_errors=True)
        shutil.copytree(saved, ws)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        data.mkdir(parents=True)
        t0 = time.perf_counter()
        item_ids, user_ids, info = catalogue(data, n_items, n_users)
        rng = np.random.default_rng(1)
        item_w, user_w = purchases(data / "interactions.parquet", rng, n, item_ids, user_ids)
        info |= {"generate_s": time.perf_counter() - t0, "users": n_users, "items": n_items}
        info["data_gb"] = dir_gb(data)
        # The forgotten user and item are the most active ones, so they surely survive the 5-core and the erasure
        # has rows, vectors and graph edges to remove everywhere.
        user, item = str(user_ids[np.argmax(user_w)]), str(item_ids[np.argmax(item_w)])
        info |= {"forgotten_user": user, "forgotten_item": item, "checkpoint": checkpoint}
    user, item = info["forgotten_user"], info["forgotten_item"]
    base = [MMFEAT, "--workspace", str(ws)]
    local = ["--engine", "local", "--no-progress", "--json"]
    steps = [
        (
            "ingest (items, images, users, purchases)",
            [
                *base, "ingest", "table", "--items", str(data / "items.parquet"),
                "--users", str(data / "users.parquet"), "--interactions", str(data / "interactions.parquet"),
                "--images", str(data / "images"), "--image-template", "{item_id:.3}/{item_id}.jpg", "--json",
            ],
        ),
        ("encode text (MiniLM)", [*base, "encode", "text", "--fields", "text", "--feature", "text", *local]),
        ("encode image (tiny CLIP)", [*base, "encode", "image", "--model", "tiny-test", *local]),
        (
            "split (5-core, temporal)",
            [*base, "split", "--name", "main", "--scheme", "temporal", "--kcore", "5"],
        ),
        (
            "user-item graph (sym)",
            [*base, "graph", "user-item", "--split", "main", "--norm", "sym", "--name", "ui"],
        ),
        (
            "kNN graph (text + image, auto)",
            [
                *base, "graph", "knn", "--split", "main", "--feature", "text", "--feature", "clip_image",
                "--method", "auto", "--name", "knn",
            ],
        ),
        (
            "export (MMRec)",
            [
                *base, "export", "mmrec", "--split", "main", "--out", str(out),
                "--feature", "text_feat=text", "--feature", "image_feat=clip_image",
            ],
        ),
        (
            "snapshot",
            [
                *base, "snapshot", "create", "scale", "--split", "main", "--feature", "text",
                "--feature", "clip_image", "--graph", "ui", "--graph", "knn",
            ],
        ),
        ("forget user", [*base, "forget", "user", user, "--request-id", "scale-user"]),
        ("forget item", [*base, "forget", "item", item, "--request-id", "scale-item"]),
        ("report", [*base, "report", "--split", "main", "--out", str(workdir / "report.html")]),
    ]  # fmt: skip
    names = [name for name, _ in steps]
    if checkpoint is not None and checkpoint not in names:
        raise SystemExit(f"--checkpoint {checkpoint!r} is not a stage; choose one of {names}")
    rows = [r for r in earlier["stages"] if names.index(r["stage"]) < names.index(checkpoint)] if redo else []
    for name, args in steps[len(rows) :]:
        if name == checkpoint and not redo:
            shutil.rmtree(saved, ignore_errors=True)
            shutil.copytree(ws, saved)
        rows.append(stage(name, args, ws))
        # Written after every stage, so a run cut short still shows what it measured.
        summary.write_text(json.dumps({"info": info, "stages": rows}, indent=2, default=str))
    info["workspace_gb"] = rows[-1]["workspace_gb"]
    info["export_files"] = sorted(p.name for p in out.rglob("*") if p.is_file())
    summary.write_text(json.dumps({"info": info, "stages": rows}, indent=2, default=str))
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


def full_table(n: int, rows: list[dict], info: dict, settings: dict, load: tuple[str, str]) -> list[str]:
    scale = f"--full --items {info['items']} --users {info['users']} --interactions {n}"
    lines = [
        f"### `bench/scale.py {scale}` ({dt.date.today()})",
        "",
        f"H&M-shaped catalogue end to end through the CLI: {info['items']:,} items ({info['images']:,} JPEGs, "
        f"{info['image_mb']:.0f} MB; {info['with_text']:,} with a description), {info['users']:,} users, {n:,} "
        f"purchases; generated in {info['generate_s']:.0f} s ({info['data_gb']:.2f} GB). Each stage is a CLI child "
        "(encoders `--engine local`); CPU and peak RSS are that child's own, workspace size is after the stage.",
        "",
        "| stage | wall s | CPU s | peak RSS GB | workspace GB |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['stage']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_gb']:.2f} | {r['workspace_gb']:.2f} |"
        for r in rows
    ]
    worst = max(rows, key=lambda r: r["peak_gb"])
    lines += [
        "",
        f"Largest peak RSS: {worst['peak_gb']:.2f} GB ({worst['stage']}); goal <= 6 GB per stage. "
        f"Total {sum(r['wall_s'] for r in rows):.0f} s wall, {sum(r['cpu_s'] for r in rows):.0f} s CPU.",
        f"Load average at start / end: {load[0]} / {load[1]}. {describe(settings)}",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--interactions", type=int, default=None, help=f"default {10_000_000:,}; --full: {HM_PURCHASES:,}"
    )
    parser.add_argument("--full", action="store_true", help="the product end to end with images (see above)")
    parser.add_argument("--items", type=int, default=HM_ITEMS, help="--full: articles")
    parser.add_argument("--users", type=int, default=HM_USERS, help="--full: customers")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="default: a temp folder, removed afterwards"
    )
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help='--full: copy the workspace aside before this stage (e.g. "forget user")',
    )
    parser.add_argument(
        "--redo", action="store_true", help="--full: rerun from the checkpoint of an earlier run in --workdir"
    )
    parser.add_argument(
        "--reuse-data",
        action="store_true",
        help="--interactions: keep the parquet of an earlier run in --workdir",
    )
    args = parser.parse_args()
    if args.redo and (args.workdir is None or not (args.workdir / "ws.checkpoint").is_dir()):
        parser.error("--redo needs --workdir of an earlier --full run made with --checkpoint")
    n = args.interactions or (HM_PURCHASES if args.full else 10_000_000)
    settings, start_load = thread_settings(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mmfeat-scale-"))
    try:
        if args.full:
            rows, info = run_full(n, args.items, args.users, workdir, args.checkpoint, args.redo)
        else:
            rows, info = run_interactions(n, workdir, args.reuse_data)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load = (start_load, loadavg())
    lines = full_table(n, rows, info, settings, load) if args.full else table(n, rows, info, settings, load)
    print("\n".join(lines))
    if args.record:
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
