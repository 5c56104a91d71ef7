"""Orchestration overhead: the demo's refresh through Prefect and Ray next to the same refresh in one process.

Usage: .venv/bin/python bench/orchestration.py [--items 120] [--repeat 1] [--ray-cluster] [--record]

Every variant runs in its own child process, on a fresh workspace, over the same generated demo catalog, in this
one run: (1) the refresh's steps (recipes/refresh.py, what the flow's tasks call; "they run the same without
Prefect") in one process with the runner's local engine: no Prefect, no Ray; (2) the same steps with the Ray engine
and the refresh's model pool and warm-up, as `refresh_flow` runs them (no Prefect); (3) `refresh_flow` through
Prefect and Ray against a Prefect API that is already up, in its own process (a deployment's server is long-running
and runs apart from the flow run, so neither its start nor its import is counted, nor the one-time set-up of its
first requests: one trivial flow run goes through it first; its start is reported); (4) a
second `refresh_flow` with nothing changed; and, for reference, (5) hand-written library calls doing the same work in
one process without the refresh's step records (the baseline this bench used before 2026-11-30; stricter, since
the records that let a refresh skip unchanged steps are not orchestration but are absent there).
Each child's time runs from its first import (Prefect's client included) to its last write.
Overhead = (orchestrated - in-process) / orchestrated. Goal: under 15% of wall time on the demo, against (1).
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
cfg, ws = load_config(sys.argv[1]), Workspace(sys.argv[2])
calls = 0
ingest(ws, open_source(cfg, cfg.sources[0], ws.uri))
for r in cfg.forget:
    forget(ws, r)
for e in cfg.extract:
    calls += run_extraction(ws, e.feature, config_spec(e.kind, e.model, e.pretrained, e.prompt, e.max_new_tokens), source=e.source, fields=tuple(e.fields),
                            chunk_rows=e.chunk_rows, batch_size=e.batch_size, engine="local", progress=False).model_calls
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
                  "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""

STEPS = """
import time; t0 = time.perf_counter()
import json, sys
# model libraries: with the Ray engine only the model actors should import them, never the driver
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "sentence_transformers")
from contextlib import nullcontext
from extractors.model_pool import model_pool
from extractors.ray_start import settle
from recipes import refresh as steps
from recipes.config import graph_name, load_config
from stores.workspace import Workspace
# refresh_flow's body (flows/pipeline.py) with each task called directly: same steps, same order, no Prefect
cfg, ws = load_config(sys.argv[1]), Workspace(sys.argv[2])
before = ws.versions()
snapshot = steps.snapshot_name(ws, cfg)
out, ray_wait = {}, 0.0
with model_pool() if cfg.run.engine == "ray" else nullcontext() as pool:
    if pool is not None:
        pool.warm(steps.models_to_warm(ws, cfg), cfg.run.ray_address)
    out["ingest"] = [steps.ingest_source(ws, cfg, s.name) for s in cfg.sources]
    out["forget"] = steps.resume_forgets(ws) + [steps.serve_forget(ws, cfg, r.request_id) for r in cfg.forget]
    steps.cluster_interactions(ws)
    t_r = time.perf_counter(); settle(); ray_wait = time.perf_counter() - t_r  # Ray's start not hidden
    out["extract"] = [steps.extract_feature(ws, cfg, e.feature) for e in cfg.extract]
inter = ws.version("interactions")
out["recipes"] = [steps.build_split(ws, cfg, s.name, inter) for s in cfg.splits]
out["recipes"] += [steps.build_graph(ws, cfg, graph_name(g)) for g in cfg.graphs]
out["recipes"] += [steps.build_semantic_ids(ws, cfg, s.name) for s in cfg.semantic_ids]
out["recipes"] += [steps.export_split(ws, cfg, i) for i in range(len(cfg.exports))]
steps.publish_snapshot(ws, cfg, snapshot)
steps.write_report(ws, cfg)
totals = steps.totals(ws, before, out)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time(),
                  "model_calls": totals["model_calls"], "ray_wait": ray_wait,
                  "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""

SERVER = """
import sys
from prefect import flow, task
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

@task
def ping() -> int:
    return 1

@flow(name="server-warm-up")
def warm_up() -> int:
    return ping()

with prefect_test_harness(server_startup_timeout=180):
    # A long-running server has served flow runs before: the one-time set-up of its first requests (0.6 s on
    # 2 cores) belongs to its start, not to the timed refresh.
    warm_up()
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
        env=os.environ | env | {"PREFECT_LOGGING_LEVEL": "WARNING"},  # the warm-up run prints nothing
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
    runs: dict[str, list[dict]] = {"local": [], "ray": [], "flow": [], "lib": []}
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
            runs["local"].append(child(STEPS, str(local_cfg), str(root / f"local{i}"), env=env))
            runs["ray"].append(child(STEPS, str(ray_cfg), str(root / f"ray{i}"), env=ray_env))
            prefect_env = ray_env | {"PREFECT_HOME": str(root / f"prefect{i}")}
            with prefect_server(prefect_env) as (url, started):
                flow = child(
                    ORCHESTRATED,
                    str(ray_cfg),
                    str(root / f"flow{i}"),
                    env=prefect_env | {"PREFECT_API_URL": url},
                )
            runs["flow"].append(flow | {"server_start": started})
            runs["lib"].append(child(DIRECT, str(local_cfg), str(root / f"lib{i}"), env=env))
            print(f"repeat {i + 1}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s / {v[-1]['total_cpu']:.1f} CPU s"
                                                  for k, v in runs.items()), flush=True)  # fmt: skip
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    second = statistics.median(r["second_seconds"] for r in runs["flow"])
    server = statistics.median(r["server_start"] for r in runs["flow"])
    calls = {k: v[0]["model_calls"] for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu"] for r in v) for k, v in runs.items()}
    share = lambda a, b: 100 * (med[a] - med[b]) / med[a]  # noqa: E731
    rows = [
        ("the refresh's steps in one process, local engine (no Prefect, no Ray): the baseline", "local", "-"),
        ("the refresh's steps, Ray engine with the model pool and warm-up (no Prefect)", "ray",
         f"{share('ray', 'local'):.1f}% (Ray)"),
        ("`refresh_flow` through Prefect and Ray", "flow", f"**{share('flow', 'local'):.1f}%** (Prefect + Ray)"),
        ("library calls in one process, local engine, no step records (reference)", "lib",
         f"flow vs this: {share('flow', 'lib'):.1f}%"),
    ]  # fmt: skip
    lines = [
        "| run | wall s (median) | driver CPU s (median) | model calls | overhead |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {med[k]:.1f} | {cpu[k]:.1f} | {calls[k]} | {note} |" for label, k, note in rows),
        f"| `refresh_flow` again, nothing changed | {second:.1f} | | {runs['flow'][0]['second_model_calls']} | |",
    ]
    ray_wait = statistics.median(r["ray_wait"] for r in runs["ray"])
    summary = (
        f"Prefect + Ray: {share('flow', 'local'):.1f}% of the orchestrated wall time (flow vs the same steps in "
        f"one process; goal <= 15%). Prefect's share: {share('flow', 'ray'):.1f}% (flow vs the same steps on Ray). "
        f"Ray's start not hidden by ingest and forget (the Ray steps child waits this long for the background "
        f"start after them): {ray_wait:.1f} s. Prefect's temporary server took {server:.1f} s to start (not "
        f"counted: a deployment's server is long-running). Prefect's CPU in the flow's own process (import, "
        f"engine, log and event threads): {cpu['flow'] - cpu['ray']:.1f} s. The second refresh wrote "
        f"{runs['flow'][0]['second_rows_written']} rows."
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
                f"\n## Orchestration overhead: the demo's refresh through Prefect and Ray vs in one process ({stamp})\n\n"
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
