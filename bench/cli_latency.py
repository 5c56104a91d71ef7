"""CLI start-up cost: `mmfeat --help` and `mmfeat sql "select count(*) from items"` on ML-100K, next to a bare
Python process that runs the same query with DuckDB over `lance.dataset`.

Usage: .venv/bin/python bench/cli_latency.py [--repeat 10] [--data ../shared/data/ml100k-posters] [--record]

ML-100K (with its TMDB items CSV and posters, see the data folder's NOTICE.md; test data, never copied into the
repository) is ingested into a temporary workspace with `mmfeat ingest movielens`. Each variant then runs
`--repeat` times as a child process, in turns (so machine load hits all alike); CPU time (user + system) is read
with resource.getrusage(RUSAGE_CHILDREN) around each child. Goals: `--help` under 0.5 s of CPU, and `mmfeat sql`
within 1.5x of the bare DuckDB-over-Lance process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "mmfeat"  # the installed console script, as a user runs it
MMFEAT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "flows.cli"]
QUERY = "select count(*) from items"
BARE = """
import sys
import duckdb, lance
con = duckdb.connect()
con.register("items", lance.dataset(sys.argv[1] + "/items.lance"))
print(con.sql(sys.argv[2]).fetchall()[0][0])
"""


def cpu_seconds(argv: list[str]) -> tuple[float, float, str]:
    """Run `argv` as a child; return its CPU seconds (user + system), wall seconds and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml100k-posters")
    ap.add_argument("--record", action="store_true", help="Append the table to BENCHMARKS.md.")
    args = ap.parse_args()
    if not (args.data / "ml-100k" / "u.data").exists():
        raise SystemExit(f"ML-100K not found under {args.data}; pass --data DIR (see its NOTICE.md)")

    with tempfile.TemporaryDirectory(prefix="mmfeat-cli-") as tmp:
        ws = f"{tmp}/ws"
        d = args.data
        cpu_seconds(
            [
                *MMFEAT,
                "--workspace",
                ws,
                "ingest",
                "movielens",
                str(d / "ml-100k"),
                "--items-csv",
                str(d / "items_tmdb.csv"),
                "--posters",
                str(d / "posters"),
            ]
        )
        variants = {
            "`mmfeat --help`": [*MMFEAT, "--help"],
            f'`mmfeat sql "{QUERY}"`': [*MMFEAT, "--workspace", ws, "sql", QUERY],
            "bare python: duckdb over lance.dataset": [sys.executable, "-c", BARE, ws, QUERY],
            "bare python: `pass` (interpreter start)": [sys.executable, "-c", "pass"],
        }
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        load = os.getloadavg()[0]
        for _ in range(args.repeat):
            for name, argv in variants.items():
                c, w, _ = cpu_seconds(argv)
                cpu[name].append(c)
                wall[name].append(w)
        count = cpu_seconds(variants["bare python: duckdb over lance.dataset"])[2].strip()

    med = {name: statistics.median(v) for name, v in cpu.items()}
    sql_name = f'`mmfeat sql "{QUERY}"`'
    ratio = med[sql_name] / med["bare python: duckdb over lance.dataset"]
    lines = ["| run | CPU s (median) | CPU s (min) | wall s (median) |", "|---|---:|---:|---:|"]
    for name in variants:
        lines.append(
            f"| {name} | {med[name]:.3f} | {min(cpu[name]):.3f} | {statistics.median(wall[name]):.3f} |"
        )
    help_ok = "met" if med["`mmfeat --help`"] < 0.5 else "NOT met"
    sql_ok = "met" if ratio <= 1.5 else "NOT met"
    summary = (
        f"`mmfeat --help`: {med['`mmfeat --help`']:.3f} s CPU (goal < 0.5 s: {help_ok}). `mmfeat sql`: "
        f"{ratio:.2f}x the bare DuckDB-over-Lance process (goal <= 1.5x: {sql_ok}); both count {count} items."
    )
    table = "\n".join(lines)
    print(table)
    print(summary)
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = f"`.venv/bin/python bench/cli_latency.py --repeat {args.repeat} --record`"
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write(
                f"\n## CLI start-up: `--help` and `sql` on ML-100K vs bare DuckDB over Lance ({when})\n\n"
                f"{cmd}; ML-100K ingested with `mmfeat ingest movielens` into a temp workspace; each variant a child "
                f"process, {args.repeat} runs in turns, CPU = user + system from getrusage(RUSAGE_CHILDREN); "
                f"{os.cpu_count()} CPUs, load average {load:.1f} at start.\n\n{table}\n\n{summary}\n"
            )


if __name__ == "__main__":
    main()
