"""URL image download throughput through the product's ingest path, at ML-100K scale.

Usage: .venv/bin/python bench/url_images.py [--concurrency 1 16] [--record]

The 1,682 ML-100K items get an `image_url` pointing at their real poster (../shared/data/ml100k-posters/posters,
test data only: see its NOTICE.md), served by `http.server` (backlog 256) on loopback in a child process (so the server
does not share this process's GIL). Each run ingests the items table into a fresh workspace with
`recipes.ingest.load.ingest` and a `FetchPolicy` allowing 127.0.0.1 only: download, safe decode, batched commits,
quarantine of the 19 posters that do not exist (404 -> http_status). A second ingest of the same source measures the
incremental path (stored URLs are not fetched; only the 19 quarantined ones are asked again). images/s and MB/s count the images stored and their bytes over the ingest's wall time.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "ml100k-posters"

from extractors.fetch import FetchPolicy, parse_allow  # noqa: E402
from recipes.ingest.load import ingest  # noqa: E402
from recipes.ingest.sources import table  # noqa: E402
from stores.workspace import Workspace  # noqa: E402

# http.server's own ThreadingHTTPServer listens with a backlog of 5: 16 concurrent connects then overflow it and
# wait for a SYN retry (1 s), which would measure the kernel, not the downloader.
SERVER = """
import functools, http.server, sys
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
Server(("127.0.0.1", int(sys.argv[1])), functools.partial(Quiet, directory=sys.argv[2])).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(directory: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/", timeout=1).close()
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the loopback http.server did not start")


def _items_csv(path: Path, base: str) -> int:
    ids = [
        line.split("|", 1)[0]
        for line in (DATA / "ml-100k" / "u.item").read_bytes().decode("latin-1").splitlines()
        if line.strip()
    ]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "image_url"])
        w.writerows([i, f"{base}/{i}.jpg"] for i in ids)
    return len(ids)


def run(concurrency: int, base: str, tmp: Path) -> dict:
    items = tmp / f"items-{concurrency}.csv"
    n = _items_csv(items, base)
    ws = Workspace(tmp / f"ws-{concurrency}")
    policy = FetchPolicy(allow=parse_allow(["127.0.0.1"]), concurrency=concurrency)
    t = time.perf_counter()
    report = ingest(ws, table(items, name="bench"), policy)
    wall = time.perf_counter() - t
    tally = report.files["image_url"]
    assert report.balanced
    size = sum(len(b) for b in ws.read("item_images", columns=["image"])["image"].to_pylist())
    t = time.perf_counter()
    ingest(ws, table(items, name="bench"), policy)
    again = time.perf_counter() - t
    return {
        "concurrency": concurrency,
        "items": n,
        "stored": tally.stored,
        "quarantined": dict(tally.reasons),
        "wall": wall,
        "mb": size / 1e6,
        "again": again,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--record", action="store_true", help="Append the table to BENCHMARKS.md.")
    args = ap.parse_args()
    if not (DATA / "posters").is_dir():
        raise SystemExit(f"{DATA}/posters not found: this benchmark needs the shared ML-100K posters")
    proc, base = _serve(DATA / "posters")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(c, base, Path(tmp)) for c in args.concurrency]
    finally:
        proc.terminate()
        proc.wait()
    header = "| concurrency | images stored | quarantined | wall s | images/s | MB/s | re-ingest s |"
    lines = [header, "|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        q = ", ".join(f"{k}={v}" for k, v in sorted(r["quarantined"].items())) or "-"
        lines.append(
            f"| {r['concurrency']} | {r['stored']} / {r['items']} | {q} | {r['wall']:.2f} | "
            f"{r['stored'] / r['wall']:.0f} | {r['mb'] / r['wall']:.2f} | {r['again']:.2f} |"
        )
    table_md = "\n".join(lines)
    print(table_md)
    if args.record:
        load = os.getloadavg()[0]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = "`.venv/bin/python bench/url_images.py " + " ".join(
            ["--concurrency", *map(str, args.concurrency), "--record"]
        )
        text = (
            f"\n## URL images: ML-100K posters from a loopback server through `ingest` ({stamp})\n\n"
            f"{command}`; 1,682 items whose `image_url` names their poster on `http.server` (backlog 256, a child "
            f"process on 127.0.0.1, allowed with an allow-list of that address only); each run a fresh workspace: "
            f"download, safe decode, batched commits, quarantine; MB = stored image bytes; re-ingest = the same source "
            f"again (stored URLs not fetched, the 19 quarantined ones asked again); {os.cpu_count()} CPUs, "
            f"load average {load:.1f} at the end.\n\n{table_md}\n"
        )
        with open(REPO / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
