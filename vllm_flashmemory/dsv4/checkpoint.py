"""DeepSeek-V4 checkpoints in the official layout, read back into transformers.

The folder is what vLLM reads: config.json (official legacy keys), model.safetensors
with official weight names (embed.weight, layers.N.attn.*, ...; notes/deepseek_v4.md
§2) and tokenizer files. transformers' own save_pretrained writes names vLLM cannot
load (it drops `kv_norm`, keeps `model.`), so both directions are mapped here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from vllm_flashmemory.core.atomic import atomic_write

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# transformers suffix (after `model.layers.N.`) -> official suffix (after `layers.N.`)
_LAYER_RENAMES: tuple[tuple[str, str], ...] = (
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_proj.weight", "attn.wkv.weight"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight"),
    ("self_attn.o_b_proj.weight", "attn.wo_b.weight"),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.compressor.kv_proj.weight", "attn.compressor.wkv.weight"),
    ("self_attn.compressor.gate_proj.weight", "attn.compressor.wgate.weight"),
    ("self_attn.compressor.kv_norm.weight", "attn.compressor.norm.weight"),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    ("self_attn.compressor.indexer.kv_proj.weight", "attn.indexer.compressor.wkv.weight"),
    (
        "self_attn.compressor.indexer.gate_proj.weight",
        "attn.indexer.compressor.wgate.weight",
    ),
    (
        "self_attn.compressor.indexer.kv_norm.weight",
        "attn.indexer.compressor.norm.weight",
    ),
    ("self_attn.compressor.indexer.q_b_proj.weight", "attn.indexer.wq_b.weight"),
    (
        "self_attn.compressor.indexer.scorer.weights_proj.weight",
        "attn.indexer.weights_proj.weight",
    ),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("attn_hc.fn", "hc_attn_fn"),
    ("attn_hc.base", "hc_attn_base"),
    ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"),
    ("ffn_hc.base", "hc_ffn_base"),
    ("ffn_hc.scale", "hc_ffn_scale"),
)
_GLOBAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "embed.weight"),
    ("lm_head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.hc_head.hc_fn", "hc_head_fn"),
    ("model.hc_head.hc_base", "hc_head_base"),
    ("model.hc_head.hc_scale", "hc_head_scale"),
)
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OFFICIAL_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OFFICIAL_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$")


def hf_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers state dict -> official names; stacked experts split per expert."""
    glob = dict(_GLOBAL_RENAMES)
    layer = dict(_LAYER_RENAMES)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if "inv_freq" in name:
            continue  # derived RoPE buffers, never stored
        if name in glob:
            out[glob[name]] = tensor
            continue
        match = _HF_LAYER.match(name)
        if match is None:
            raise ValueError(f"no official name for transformers weight {name!r}")
        idx, rest = match.groups()
        if rest == "mlp.experts.gate_up_proj":
            # [E, 2I, D]: w1 (gate) rows first, then w3 (up), as transformers'
            # Concatenate(dim=1) of [w1, w3] builds it.
            w1, w3 = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"layers.{idx}.ffn.experts.{e}.w1.weight"] = w1[e]
                out[f"layers.{idx}.ffn.experts.{e}.w3.weight"] = w3[e]
        elif rest == "mlp.experts.down_proj":  # [E, D, I]
            for e in range(tensor.shape[0]):
                out[f"layers.{idx}.ffn.experts.{e}.w2.weight"] = tensor[e]
        elif rest in layer:
            out[f"layers.{idx}.{layer[rest]}"] = tensor
        else:
            raise ValueError(f"no official name for transformers weight {name!r}")
    return out


def official_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_official` (experts stacked back into 3-D tensors)."""
    glob = {v: k for k, v in _GLOBAL_RENAMES}
    layer = {v: k for k, v in _LAYER_RENAMES}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in state.items():
        if name in glob:
            out[glob[name]] = tensor
            continue
        match = _OFFICIAL_LAYER.match(name)
        if match is None:
            if name.startswith("mtp."):
                continue  # MTP weights are not instantiated by transformers
            raise ValueError(f"unknown official DeepSeek-V4 weight {name!r}")
        idx, rest = match.groups()
        exp = _OFFICIAL_EXPERT.match(rest)
        if exp is not None:
            e, w = exp.groups()
            experts.setdefault(idx, {}).setdefault(w, {})[int(e)] = tensor
        elif rest in layer:
            out[f"model.layers.{idx}.{layer[rest]}"] = tensor
        else:
            raise ValueError(f"unknown official DeepSeek-V4 weight {name!r}")
    for idx, ws in experts.items():
        n = len(ws["w1"])
        w1 = torch.stack([ws["w1"][e] for e in range(n)])
        w3 = torch.stack([ws["w3"][e] for e in range(n)])
        out[f"model.layers.{idx}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        out[f"model.layers.{idx}.mlp.experts.down_proj"] = torch.stack(
            [ws["w2"][e] for e in range(n)]
        )
    return out


def save_checkpoint(
    model: DeepseekV4ForCausalLM,
    official_config: dict,
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write config.json + model.safetensors (official names) atomically per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_to_official(model.state_dict())
    tensors = {
        # .cpu(): a model still training on the GPU can be snapshotted as it runs.
        k: (v.to(dtype) if v.is_floating_point() else v.to(torch.int32))
        .detach()
        .cpu()
        .contiguous()
        for k, v in state.items()
    }
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, {"format": "pt"}))
    text = json.dumps(official_config, indent=2, sort_keys=True) + "\n"
    atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(text))
    return out


def load_hf_model(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> DeepseekV4ForCausalLM:
    """Read a folder written by `save_checkpoint` (or any official-layout
    single-file DeepSeek-V4 checkpoint) into transformers, eager attention."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"model dir {str(folder)!r} lacks {CONFIG_FILE} or {WEIGHTS_FILE}; "
            "build one with `flashmemory make-tiny DIR`."
        )
    raw = json.loads((folder / CONFIG_FILE).read_text())
    config = hf_config_from_official(raw)
    state = official_to_hf(load_file(str(folder / WEIGHTS_FILE)))
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    # assign=True keeps the loaded tensors; the RoPE buffers are recomputed below
    # because meta-initialised buffers carry no values.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if "inv_freq" not in m]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(folder)!r} does not match its config: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}; rebuild it with "
            "`flashmemory make-tiny`."
        )
    _rebuild_rope_buffers(model)
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            _set_buffer(model, name, buf.long())
    return model.to(dtype).eval()


def hf_config_from_official(raw: dict) -> DeepseekV4Config:
    cfg = {k: v for k, v in raw.items() if k not in (
        "architectures", "model_type", "topk_method", "torch_dtype", "rope_scaling",
        "transformers_version",
    )}
    yarn = raw.get("rope_scaling")
    if yarn:
        yarn = {k: v for k, v in yarn.items() if k != "type"}
        yarn.setdefault("rope_type", "yarn")
        cfg["rope_parameters"] = yarn
    config = DeepseekV4Config(**cfg)
    config._attn_implementation = "eager"
    return config


def _rebuild_rope_buffers(model: torch.nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ != "DeepseekV4RotaryEmbedding":
            continue
        for layer_type in module.layer_types:
            fn = module.compute_default_rope_parameters
            if module.rope_type[layer_type] != "default":
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                fn = ROPE_INIT_FUNCTIONS[module.rope_type[layer_type]]
            inv_freq, _ = fn(module.config, device="cpu", layer_type=layer_type)
            setattr(module, f"{layer_type}_inv_freq", inv_freq)
            setattr(module, f"{layer_type}_original_inv_freq", inv_freq.clone())


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._buffers[leaf] = value


DEVICES = ("cpu", "cuda")


# Share of one GPU that `--workers k` processes split (0.9 / k each): uncapped, each
# caching allocator keeps what its longest input needed (23.5 GiB for one eval worker
# on a 16K grid, 26.5 GiB for one harvest worker at 16K) and starves the rest.
_WORKER_GPU_SHARE = 0.9


def worker_memory_fraction(workers: int) -> float:
    """--cuda-memory-fraction of each of `workers` side-by-side GPU processes."""
    return _WORKER_GPU_SHARE / workers


def check_memory_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--cuda-memory-fraction {fraction!r} must lie in (0, 1].")


def limit_cuda_memory(fraction: float | None, device: str) -> None:
    """Cap this process at `fraction` of the GPU (a worker's share); no-op on the CPU."""
    check_memory_fraction(fraction)
    if fraction is not None and device == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction)


def check_device(device: str) -> None:
    """Refuse a --device other than cpu or cuda, and cuda without a GPU."""
    if device not in DEVICES:
        raise ValueError(
            f"--device {device!r} is not supported; use --device cpu (the default) "
            "or --device cuda (one NVIDIA GPU)."
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda but torch.cuda.is_available() is False (no GPU, or a "
            "CPU-only torch build); use --device cpu, or install a CUDA build of "
            "torch on a GPU machine."
        )


def load_model_on(model_dir: str | os.PathLike[str], device: str) -> DeepseekV4ForCausalLM:
    """load_hf_model in fp32 on `device`; on cuda the MoE experts use transformers'
    grouped_mm implementation when it has one (as backbone training does)."""
    check_device(device)
    model = load_hf_model(model_dir)
    if device == "cpu":
        return model
    model = model.to(device)
    set_impl = getattr(model, "set_experts_implementation", None)
    if set_impl is not None:
        set_impl("grouped_mm")
    logger.info("model on %s (%s), fp32", device, torch.cuda.get_device_name())
    return model
