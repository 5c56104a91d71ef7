"""Orchestration overhead: the demo's refresh through Prefect and Ray next to the same library calls made directly.

Usage: .venv/bin/python bench/orchestration.py [--items 120] [--repeat 1] [--ray-cluster] [--record]

Every variant runs in its own child process, on a fresh workspace, over the same generated demo catalog, in this
one run: (1) the library calls in one process with the runner's local engine (no Prefect, no Ray); (2) the same
calls with the Ray engine (no Prefect); (3) `refresh_flow` through Prefect and Ray against a Prefect API that is
already up, in its own process (a deployment's server is long-running and runs apart from the flow run, so neither
its start nor its import is counted; its start is reported); and (4) a second `refresh_flow` with nothing changed.
Each child's time runs from its first import (Prefect's client included) to its last write.
Overhead = (orchestrated - direct) / orchestrated. Goal: under 15% of wall time on the demo.
With --ray-cluster the Ray variants join a Ray head started once before the runs (`ray start --head`, as a
deployment's cluster is long-running, like the Prefect server): its start is reported, not counted; each child
still starts its own model actors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

DIRECT = """
import time; t0 = time.perf_counter()
import json, sys
# model libraries: with the Ray engine only the model actors should import them, never the driver
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "sentence_transformers")
from recipes.config import load_config, open_source
from recipes.ingest.load import ingest
from recipes import pipeline as rp
from recipes.report.data import load_report_data
from recipes.report.render import ReportConfig, render_report
from extractors.runner import run_extraction
from extractors.registry import config_spec
from recipes.unlearning.forget import forget
from stores.snapshots import create_snapshot
from stores.workspace import Workspace
from recipes.config import graph_name, KnnGraph, UserItemGraph, CooccurGraph, output_path
cfg, ws, engine = load_config(sys.argv[1]), Workspace(sys.argv[2]), sys.argv[3]
ingest(ws, open_source(cfg, cfg.sources[0], ws.uri))
for r in cfg.forget:
    forget(ws, r)
calls, ray_init = 0, 0.0
if engine == "ray":  # timed apart: Ray's own start, a fixed cost whatever the refresh's size
    from extractors.runner import _init_ray
    t_r = time.perf_counter(); _init_ray(); ray_init = time.perf_counter() - t_r
from contextlib import nullcontext
from extractors.model_pool import model_pool
with model_pool() if engine == "ray" else nullcontext():
    for e in cfg.extract:
        calls += run_extraction(ws, e.feature, config_spec(e.kind, e.model, e.pretrained, e.prompt, e.max_new_tokens), source=e.source, fields=tuple(e.fields),
                                chunk_rows=e.chunk_rows, batch_size=e.batch_size, engine=engine, progress=False).model_calls
for s in cfg.splits:
    rp.build_split(ws, s.name, s.to_split_config())
for g in cfg.graphs:
    if isinstance(g, UserItemGraph):
        rp.build_ui_graph(ws, g.split, g.norm, graph_name(g))
    elif isinstance(g, KnnGraph):
        rp.build_knn_graph(ws, g.split, g.features, g.k, g.norm, g.weights, g.symmetric, g.self_loops, graph_name(g))
    elif isinstance(g, CooccurGraph):
        rp.build_cooccur_graph(ws, g.split, g.kind, g.k, g.weight, graph_name(g))
for x in cfg.exports:
    rp.export(ws, x.split, x.format, output_path(x.out, ws.uri, format=x.format, split=x.split), dict(x.features),
              x.name, x.user_graph_k)
create_snapshot(ws, "bench", cfg.snapshot.split, cfg.snapshot_features(), cfg.snapshot_graphs())
out = output_path(cfg.report.out, ws.uri)
out.write_text(render_report(load_report_data(ws, ReportConfig(), split=cfg.snapshot.split), ReportConfig()))
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time(), "model_calls": calls,
                  "ray_init": ray_init, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""

SERVER = """
import sys
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
with prefect_test_harness(server_startup_timeout=180):
    print(PREFECT_API_URL.value(), flush=True)
    sys.stdin.read()  # serves until the bench closes stdin
"""

ORCHESTRATED = """
import time; t0 = time.perf_counter()
import json, sys
# model libraries: with the Ray engine only the model actors should import them, never the driver
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "sentence_transformers")
from flows.pipeline import refresh_flow
first = refresh_flow(sys.argv[1], sys.argv[2])
t1, cpu = time.perf_counter(), time.process_time()
second = refresh_flow(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "cpu": cpu, "model_calls": first["model_calls"], "second_seconds": t2 - t1,
                  "second_model_calls": second["model_calls"], "second_rows_written": second["rows_written"],
                  "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


@contextmanager
def prefect_server(env: dict) -> Iterator[tuple[str, float]]:
    """A temporary Prefect API in its own process (as a deployment's server is): yields its URL and start time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | env,
    )
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(
                f"the Prefect server did not start (exit {proc.poll()}); run {SERVER!r} to see why"
            )
        yield url, time.perf_counter() - t0
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)


@contextmanager
def ray_head(env: dict, cpus: int) -> Iterator[tuple[str, float]]:
    """A local Ray head in its own processes (`ray start --head`): yields its address and start time."""
    ray = str(Path(sys.executable).parent / "ray")
    t0 = time.perf_counter()
    subprocess.run(
        [ray, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"],
        check=True,
        capture_output=True,
        env=os.environ | env,
    )
    try:
        yield "auto", time.perf_counter() - t0
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=os.environ | env)


def child(code: str, *args: str, env: dict | None = None) -> dict:
    """Run a variant; adds "total_cpu": CPU seconds of the child and every process it waited for (Ray's
    raylet, workers and actors included), which a loaded machine does not inflate as it does wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | (env or {}),
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-4000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"total_cpu": total}


def demo_config(root: Path, n_items: int, engine: str) -> Path:
    """The shipped demo config with its source, exports and report under `root` (the source is shared)."""
    data = yaml.safe_load((REPO / "recipes" / "configs" / "demo.yaml").read_text())
    data["sources"][0].update(n_items=n_items, dir=str(root / "source"))
    data["run"]["engine"] = engine
    data["exports"][0]["out"] = "{workspace}-exports/{format}"
    path = root / f"demo-{engine}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    ap.add_argument(
        "--ray-cluster",
        action="store_true",
        help="Ray variants join a head started once (start not counted).",
    )
    args = ap.parse_args()
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
    runs: dict[str, list[dict]] = {"local": [], "ray": [], "flow": []}
    load = os.getloadavg()[0]
    ray_start = None
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        local_cfg, ray_cfg = demo_config(root, args.items, "local"), demo_config(root, args.items, "ray")
        ray_env = dict(env)
        if args.ray_cluster:
            address, ray_start = stack.enter_context(ray_head(env, os.cpu_count() or 1))
            ray_env["RAY_ADDRESS"] = address
        for i in range(args.repeat):
            runs["local"].append(child(DIRECT, str(local_cfg), str(root / f"local{i}"), "local", env=env))
            runs["ray"].append(child(DIRECT, str(ray_cfg), str(root / f"ray{i}"), "ray", env=ray_env))
            prefect_env = ray_env | {"PREFECT_HOME": str(root / f"prefect{i}")}
            with prefect_server(prefect_env) as (url, started):
                flow = child(
                    ORCHESTRATED,
                    str(ray_cfg),
                    str(root / f"flow{i}"),
                    env=prefect_env | {"PREFECT_API_URL": url},
                )
            runs["flow"].append(flow | {"server_start": started})
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s / {v[-1]['total_cpu']:.1f} CPU s"
                                                  for k, v in runs.items()), flush=True)  # fmt: skip
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    second = statistics.median(r["second_seconds"] for r in runs["flow"])
    server = statistics.median(r["server_start"] for r in runs["flow"])
    calls = {k: v[0]["model_calls"] for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in runs.items()}
    lines = [
        "| run | wall s (median) | driver CPU s (median) | model calls |",
        "|---|---:|---:|---:|",
        f"| direct library calls, local engine (no Prefect, no Ray) | {med['local']:.1f} | {cpu['local']:.1f} "
        f"| {calls['local']} |",
        f"| direct library calls, Ray engine (no Prefect) | {med['ray']:.1f} | {cpu['ray']:.1f} | {calls['ray']} |",
        f"| `refresh_flow` through Prefect and Ray | {med['flow']:.1f} | {cpu['flow']:.1f} | {calls['flow']} |",
        f"| `refresh_flow` again, nothing changed | {second:.1f} | | {runs['flow'][0]['second_model_calls']} |",
    ]
    prefect_share = (med["flow"] - med["ray"]) / med["flow"]
    total_share = (med["flow"] - med["local"]) / med["flow"]
    ray_init = statistics.median(r["ray_init"] for r in runs["ray"])
    total = {k: statistics.median(r["total_cpu"] for r in v) for k, v in runs.items()}
    lines += [
        "",
        "| all processes' CPU s (median; Ray's workers included) | local | Ray | flow | Prefect + Ray |",
        "|---|---:|---:|---:|---:|",
        f"| | {total['local']:.1f} | {total['ray']:.1f} | {total['flow']:.1f} "
        f"| {100 * (total['flow'] - total['local']) / total['flow']:.1f}% |",
    ]
    summary = (
        f"Ray's start (ray.init in the direct Ray child, inside its wall time): {ray_init:.1f} s. "
        f"Prefect's share of the orchestrated wall time: {100 * prefect_share:.1f}% (flow vs the same calls on Ray); "
        f"Prefect + Ray together: {100 * total_share:.1f}% (flow vs the same calls in one process). Goal: < 15%. "
        f"Prefect's temporary server took {server:.1f} s to start (not counted: a deployment's server is "
        f"long-running). Prefect's CPU in the flow's own process (import, engine, log and event threads; "
        f"robust to a loaded machine): {cpu['flow'] - cpu['ray']:.1f} s. The second refresh wrote {runs['flow'][0]['second_rows_written']} rows."
    )
    heavy = {k: v[0].get("heavy", []) for k, v in runs.items()}
    summary += f" Model libraries imported by each variant's driver process: {heavy}."
    if ray_start is not None:
        summary += (
            f" The Ray variants joined a Ray head started once before the runs ({ray_start:.1f} s, not counted: "
            "a deployment's cluster is long-running); each child still started its own model actors."
        )
    print("\n".join(lines))
    print(summary)
    if args.record:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "BENCHMARKS.md", "a") as fh:
            fh.write(
                f"\n## Orchestration overhead: the demo's refresh through Prefect and Ray vs direct calls ({stamp})\n\n"
                f"`.venv/bin/python bench/orchestration.py --items {args.items} --repeat {args.repeat}"
                f"{' --ray-cluster' if args.ray_cluster else ''} --record`; "
                f"demo config ({args.items} items: tiny captioner, tiny CLIP, packaged MiniLM x2, split, 3 graphs, "
                f"MMRec export, snapshot, forget request, report); 2 CPUs, load average {load:.1f} at start; each "
                "variant in its own process on a fresh workspace, same run.\n\n"
                + "\n".join(lines)
                + f"\n\n{summary}\n"
            )


if __name__ == "__main__":
    main()
