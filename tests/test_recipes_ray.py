"""The partitioned recipes (recipes/distributed.py, `engine="ray"`) write exactly what the local engines write: the
same split rows, labels and order, the same manifest counts and the same user-item graph edges; in one process
(the algorithm), on a local Ray with 2 CPUs, and on a two-node local Ray cluster."""

from __future__ import annotations

import pytest

from recipes import distributed
from recipes.pipeline import build_split, build_ui_graph
from recipes.splits import SplitConfig
from stores import artifacts
from tests.conftest import JOIN_TWO_NODES, run_driver
from tests.test_outofcore import CONFIGS, _workspace, interactions
from tests.test_ray_multinode import two_node_cluster  # noqa: F401  (the fixture)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Zipf users and items (repeated pairs, a k-core that takes several rounds), day-resolution times (ties),
    appended in three writes so the table has several fragments."""
    table = interactions(4_000, 300, 120, seed=3)
    ws = _workspace(tmp_path_factory.mktemp("rayrec"), table.slice(0, 1_500))
    ws.db.open_table("interactions").add(table.slice(1_500, 1_500))
    ws.db.open_table("interactions").add(table.slice(3_000))
    return ws


def _memory(ws, tag: str, cfg: SplitConfig):
    info = build_split(ws, f"m_{tag}", cfg, engine="memory")
    return info, artifacts.load_split(ws, f"m_{tag}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.dedup}-{c.kcore_counts}")
def test_partitioned_split_equals_memory_in_one_process(ws, cfg):
    """The partition algorithm itself (ids, encode/shuffle, k-core rounds summed on the driver, per-partition
    labels) with 3 row ranges and 3 user partitions gives the in-memory split's rows, labels, order and counts
    for every scheme and dedup/k-core policy, and the in-memory train matrix from per-range blocks."""
    from recipes import streamed

    tag = f"{cfg.scheme}_{cfg.dedup}_{cfg.kcore_counts}_{cfg.seed}"
    mem, expected = _memory(ws, tag, cfg)
    reader, keys, counts = distributed.split_partitioned(
        ws, ws.version("interactions"), cfg, distributed.LocalTasks(), partitions=3
    )
    got = reader.read_all().select(expected.column_names).cast(expected.schema)
    assert counts == mem["counts"] and got.num_rows > 0
    assert got.equals(expected)
    assert keys["user"] == set(expected["user_id"].to_pylist())

    table = f"split_m_{tag}"
    ref, ref_nodes = streamed.train_matrix_stream(ws, table, None)
    mat, nodes = distributed.train_matrix_partitioned(ws, table, None, distributed.LocalTasks(), partitions=3)
    assert (mat != ref).nnz == 0 and mat.nnz == ref.nnz
    assert all((a == b).all() for a, b in zip(nodes, ref_nodes, strict=True))


RAY_CONFIGS = [
    SplitConfig(scheme="temporal", kcore=3, dedup="all", kcore_counts="partners", ratios=(0.7, 0.1, 0.2)),
    SplitConfig(scheme="loo", kcore=2, dedup="all"),
    SplitConfig(scheme="random", kcore=(3, 2), seed=1, dedup="all", kcore_counts="rows"),
]


def test_ray_engine_writes_the_local_split_and_graph(ray_local, ws):
    """On a local Ray (2 CPUs), build_split(engine="ray") stores the memory engine's split table (rows, labels,
    order) and counts for temporal, loo and random with k-core, and so does `mmfeat split --engine ray`;
    `mmfeat graph user-item --engine ray` stores the same edges, in the same order, as the local graph."""
    for cfg in RAY_CONFIGS:
        tag = f"ray_{cfg.scheme}"
        mem, expected = _memory(ws, tag, cfg)
        on_ray = build_split(ws, f"r_{tag}", cfg, engine="ray")
        assert on_ray["counts"] == mem["counts"]
        got = artifacts.load_split(ws, f"r_{tag}")
        assert got.num_rows > 0 and got.equals(expected)
    from click.testing import CliRunner

    from flows.cli import cli

    args = [
        "--workspace",
        ws.uri,
        "split",
        "--name",
        "cli_loo",
        "--scheme",
        "loo",
        "--kcore",
        "2",
        "--dedup",
        "all",
    ]
    result = CliRunner().invoke(cli, [*args, "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert artifacts.load_split(ws, "cli_loo").equals(artifacts.load_split(ws, "m_ray_loo"))
    local = build_ui_graph(ws, "m_ray_temporal", "sym", name="g_local", engine="memory")
    result = CliRunner().invoke(
        cli,
        [
            "--workspace",
            ws.uri,
            "graph",
            "user-item",
            "--split",
            "m_ray_temporal",
            "--name",
            "g_ray",
            "--engine",
            "ray",
        ],
    )
    assert result.exit_code == 0, result.output
    remote = artifacts.manifest(ws, "graph", "g_ray")
    assert (remote["nodes"], remote["edges"]) == (local["nodes"], local["edges"])
    a, _ = artifacts.load_graph(ws, "g_local")
    b, _ = artifacts.load_graph(ws, "g_ray")
    assert a.nnz > 0 and (a.indptr == b.indptr).all() and (a.indices == b.indices).all()
    assert (a.data == b.data).all()


DRIVER = (
    JOIN_TWO_NODES
    + """
from recipes.pipeline import build_split, build_ui_graph
from recipes.splits import SplitConfig
from stores import artifacts
from tests.test_outofcore import _workspace, interactions
ws = _workspace(sys.argv[1], interactions(3_000, 250, 100, seed=5))
cfg = SplitConfig(scheme="temporal", kcore=2, dedup="all")
mem = build_split(ws, "m", cfg, engine="memory")
out = build_split(ws, "r", cfg, engine="ray")
same = out["counts"] == mem["counts"] and artifacts.load_split(ws, "r").equals(artifacts.load_split(ws, "m"))
build_ui_graph(ws, "m", "none", name="gm", engine="memory")
build_ui_graph(ws, "m", "none", name="gr", engine="ray")
a, b = artifacts.load_graph(ws, "gm")[0], artifacts.load_graph(ws, "gr")[0]
edges = bool(a.nnz > 0 and (a != b).nnz == 0)
print("RESULT " + json.dumps({"split": bool(same), "graph": edges,
      "nodes": sum(n["Alive"] for n in ray.nodes())}), flush=True)
"""
)


@pytest.mark.slow
def test_ray_engine_on_a_two_node_cluster_equals_local(two_node_cluster, tmp_path):  # noqa: F811
    """A driver joining a real two-node Ray cluster through RAY_ADDRESS (tasks on both nodes, partitions passed
    between them through the object store) writes the memory engine's temporal k-core split and graph edges."""
    address, _ = two_node_cluster
    assert run_driver(address, DRIVER, str(tmp_path / "ws")) == {"split": True, "graph": True, "nodes": 2}


def test_config_names_the_recipes_engine():
    """`run.recipes_engine` accepts the four engines (default auto, so a refresh on Ray keeps its local splits)
    and rejects anything else naming the valid values."""
    from pydantic import ValidationError

    from recipes.config import RunSettings

    assert RunSettings().recipes_engine == "auto"
    assert RunSettings(recipes_engine="ray").recipes_engine == "ray"
    with pytest.raises(ValidationError, match="'auto', 'memory', 'stream' or 'ray'"):
        RunSettings(recipes_engine="spark")
