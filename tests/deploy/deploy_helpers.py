"""Helpers of the deploy tests: ports, process groups, HTTP, the LSA deployment.

A module of its own (not conftest.py) so that test modules can import it by a
name no other test folder uses; the fixtures built from it live in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
# Same as deploy/prometheus/prometheus.yml would be too slow for a test: 1 s
# gives a dozen samples during one long request.
TEST_SCRAPE_INTERVAL = "1s"
# A prompt longer than the local window, so that (with real Memory Indexer
# selection) some CSA chunks become cold while the request runs.
LONG_PROMPT_TOKENS = 3000
LOCAL_WINDOW_TOKENS = 1024
CHUNK_TOKENS = 256
MAX_SELECTED_CHUNKS = 4
# The tiny model's 4 CSA layers (decoder layers 2, 4, 6, 8).
TINY_CSA_LAYERS = (0, 1, 2, 3)
MAX_MODEL_LEN = 8192
# Decode long enough for a dozen residency refreshes (lsa.tau=8) to be scraped.
LONG_REQUEST_MAX_TOKENS = 96


def require_system_binary(binary: str, debian_package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        reason = (
            f"missing system package: Debian package '{debian_package}' "
            f"(no `{binary}` on PATH); run scripts/install_system_deps.sh"
        )
        print(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_env(**extra: str) -> dict[str, str]:
    """The environment of a deploy command: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


@dataclass
class Proc:
    """A background process in its own process group, with its output in a file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(
        cls, name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO
    ) -> Proc:
        handle = log.open("wb")
        popen = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        handle.close()
        return cls(name, popen, log)

    def tail(self, chars: int = 4000) -> str:
        return (
            self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
        )

    def stop(self, timeout_s: float = 30) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Children (engine core, workers) share the group; make sure none is left.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen.poll() is None:
            self.popen.wait(10)


def http_json(url: str, data: dict | None = None, timeout_s: float = 10) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def http_text(url: str, timeout_s: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read().decode()


def wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
            )
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(
        f"{proc.name} not up at {url} after {timeout_s} s:\n{proc.tail()}"
    )


def prom_query(base: str, query: str, **params: str) -> list[dict]:
    endpoint = "query_range" if "start" in params else "query"
    url = f"{base}/api/v1/{endpoint}?" + urllib.parse.urlencode(
        {"query": query, **params}
    )
    reply = http_json(url)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def make_tiny_model(out: Path) -> Path:
    subprocess.run(
        [str(VENV_BIN / "flashmemory"), "make-tiny", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out


def lsa_extra_config(work: Path) -> dict:
    """lsa.* keys for the test servers: real Memory Indexer selection.

    A seeded, untrained Memory Indexer over the tiny model's 4 CSA layers; its
    scores sit near 0.5, so `lsa.max_selected_chunks` caps the selection and a
    prompt longer than sink + local window + 4 chunks must leave chunks cold
    (the same set-up as tests/vllm/test_serve_e2e.py).
    """
    import torch

    from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    torch.manual_seed(0)
    config = MemoryIndexerConfig.preset("tiny", n_heads=64, layer_ids=TINY_CSA_LAYERS)
    indexer = MemoryIndexer(config).save(work / "indexer")
    return {
        "lsa.indexer_path": str(indexer),
        "lsa.indexer_layers": list(TINY_CSA_LAYERS),
        "lsa.threshold": 0.5,
        "lsa.max_selected_chunks": MAX_SELECTED_CHUNKS,
        "lsa.local_window_tokens": LOCAL_WINDOW_TOKENS,
        "lsa.chunk_tokens": CHUNK_TOKENS,
        "lsa.tau": 8,
        "lsa.cold_pool_gib": 0.25,
    }


def long_prompt_token_ids(n: int = LONG_PROMPT_TOKENS) -> list[int]:
    return [(i * 7) % 250 + 3 for i in range(n)]


@dataclass
class MonitoredServer:
    model: Path
    url: str
    # None when Debian's prometheus is not installed (see `prometheus_server`).
    prometheus_url: str | None
    extra_config: dict
    node_logs: list[Path]
    request_start: float = 0.0
    request_end: float = 0.0
    completion: dict = field(default_factory=dict)


def start_lsa_node(
    model: Path,
    node_rank: int,
    master_port: int,
    extra: dict,
    log: Path,
    port: int | None,
) -> Proc:
    """One node of a two-node deployment (docs/DEPLOY.md "Multi-node without Ray").

    Tensor parallel 2 across two nodes (`--nnodes 2`), one worker per node; each
    node's OpenMP threads are bound to its own core. Rank 0 runs the API server,
    rank 1 is `--headless`.
    """
    env = deploy_env(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=str(node_rank % max(os.cpu_count() or 1, 1)),
        LSA_EXTRA_CONFIG=json.dumps(extra),
    )
    cmd = [
        str(DEPLOY / "serve.sh"),
        str(model),
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--tensor-parallel-size",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
    ]
    if port is None:
        cmd.append("--headless")
    else:
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
    return Proc.start(f"vllm serve node {node_rank}", cmd, log, env)


def start_prometheus(work: Path, target: str, port: int) -> Proc:
    """Prometheus running deploy/prometheus/prometheus.yml, retargeted at `target`."""
    prometheus = require_system_binary("prometheus", "prometheus")
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert 'targets: ["localhost:8000"]' in text and "scrape_interval: 5s" in text
    text = text.replace('targets: ["localhost:8000"]', f'targets: ["{target}"]')
    text = text.replace(
        "scrape_interval: 5s", f"scrape_interval: {TEST_SCRAPE_INTERVAL}"
    )
    text = text.replace(
        "evaluation_interval: 5s", f"evaluation_interval: {TEST_SCRAPE_INTERVAL}"
    )
    config = work / "prometheus.yml"
    config.write_text(text)
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Proc.start("prometheus", cmd, work / "prometheus.log", deploy_env())
