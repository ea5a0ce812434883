"""`flashmemory` console script: one subcommand per pipeline stage.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`; defaults come from that stage's dataclass, so the CLI never
holds a second copy of them. Modules are imported only when their subcommand runs,
so `flashmemory label` never pays for importing vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": (
        "vllm_flashmemory.offline.tiny_model",
        "build the tiny DeepSeek-V4-architecture checkpoint (the embedded default)",
    ),
    "harvest": (
        "vllm_flashmemory.offline.harvest",
        "run a transformers DeepSeek-V4 model over documents and record hidden "
        "states, K^IComp and native indexer logits as safetensors shards",
    ),
    "label": (
        "vllm_flashmemory.offline.labels",
        "turn harvested native-indexer logits into golden labels (Eq. 7-11)",
    ),
    "train": (
        "vllm_flashmemory.offline.train",
        "train the Memory Indexer on harvested shards with frozen keys (Eq. 14-15)",
    ),
    "train-backbone": (
        "vllm_flashmemory.offline.backbone",
        "train a small DeepSeek-V4 backbone on RULER-style retrieval tasks, then "
        "warm up its lightning indexer by KL to the main attention",
    ),
    "demo": (
        "vllm_flashmemory.offline.demo",
        "make-tiny, harvest, label, train and evaluate end to end on the CPU",
    ),
    "serve": (
        "vllm_flashmemory.vllm.serve",
        "serve the tiny DeepSeek-V4 (built if absent) with vLLM's OpenAI server, "
        "the plugin and the LSAConnector on; extra arguments go to `vllm serve`",
    ),
    "eval": (
        "vllm_flashmemory.reference.evaluate",
        "accuracy vs KV footprint of full, lsa, recency, random, oracle and quest "
        "on RULER-style tasks through the reference engine",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmemory",
        description="Lookahead Sparse Attention (LSA) for DeepSeek-V4: build the "
        "tiny default model, harvest and label training data, train the Memory "
        "Indexer, and serve with vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily in main() so `--help` of the top level
        # does not import torch or vLLM.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error
        return 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"flashmemory {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
