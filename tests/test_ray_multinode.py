"""A real two-node Ray cluster on this machine (`ray start` twice, 1 CPU each, private ports and temp dir): the
encode flow, run by a separate driver process with RAY_ADDRESS, keeps going when the second node is SIGKILLed
mid-run and ends with exactly one vector per item (Ray's actor restarts, else the flow's timeout and transient-only
retries with the runner's resume from committed chunks, whichever the failure needs). Bounded: about a minute."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import JOIN_TWO_NODES

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
N_ITEMS = 200
KILL_AT_ROWS = 32


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(
    log: Path, temp_dir: str, head_port: int | None = None, address: str | None = None
) -> subprocess.Popen:
    """`ray start --block` with 1 CPU and ports of its own, in a new session (so it can be killed as a tree)."""
    args = [
        str(RAY),
        "start",
        "--block",
        "--num-cpus",
        "1",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--object-store-memory",
        str(200 << 20),
        "--node-manager-port",
        str(_port()),
        "--object-manager-port",
        str(_port()),
        "--dashboard-agent-listen-port",
        str(_port()),
        "--dashboard-agent-grpc-port",
        str(_port()),
        "--metrics-export-port",
        str(_port()),
        "--runtime-env-agent-port",
        str(_port()),
    ]
    if head_port is not None:
        args += [
            "--head",
            "--port",
            str(head_port),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(_port()),
            "--temp-dir",
            temp_dir,
        ]
    else:
        args += ["--address", address]
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a `ray start` process and everything it started (raylet, GCS, workers): by process id only."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


# The flow runs in a child process: a clean Ray driver, whatever Ray sessions (and auth modes) this test process
# went through before. It waits for both nodes, then runs the ingest and encode flows against the test's Prefect API.
DRIVER = (
    JOIN_TWO_NODES
    + """
print("READY", flush=True)
from flows.pipeline import extract_flow, ingest_flow
ingest_flow(sys.argv[1], sys.argv[2])
result = extract_flow(sys.argv[1], sys.argv[2])
print("RESULT " + json.dumps(result[0], default=str), flush=True)
"""
)


@pytest.fixture
def two_node_cluster(request):
    """A head and a second node, 1 CPU each; yields (address, second node process); both torn down after."""
    if not RAY.exists():
        pytest.skip(f"no `ray` command beside {sys.executable}")
    # Short private temp dir: Ray's socket paths must stay under ~100 characters, and the head's address file
    # lands here, so no other `ray.init()` on the machine finds this cluster.
    tmp = tempfile.mkdtemp(prefix="mmfr", dir="/tmp")
    failed_before = request.session.testsfailed
    port = _port()
    address = f"127.0.0.1:{port}"
    head = _start_node(Path(tmp) / "head.log", f"{tmp}/ray", head_port=port)
    node = None
    try:
        deadline = time.time() + 60
        while True:
            assert head.poll() is None, (Path(tmp) / "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the Ray head did not open its port within 60 s"
                time.sleep(0.5)
        node = _start_node(Path(tmp) / "node.log", f"{tmp}/ray", address=address)
        yield address, node
    finally:
        if node is not None:
            _kill_tree(node)
        _kill_tree(head)
        if request.session.testsfailed > failed_before:
            print(f"Ray logs of the failed run kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _rows(ws) -> int:
    """Rows of feat_clip_image so far (0 while the driver is still creating the table)."""
    try:
        return ws.count("feat_clip_image")
    except (KeyError, ValueError, OSError):
        return 0


def test_encode_flow_survives_losing_a_node(two_node_cluster, prefect_api, tmp_path):
    """Kill the second node (SIGKILL of its raylet and workers) once the first chunks are committed: the encode
    flow still completes, and feat_clip_image holds exactly one vector per item with an image."""
    from recipes.ingest.demo_data import generate_catalog
    from stores.workspace import Workspace

    address, node = two_node_cluster
    cat = generate_catalog(tmp_path / "src", n_items=N_ITEMS, n_users=20, seed=3)
    cfg = {
        "name": "multinode",
        "sources": [
            {
                "kind": "table",
                "name": "src",
                "items": str(cat.items),
                "users": str(cat.users),
                "interactions": str(cat.interactions),
                "images": str(cat.images),
            }
        ],
        # two actors: one lands on each node, so the kill takes work in flight with it
        "extract": [
            {
                "feature": "clip_image",
                "kind": "clip_image",
                "model": "test:tiny-clip",
                "batch_size": 8,
                "chunk_rows": 16,
                "concurrency": 2,
            }
        ],
        "run": {"engine": "ray", "step_timeout_s": 45, "retries": 2, "retry_delay_s": 5},
    }
    path = tmp_path / "multinode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ws = Workspace(tmp_path / "ws")
    env = os.environ | {
        "RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    log = tmp_path / "driver.log"
    started = time.time()
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(path), ws.uri], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    killed: dict[str, int] = {}
    try:
        while driver.poll() is None and time.time() - started < 170:
            rows = _rows(ws) if not killed else 0
            if not killed and rows >= KILL_AT_ROWS:
                _kill_tree(node)
                killed["rows"] = rows
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert driver.returncode == 0, text[-4000:]
    assert "rows" in killed, "the second node was never killed: the run ended before its first chunks"
    assert killed["rows"] < N_ITEMS, f"the kill came after the run wrote all {N_ITEMS} rows"
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    ids = ws.read("feat_clip_image", columns=["item_id"])["item_id"].to_pylist()
    expected = set(ws.read("item_images", columns=["item_id"])["item_id"].to_pylist())
    assert len(ids) == len(set(ids)) == len(expected) == N_ITEMS
    assert set(ids) == expected
    assert ws.count("extract_failures") == 0 and result["failed"] == 0
    retries = text.count("Retry ")
    print(
        f"killed the second node at {killed['rows']} rows; flow finished in {time.time() - started:.1f} s "
        f"with {retries} retried tries"
    )
