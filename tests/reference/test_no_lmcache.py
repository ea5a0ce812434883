"""`flashmemory eval` and `harvest` run where neither LMCache nor vLLM is installed.

The lent GPU machine has torch, triton and transformers but no LMCache and no vLLM, and
runs the package from a checkout (`PYTHONPATH=<repo> python3 -m vllm_flashmemory.cli`,
not an installed console script). A subprocess reproduces that: a `sys.meta_path`
finder refuses `lmcache` and `vllm` (and their submodules), the editable-install
finder is removed, and the CLI runs a tiny harvest and eval on the CPU (the reference
engine's cold pool is the torch backend). The same run checks that `--device cpu`
gives the rows of the default (no --device) run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
from vllm_flashmemory.offline.tiny_model import make_tiny

REPO = Path(__file__).resolve().parents[2]

RUNNER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("lmcache", "vllm")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    # As on the GPU machine: the checkout on PYTHONPATH, no editable install.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.meta_path.insert(0, Block())

    from vllm_flashmemory.cli import main

    model, indexer, out, task_file = sys.argv[1:5]
    assert main(["harvest", "--model", model, "--out", out + "/h", "--synthetic", "1",
                 "--tokens", "96", "--prompt-tokens", "64", "--positions-per-shard",
                 "16", "--max-chunk-tokens", "32", "--device", "cpu",
                 "--no-progress"]) == 0
    common = ["eval", "--model", model, "--indexer", indexer, "--tasks",
              "niah_single_1", "--task-file", task_file, "--lengths", "256", "--methods",
              "full,lsa,recency,random,oracle10", "--n", "1", "--tau", "4",
              "--max-new-tokens", "4", "--prefill-chunk-tokens", "128", "--no-progress"]
    assert main(common + ["--json", out + "/default.json"]) == 0
    assert main(common + ["--json", out + "/cpu.json", "--plot", out + "/cpu.png",
                          "--device", "cpu"]) == 0
    import vllm_flashmemory.offline.labels, vllm_flashmemory.offline.train  # noqa: F401
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("NO-LMCACHE-OK")
    """
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = make_tiny(str(tmp_path_factory.mktemp("model")), seed=0)
    torch.manual_seed(2)
    indexer = MemoryIndexer(MemoryIndexerConfig(
        hidden_size=_hidden_size(model_dir), rank=32, n_heads=4,
        rope_original_max_position=4096, layer_ids=(0, 1, 2, 3),
    ))
    ind_dir = indexer.save(tmp_path_factory.mktemp("indexer"))
    return str(model_dir), str(ind_dir)


def _hidden_size(model_dir) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])


def test_eval_and_harvest_without_lmcache_or_vllm(tiny, tmp_path):
    model_dir, ind_dir = tiny
    filler = "The grass is green and the sky is blue. " * 5
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text(json.dumps({
        "id": "s0", "task": "niah_single_1", "question": "What is the magic number?",
        "context": filler + "The magic number is 4711. " + filler, "answer": "4711",
    }) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, model_dir, ind_dir, str(tmp_path), str(task_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "NO-LMCACHE-OK" in proc.stdout
    assert (tmp_path / "h" / "manifest.json").is_file()
    assert (tmp_path / "cpu.png").is_file()

    def rows(name):
        data = json.loads((tmp_path / name).read_text())["rows"]
        # Wall time differs between runs; everything else must not.
        return [{k: v for k, v in r.items() if k != "seconds_per_sample"} for r in data]

    default, cpu = rows("default.json"), rows("cpu.json")
    assert len(default) == 5
    assert default == cpu
