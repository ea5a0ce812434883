"""`flashmemory serve` end to end: a real `vllm serve` on loopback (slow, ~4 min).

One server for the module (tiny DeepSeek-V4, plugin + LSAConnector, a seeded
untrained Memory Indexer on CSA layers 0-3, lsa.tau=8, lsa.max_selected_chunks=4,
decision trace on). Scenarios:
- an OpenAI completion with 8K+ tokens of context over HTTP: while it decodes,
  /metrics shows vllm:flashmemory_resident_chunk_ratio < 1, and
  vllm:flashmemory_fetched_chunks_total / _stored_chunks_total > 0;
- the Memory Indexer ran inside the engine (every refresh had scores);
- the chunks the connector keeps resident equal what a fresh core
  ResidencyPlanner computes from the same scores (scheduler trace replayed), and
  the worker's residency map leaves exactly those stored chunks attendable.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lsa_helpers import REPO, ensure_tiny_model, long_prompt_text, write_random_indexer
from vllm_flashmemory.connectors.trace import TRACE_DIR_ENV

from vllm_flashmemory.core.config import LSAConfig
from vllm_flashmemory.core.residency_planner import ResidencyPlanner

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 600
PROMPT_TOKENS = 8400
MAX_TOKENS = 64
LSA_OVERRIDES = ("tau=8", "max_selected_chunks=4")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    work: Path
    trace: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _metric(text: str, name: str) -> list[float]:
    pattern = re.compile(
        rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+|NaN)$", re.MULTILINE
    )
    return [float(v) for v in pattern.findall(text)]


@pytest.fixture(scope="module")
def lsa_server(tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("lsa_serve")
    model = ensure_tiny_model()
    indexer = write_random_indexer(work / "indexer")
    trace, log = work / "trace", work / "server.log"
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm_flashmemory.cli",
        "serve",
        "--port",
        str(port),
        "--model",
        str(model),
        "--indexer",
        str(indexer),
        *[a for o in LSA_OVERRIDES for a in ("--lsa", o)],
        "--max-model-len",
        "12288",
        "--max-num-seqs",
        "2",
    ]
    env = {**os.environ, TRACE_DIR_ENV: str(trace)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"server exited rc={proc.returncode}:\n{log.read_text()[-4000:]}"
            )
        try:
            _get(url + "/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.terminate()
                pytest.fail(
                    f"server not healthy in {STARTUP_TIMEOUT_S} s:\n"
                    f"{log.read_text()[-4000:]}"
                )
            time.sleep(2)
    print(f"server healthy after {time.monotonic() - t0:.1f} s")
    yield Server(url, proc, work, trace, log)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def long_completion(lsa_server: Server) -> dict:
    """One 8K+-token completion; /metrics polled while it runs."""
    seen = {
        "ratio": [],
        "resident": [],
        "cold": [],
        "fetched": [],
        "stored": [],
        "evicted": [],
    }
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                text = _get(lsa_server.url + "/metrics")
            except OSError:
                continue
            # Gauges read 0 before the first level arrives: take the ratio only
            # once a request holds chunks.
            resident = _metric(text, "vllm:flashmemory_resident_chunks")
            if resident and max(resident) > 0:
                seen["ratio"] += _metric(text, "vllm:flashmemory_resident_chunk_ratio")
                seen["resident"] += resident
                seen["cold"] += _metric(text, "vllm:flashmemory_cold_chunks")
            seen["fetched"] += _metric(text, "vllm:flashmemory_fetched_chunks_total")
            seen["stored"] += _metric(text, "vllm:flashmemory_stored_chunks_total")
            seen["evicted"] += _metric(text, "vllm:flashmemory_evicted_chunks_total")
            done.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.monotonic()
    body = {
        "model": str(ensure_tiny_model()),
        "prompt": long_prompt_text(PROMPT_TOKENS),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    try:
        out = _post(lsa_server.url + "/v1/completions", body, REQUEST_TIMEOUT_S)
    finally:
        time.sleep(1.0)  # one more scrape after the last step
        done.set()
        poller.join(timeout=10)
    seen["seconds"] = time.monotonic() - t0
    seen["response"] = out
    print(
        {
            k: (min(v) if k == "ratio" else max(v)) if isinstance(v, list) and v else v
            for k, v in seen.items()
            if k != "response"
        },
        out["usage"],
    )
    return seen


def test_long_context_offloads_and_fetches(long_completion: dict) -> None:
    usage = long_completion["response"]["usage"]
    assert usage["prompt_tokens"] >= 8192
    assert usage["completion_tokens"] == MAX_TOKENS
    ratios = long_completion["ratio"]
    assert ratios and 0 < min(ratios) < 1.0
    assert max(long_completion["cold"]) > 0
    assert max(long_completion["fetched"]) > 0
    assert max(long_completion["stored"]) > 0
    assert max(long_completion["evicted"]) > 0


def _trace(server: Server, role: str) -> list[dict]:
    lines: list[dict] = []
    for path in sorted(server.trace.glob(f"{role}-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_resident_sets_replay_through_core_planner(
    lsa_server: Server, long_completion: dict
) -> None:
    refreshes = [r for r in _trace(lsa_server, "scheduler") if r["event"] == "refresh"]
    assert refreshes, "the scheduler traced no refresh"
    # The Memory Indexer ran in the engine: every refresh had scores.
    assert all(r["scores"] is not None for r in refreshes)
    assert any(r["evict"] for r in refreshes) and any(r["fetch"] for r in refreshes)

    extra = {
        "lsa.threshold": 0.5,
        "lsa.chunk_tokens": 256,
        "lsa.local_window_tokens": 1024,
        "lsa.sink_chunks": 1,
        "lsa.indexer_layers": [0, 1, 2, 3],
        "lsa.tau": 8,
        "lsa.max_selected_chunks": 4,
    }
    planner = ResidencyPlanner(LSAConfig.from_extra_config(extra))
    by_req: dict[str, list[dict]] = {}
    for r in refreshes:
        by_req.setdefault(r["req_id"], []).append(r)
    for req_id, recs in by_req.items():
        planner.add_request(req_id, recs[0]["prompt_tokens"])
        for rec in recs:
            while planner.num_tokens(req_id) < rec["num_tokens"]:
                planner.append_tokens(req_id, 1)
            assert planner.needs_refresh(req_id)
            plan = planner.refresh(req_id, torch.tensor(rec["scores"]))
            assert list(plan.target_chunks) == rec["target"], rec
            assert (list(plan.fetch_chunks), list(plan.evict_chunks)) == (
                rec["fetch"],
                rec["evict"],
            )
            planner.complete_evict(req_id, plan.evict_chunks)
            planner.complete_fetch(req_id, plan.fetch_chunks, ok=True)
            assert list(planner.resident_chunks(req_id)) == rec["target"]
        planner.finish(req_id)

    # The worker's residency map: stored chunks attendable == the planner's target.
    changed = {
        req_id: [r for r in recs if r["fetch"] or r["evict"]]
        for req_id, recs in by_req.items()
    }
    worker = [r for r in _trace(lsa_server, "worker") if r["event"] == "residency"]
    assert worker, "the worker traced no residency change"
    for req_id in by_req:
        mine = [w for w in worker if w["req_id"] == req_id]
        assert len(mine) == len(changed[req_id])
        for w, rec in zip(mine, changed[req_id]):
            assert w["attendable"] == [c for c in w["stored"] if c in rec["target"]]
