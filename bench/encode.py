"""Benchmark: `mmfeat encode text` end to end versus a bare loop over the same SentenceTransformer, same texts.

    python bench/encode.py                 # 5,000 synthetic item texts, MiniLM, print the table
    python bench/encode.py --record        # ... and append it to BENCHMARKS.md
    python bench/encode.py --items 300     # a quick check that the script works

Both sides run as fresh processes and are timed from process start to exit, so the pipeline's figure includes
Python start-up, Ray start, reading the items in batches while the model runs (the driver imports no model
library: the actor loads the model and reports its provenance), hashing, and the chunked LanceDB commits; the bare loop's includes its imports and model load. The goal is a
pipeline within 1.25x of the bare loop. Runs alternate (bare, pipeline, bare, pipeline, ...) so that a change in
machine load hits both sides alike; the table shows every run, the ratio of the fastest runs (the least disturbed
by other work on the machine) and the ratio within each pair.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extractors.model_pool import slot_threads  # noqa: E402
from extractors.runner import compose_text  # noqa: E402
from stores.schema import ITEMS  # noqa: E402
from stores.workspace import Workspace  # noqa: E402

GOAL = 1.25
VOCAB = (
    "a young detective returns to her home town where a series of strange disappearances leads to an old family "
    "secret while a rival gang plans one last heist and two friends travel across the desert to find a lost "
    "treasure before the storm the war ends the ship sinks love grows slowly in a small village in winter"
)
WORDS = VOCAB.split()

# The pipeline: the `mmfeat` group with the extraction commands attached (the lead registers them in flows/cli.py;
# attaching them again is harmless).
PIPELINE = (
    "from flows.cli import cli; from flows.extract_cli import encode; cli.add_command(encode); cli(obj={})"
)
BARE = """
import json, sys, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer
from extractors.text import packaged_minilm_path
threads = int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
texts = json.load(open(sys.argv[1]))
model = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
batch = int(sys.argv[2])
out = []
for start in range(0, len(texts), batch):
    out.append(model.encode(texts[start:start + batch], batch_size=batch, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False))
vectors = np.concatenate(out).astype(np.float32)
print(json.dumps({"rows": len(vectors), "threads": torch.get_num_threads()}))
"""


def synthetic_items(n: int, seed: int = 0) -> pa.Table:
    """n items with a 2-4 word title and a 40-70 word overview (about the length of a TMDB plot summary)."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    rows = []
    for k in range(n):
        title = " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))).title() + f" ({1950 + k % 70})"
        text = " ".join(rng.choice(WORDS, int(rng.integers(40, 71)))).capitalize() + "."
        rows.append({"item_id": f"b{k:05d}", "title": title, "text": text, "attributes": "{}", "source": "bench",
                     "content_hash": str(k), "created_at": now, "updated_at": now})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=ITEMS.schema)


def run_pipeline(items: pa.Table, batch: int, env: dict, workdir: Path, k: int) -> dict:
    ws = Workspace(workdir / f"ws{k}")
    ws.upsert(ITEMS, items)
    # Chunks of at most a quarter of the items, so that a short run commits while it still reads and encodes.
    chunk = min(2048, max(batch, items.num_rows // 4))
    cmd = [sys.executable, "-c", PIPELINE, "--workspace", ws.uri, "encode", "text", "--batch-size", str(batch),
           "--chunk-rows", str(chunk), "--no-progress", "--json"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"pipeline failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["done"] == items.num_rows and ws.count("feat_text") == items.num_rows
    return {"wall": wall, "inner": summary["seconds"], "rows": summary["done"], "stages": summary["stages"]}


def overlap_note(stages: dict) -> str:
    """The runner's stage times and whether they overlapped: model time + write time above the loop's wall
    time means the model encoded while the driver committed chunks."""
    busy, steady = stages["encode"] + stages["write"], stages["loop"] - stages["first_batch"]
    note = (f"read {stages['read']:.1f} s, encode {stages['encode']:.1f} s, write {stages['write']:.1f} s; loop "
            f"{stages['loop']:.1f} s, {stages['first_batch']:.1f} s of it to the first batch (workers' start); "
            f"(encode + write) / (loop - first batch) = {busy / steady:.2f}")  # fmt: skip
    if "last_read" in stages:  # the text path reads in batches while the model runs (runner.TextStream)
        overlapped = "overlapped" if stages["last_read"] > stages["first_write"] else "did not overlap"
        note += (f"; first chunk committed at {stages['first_write']:.1f} s, last input batch read at "
                 f"{stages['last_read']:.1f} s of the loop: reading {overlapped} encoding and writing")  # fmt: skip
    return note


def run_bare(texts_file: Path, batch: int, threads: int, env: dict) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BARE, str(texts_file), str(batch), str(threads)], cwd=REPO,
                          env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"bare loop failed:\n{done.stderr[-3000:]}")
    return {"wall": wall, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bare-threads", type=int, default=slot_threads(os.cpu_count() or 1),
                        help="torch threads of the bare loop (default: those of the pipeline's CPU actor, "
                             "extractors/model_pool.py slot_threads); 0 = torch's default")  # fmt: skip
    parser.add_argument("--record", action="store_true", help="Append the results to BENCHMARKS.md.")
    args = parser.parse_args()

    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    items = synthetic_items(args.items)
    texts = [
        compose_text([t, x])
        for t, x in zip(items["title"].to_pylist(), items["text"].to_pylist(), strict=True)
    ]
    load = os.getloadavg()[0]
    runs: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="mmfeat-bench-") as tmp:
        workdir = Path(tmp)
        texts_file = workdir / "texts.json"
        texts_file.write_text(json.dumps(texts))
        for k in range(args.repeats):
            runs.append(("bare loop", run_bare(texts_file, args.batch_size, args.bare_threads, env)))
            print(f"bare loop      {runs[-1][1]['wall']:7.1f} s", flush=True)
            runs.append(("mmfeat encode", run_pipeline(items, args.batch_size, env, workdir, k)))
            print(
                f"mmfeat encode  {runs[-1][1]['wall']:7.1f} s  ({overlap_note(runs[-1][1]['stages'])})",
                flush=True,
            )
    bares = [r["wall"] for name, r in runs if name == "bare loop"]
    pipes = [r["wall"] for name, r in runs if name == "mmfeat encode"]
    # The fastest run of each side is the one least slowed by whatever else the machine ran: the headline ratio.
    bare, pipe = min(bares), min(pipes)
    ratio = pipe / bare
    pairs = ", ".join(f"{p / b:.2f}x" for b, p in zip(bares, pipes, strict=True))
    threads = next(r["threads"] for name, r in runs if name == "bare loop")
    lines = [
        f"{args.items:,} synthetic item texts (title + 40-70 word overview), all-MiniLM-L6-v2 (packaged), CPU, "
        f"batch {args.batch_size}; {os.cpu_count()} CPUs, load average {load:.1f} at start; bare loop with "
        f"{threads} torch thread(s), pipeline: local Ray, 1 model actor "
        f"({slot_threads(os.cpu_count() or 1)} torch thread(s)).",
        "",
        "| run | wall s | items/s | notes |",
        "|---|---:|---:|---|",
    ]
    for name, r in runs:
        note = (f"run_extraction itself {r['inner']:.1f} s: {overlap_note(r['stages'])}" if "inner" in r
                else "imports + load + encode")  # fmt: skip
        lines.append(f"| {name} | {r['wall']:.1f} | {args.items / r['wall']:.0f} | {note} |")
    verdict = "meets" if ratio <= GOAL else "misses"
    lines += ["", f"fastest pipeline / fastest bare loop = {pipe:.1f} / {bare:.1f} s = **{ratio:.2f}x** "
              f"({verdict} the {GOAL}x goal); each pipeline run over the bare run before it: {pairs}."]  # fmt: skip
    print("\n".join(lines))
    if args.record:
        day = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = f"\n## encode text: `mmfeat encode text` vs a bare SentenceTransformer loop ({day})\n\n"
        section += (
            f"`python bench/encode.py --items {args.items}` on {platform.node() or 'this machine'}.\n\n"
        )
        with (REPO / "BENCHMARKS.md").open("a", encoding="utf-8") as fh:
            fh.write(section + "\n".join(lines) + "\n")
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
