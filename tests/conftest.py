"""Shared test setup: offline model hubs, a fresh workspace per test, and the shared real dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml100k-posters"


@pytest.fixture
def ws(tmp_path):
    """An empty workspace in a temporary directory."""
    from stores.workspace import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def ml100k() -> Path:
    """The shared MovieLens-100K + posters folder; tests using it are skipped where it is absent."""
    if not (ML100K / "ml-100k" / "u.data").exists():
        pytest.skip(
            f"shared dataset not found at {ML100K} (realdata tests need ../shared/data/ml100k-posters)"
        )
    return ML100K


def ingest_ml100k(ws, root: Path):
    """Ingest ML-100K with its TMDB items CSV and posters, the way `mmfeat ingest movielens` does."""
    from recipes.ingest.load import ingest
    from recipes.ingest.sources import movielens

    return ingest(ws, movielens(root, root / "items_tmdb.csv", root / "posters"))


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The one temporary Prefect API of the session (SQLite under a temp PREFECT_HOME); yields its URL, which
    driver subprocesses get as PREFECT_API_URL. Started on first use, stopped at the end of the session."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# The start of a driver script run in a child process against a two-node local cluster ($RAY_ADDRESS): join it and
# wait until both nodes are alive. Scripts append their own imports and work.
JOIN_TWO_NODES = """
import json, sys, time
import numpy as np, ray
ray.init(include_dashboard=False, log_to_driver=False)
deadline = time.time() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.time() < deadline, "the second Ray node did not join within 90 s"
    time.sleep(0.5)
"""


def run_driver(address: str, script: str, *args: str) -> dict:
    """Run a JOIN_TWO_NODES driver script against the cluster at `address`; returns the JSON of its last
    "RESULT " line (the test fails with the driver's stderr when it printed none)."""
    import json
    import subprocess
    import sys
    import textwrap

    env = os.environ | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][7:])


def wide_interactions(root, users, width: int = 2_500, step: int = 100_000):
    """A workspace whose interactions are one row per entry of `users` (item "i{row % 503}", increasing
    timestamps), each with a `width`-character `source` drawn from 64 texts: large in memory, a few MB on disk
    (Lance compresses the repeats), for memory-cap tests of whole-table work."""
    from datetime import UTC, datetime

    import numpy as np
    import pyarrow as pa

    from stores.schema import INTERACTIONS
    from stores.workspace import Workspace

    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefghij"), width)) for _ in range(64)]
    ws = Workspace(str(root))
    start_us = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1e6)
    for start in range(0, len(users), step):
        idx = np.arange(start, min(len(users), start + step))
        part = pa.table(
            {
                "user_id": users[idx],
                "item_id": np.char.add("i", (idx % 503).astype(str)),
                "timestamp": pa.array(start_us + idx, INTERACTIONS.schema.field("timestamp").type),
                "event": ["buy"] * len(idx),
                "seq": pa.array(np.zeros(len(idx), dtype=np.int32)),
                "value": pa.array(np.ones(len(idx))),
                "source": [texts[i % 64] for i in idx],
            },
            schema=INTERACTIONS.schema,
        )
        if start == 0:
            ws.db.create_table("interactions", data=part, schema=INTERACTIONS.schema)
        else:
            ws.open("interactions").add(part)
    return ws


def run_capped(code: str, *args: str, timeout: float = 300) -> dict:
    """Run `code` in a child (`python -c code *args`) for a memory-cap test; returns the JSON of its last stdout
    line (the test fails with the child's stderr when it exits non-zero). glibc's per-thread malloc arenas (64 MB
    of address space each) are limited to two, so a child's virtual size does not depend on how many threads ran."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def ray_local():
    """The one local Ray of the session (2 CPUs); yields its address so that CLI subprocesses can join it. Tests
    whose flows or runners start Ray in this process ask for it too, so that Ray is shut down at the end."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """The one S3-compatible server of the session (moto on loopback); while it runs the AWS_* variables point
    Lance, pyarrow and boto3 at it. Each test creates its own bucket."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
