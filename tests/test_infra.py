"""The deployment files agree with each other and with the code: one worker image name (CPU and GPU tags) built
by the Dockerfile and run everywhere, one Ray version, the same Ray (6379 GCS, 8265 dashboard, 10001 client) and
Prefect (4200) ports, deployments whose entrypoints are real flows of flows/pipeline.py with valid parameters,
and schedules that match the configs'."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
GCS, DASHBOARD, CLIENT, PREFECT = 6379, 8265, 10001, 4200


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


IMAGE = f"mmfeat/worker:{_version()}"
GPU_IMAGE = f"{IMAGE}-gpu"


@pytest.fixture(scope="module")
def files() -> dict:
    return {
        "dockerfile": (INFRA / "docker" / "Dockerfile").read_text(),
        "cluster": yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text()),
        "raycluster": yaml.safe_load((INFRA / "k8s" / "raycluster.yaml").read_text()),
        "compose": yaml.safe_load((INFRA / "prefect" / "docker-compose.yaml").read_text()),
        "prefect": yaml.safe_load((ROOT / "prefect.yaml").read_text()),
    }


def _flag(command: str | list, name: str) -> str | None:
    text = command if isinstance(command, str) else " ".join(command)
    m = re.search(rf"--{name}[= ](\S+)", text)
    return m.group(1).strip("\"'") if m else None


def _dockerfile(text: str) -> dict:
    body = [line for line in text.splitlines() if not line.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(body), re.M))
    return {
        "base": args["BASE_IMAGE"],
        "workdir": re.search(r"^WORKDIR (\S+)", "\n".join(body), re.M).group(1),
        "expose": {int(p) for line in body if line.startswith("EXPOSE") for p in line.split()[1:]},
        "tags": re.findall(r"-t (\S+)", text),
        "ray_pin": re.search(r"ray\[[a-z,]+\]==([\d.]+)", text).group(1),
    }


def test_every_infra_file_parses(files):
    """Each file is valid YAML of the expected kind (and the Dockerfile has a base, a workdir and ports)."""
    assert files["cluster"]["cluster_name"] and files["cluster"]["available_node_types"]
    assert files["raycluster"]["kind"] == "RayCluster" and files["raycluster"]["apiVersion"].startswith(
        "ray.io/"
    )
    assert {"postgres", "prefect-server", "prefect-worker", "ray-head", "ray-worker"} <= set(
        files["compose"]["services"]
    )
    assert files["prefect"]["deployments"]
    d = _dockerfile(files["dockerfile"])
    assert d["base"] and d["workdir"] and d["expose"]


def test_one_image_name_and_one_ray_version(files):
    """The Dockerfile builds mmfeat/worker:<version> (+ -gpu); every cluster, pod and service runs one of those
    two tags, GPU nodes the -gpu one; the Ray version of the base image, the pip pin, KubeRay's rayVersion and
    the Ray this project runs are the same."""
    import ray

    d = _dockerfile(files["dockerfile"])
    assert set(d["tags"]) == {IMAGE, GPU_IMAGE}
    base_ray = re.match(r"rayproject/ray:([\d.]+)-", d["base"]).group(1)
    assert base_ray == d["ray_pin"] == files["raycluster"]["spec"]["rayVersion"] == ray.__version__

    cluster = files["cluster"]
    assert cluster["docker"]["image"] == IMAGE
    for name, node in cluster["available_node_types"].items():
        image = node.get("docker", {}).get("worker_image", cluster["docker"]["image"])
        assert image == (GPU_IMAGE if "gpu" in name else IMAGE), name

    spec = files["raycluster"]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == IMAGE
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        assert container["image"] == (GPU_IMAGE if gpus else IMAGE), group["groupName"]

    for name, service in files["compose"]["services"].items():
        if name != "postgres":
            assert service["image"] == IMAGE, name


def test_gpu_worker_types_exist(files):
    """Both cluster definitions have a GPU worker type that asks for GPUs; the launcher also has CPU workers."""
    types = files["cluster"]["available_node_types"]
    assert any(
        "gpu" in n and "--gpus all" in " ".join(t["docker"].get("worker_run_options", []))
        for n, t in types.items()
    )
    assert any("cpu" in n for n in types)
    groups = {g["groupName"]: g for g in files["raycluster"]["spec"]["workerGroupSpecs"]}
    gpu = [
        g
        for g in groups.values()
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu and all(g["rayStartParams"].get("num-gpus") == "1" for g in gpu)


def test_ports_agree(files):
    """Ray's GCS, dashboard and client ports and Prefect's API port are the same in every file that names them,
    and every address points at them."""
    assert {GCS, DASHBOARD, CLIENT, PREFECT} <= _dockerfile(files["dockerfile"])["expose"]

    head_cmd = " ".join(files["cluster"]["head_start_ray_commands"])
    assert (
        _flag(head_cmd, "port"),
        _flag(head_cmd, "dashboard-port"),
        _flag(head_cmd, "ray-client-server-port"),
    ) == (str(GCS), str(DASHBOARD), str(CLIENT))
    assert _flag(" ".join(files["cluster"]["worker_start_ray_commands"]), "address") == f"$RAY_HEAD_IP:{GCS}"

    ports = {
        p["name"]: p["containerPort"]
        for p in files["raycluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports == {"gcs-server": GCS, "dashboard": DASHBOARD, "client": CLIENT}

    services = files["compose"]["services"]
    head = services["ray-head"]
    assert (
        _flag(head["command"], "port"),
        _flag(head["command"], "dashboard-port"),
        _flag(head["command"], "ray-client-server-port"),
    ) == (str(GCS), str(DASHBOARD), str(CLIENT))
    assert sorted(int(p.split(":")[1]) for p in head["ports"]) == sorted([GCS, DASHBOARD, CLIENT])
    for name in ("ray-worker", "prefect-worker"):
        assert _flag(services[name]["command"], "address") == f"ray-head:{GCS}", name
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["RAY_ADDRESS"] == f"ray-head:{GCS}"
    assert worker_env["PREFECT_API_URL"] == f"http://prefect-server:{PREFECT}/api"
    server = services["prefect-server"]
    assert _flag(server["command"], "port") == str(PREFECT) and server["ports"] == [f"{PREFECT}:{PREFECT}"]
    pg = services["postgres"]["environment"]
    url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert (
        url
        == f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    for d in files["prefect"]["deployments"]:
        assert d["work_pool"]["job_variables"]["env"]["RAY_ADDRESS"] == f"ray-head:{GCS}"


def test_deployments_run_real_flows(files):
    """Every deployment's entrypoint is a Prefect flow in flows/pipeline.py, its parameters are that flow's, its
    config is a shipped one, its pool is the one the compose worker polls, and the image's workdir is where the
    pull step and the worker look for the code."""
    from prefect import Flow

    import flows.pipeline as pipeline
    from recipes.config import load_config

    compose_worker = files["compose"]["services"]["prefect-worker"]
    pool = _flag(compose_worker["command"], "pool")
    workdir = _dockerfile(files["dockerfile"])["workdir"]
    assert compose_worker["working_dir"] == workdir
    pull = files["prefect"]["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert pull == workdir
    for d in files["prefect"]["deployments"]:
        path, _, name = d["entrypoint"].partition(":")
        assert (ROOT / path).is_file() and path == "flows/pipeline.py", d["name"]
        fn = getattr(pipeline, name, None)
        assert isinstance(fn, Flow), f"{d['entrypoint']} is not a flow"
        assert set(d["parameters"]) <= set(inspect.signature(fn.fn).parameters), d["name"]
        load_config(d["parameters"]["config"])
        assert d["work_pool"]["name"] == pool, d["name"]
        assert d["concurrency_limit"] == 1, d["name"]  # one writer per workspace at a time


def test_schedules_match_the_configs(files):
    """prefect.yaml repeats each config's cron schedules under the names `mmfeat serve` gives them, running the
    flow the schedule names; no deployment carries a schedule no config declares."""
    import flows.pipeline as pipeline
    from recipes.config import load_config, shipped_configs

    declared = {}
    for path in shipped_configs():
        cfg = load_config(path)
        for s in cfg.schedules:
            declared[f"{cfg.name}-{s.name or s.flow}"] = (
                cfg.name,
                s.cron,
                s.timezone,
                pipeline.FLOWS[s.flow].fn.__name__,
            )
    deployed = {}
    for d in files["prefect"]["deployments"]:
        for s in d.get("schedules", []):
            deployed[d["name"]] = (
                d["parameters"]["config"],
                s["cron"],
                s["timezone"],
                d["entrypoint"].split(":")[1],
            )
    assert deployed == declared
