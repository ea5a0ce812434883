"""`flashmemory serve` argument handling, without starting vLLM (--dry-run).

Scenarios:
- the printed plain `vllm serve` line carries the port, the LSAConnector with the
  tiny-model lsa.* defaults (overridable with --lsa), the CPU settings, and every
  unknown argument passed through to vLLM;
- a user --kv-transfer-config replaces ours; a user --max-model-len wins;
- a bad lsa.* value stops it before vLLM starts, naming the fix;
- without a trained indexer it warns and serves an untrained one.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lsa_helpers import ensure_tiny_model, write_random_indexer

from vllm_flashmemory.cli import main


def _serve(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = main(["serve", "--dry-run", "--model", str(ensure_tiny_model()), *argv])
    out = capsys.readouterr()
    line = out.out.strip().splitlines()[-1]
    return rc, shlex.split(line), out.err


def _extra(cmd: list[str]) -> dict:
    return json.loads(cmd[cmd.index("--kv-transfer-config") + 1])[
        "kv_connector_extra_config"
    ]


def test_defaults_and_passthrough(capsys, tmp_path) -> None:
    indexer = write_random_indexer(tmp_path / "ix")
    rc, cmd, _ = _serve(
        capsys,
        "--port",
        "8123",
        "--indexer",
        str(indexer),
        "--lsa",
        "tau=4",
        "--max-num-seqs",
        "4",
    )
    assert rc == 0
    i = cmd.index("vllm")
    assert cmd[i + 1] == "serve" and cmd[cmd.index("--port") + 1] == "8123"
    extra = _extra(cmd)
    assert extra["lsa.tau"] == 4 and extra["lsa.chunk_tokens"] == 256
    assert extra["lsa.indexer_layers"] == [0, 1, 2, 3]
    assert extra["lsa.indexer_path"] == str(indexer)
    assert cmd[-2:] == ["--max-num-seqs", "4"]
    assert "--no-enable-prefix-caching" in cmd and "--max-model-len" in cmd
    if "--enforce-eager" in cmd:  # CPU
        assert any(a.startswith("VLLM_CPU_KVCACHE_SPACE=") for a in cmd[:i]) or (
            "VLLM_CPU_KVCACHE_SPACE" in __import__("os").environ
        )


def test_user_values_win(capsys, tmp_path) -> None:
    mine = '{"kv_connector":"LSAConnector","kv_role":"kv_both"}'
    rc, cmd, _ = _serve(capsys, "--kv-transfer-config", mine, "--max-model-len", "4096")
    assert rc == 0
    assert cmd.count("--kv-transfer-config") == 1 and mine in cmd
    assert cmd.count("--max-model-len") == 1 and "4096" in cmd


def test_bad_lsa_value_stops_before_vllm(capsys, tmp_path) -> None:
    indexer = write_random_indexer(tmp_path / "ix")
    rc = main(
        [
            "serve",
            "--dry-run",
            "--model",
            str(ensure_tiny_model()),
            "--indexer",
            str(indexer),
            "--lsa",
            "tau=0",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "'lsa.tau'=0 must be at least 1" in err


def test_missing_indexer_serves_untrained_with_warning(capsys, tmp_path) -> None:
    rc, cmd, err = _serve(capsys, "--indexer", str(tmp_path / "absent"))
    assert rc == 0 and "UNTRAINED" in err
    assert _extra(cmd)["lsa.indexer_path"].endswith("untrained-indexer")
