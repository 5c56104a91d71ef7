"""Torch threads of a CPU model actor: MiniLM (packaged) encoding 256 texts with 1 and 2 threads, on an idle
machine and beside one busy process, with OpenMP's default waiting (spinning) and with OMP_WAIT_POLICY=PASSIVE.
This is what extractors/model_pool.py `slot_threads` and `ModelActor` rest on: on 2 CPUs the one actor gets both
cores, and its OpenMP threads sleep while they wait.

Usage: .venv/bin/python bench/threads.py [--repeat 1]

Each case runs in a fresh process (OpenMP reads its policy when torch loads); the busy process is a Python loop
started before and killed after it. Times are the encode loop's only (model loaded and warmed first), reported as
seconds and as a ratio to 1 thread in the same load case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ENCODE = """
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from extractors.registry import text_spec
model = text_spec(None).build()
texts = [f"item {i}. a fairly long description of a movie poster with several words about the plot number {i}" * 2
         for i in range(256)]
batch = lambda k: {"item_id": np.array([str(i) for i in range(64)], dtype=object),
                   "text": np.array(texts[k * 64:(k + 1) * 64], dtype=object),
                   "title": np.array(["t"] * 64, dtype=object)}
model(batch(0))  # warm
t = time.perf_counter()
for k in range(4):
    model(batch(k))
print(json.dumps({"seconds": time.perf_counter() - t, "threads": torch.get_num_threads()}))
"""


def encode(threads: int, policy: str | None, busy: bool) -> float:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if burner:
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", ENCODE, str(threads)], cwd=REPO, env=env, capture_output=True,
                             text=True, check=True, timeout=600)  # fmt: skip
    finally:
        if burner:
            burner.kill()
            burner.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("| load | OpenMP waiting | 1 thread s | 2 threads s | 2 / 1 |")
    print("|---|---|---:|---:|---:|")
    for busy in (False, True):
        for policy in (None, "PASSIVE"):
            one = statistics.median(encode(1, policy, busy) for _ in range(args.repeat))
            two = statistics.median(encode(2, policy, busy) for _ in range(args.repeat))
            label = "beside one busy process" if busy else "idle"
            print(
                f"| {label} | {policy or 'default (spin)'} | {one:.2f} | {two:.2f} | {two / one:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
