"""Memory Indexer, the lookahead query encoder of LSA, in one file (Eq. 1-5, 13).

Per indexer layer (paper §2.1; DESIGN.md "The Memory Indexer, concretely"):

    h [D] -> W_DQ (D -> r) -> RMSNorm (weighted) -> W_IUQ (r -> H x Dh)
          -> RoPE on the last `rope_dim` dims at the query position
          -> Hadamard = q                                         (Eq. 1-2)
    w = W_w(h) * H^-0.5 * Dh^-0.5                                 (Eq. 3)
    I_{t,s} = sigmoid(sum_h w_h * ReLU(q_h . K^IComp_s))          (Eq. 4)

Keys are the layer's native compressed indexer keys K^IComp exactly as the cache
stores them: RoPE'd at the entry position, Hadamard-rotated, fp8 e4m3 with one fp32
scale per entry (or plain float). The query therefore takes the same RoPE (DeepSeek-V4's
compress rope: interleaved pairs, theta 160000 + YaRN, no attention mscale) and the
same normalized Walsh-Hadamard rotation, so q . k is taken in the cache's own space.

Checkpoints: a directory holding `memory_indexer.safetensors` and `config.json`,
both written atomically. config.json may carry a `calibration` (written by `flashmemory
train`): the threshold of Eq. 5 that kept at most a target share of historical chunks
resident on held-out windows, used when no threshold is given (eval's --threshold,
'lsa.threshold'). The published FlashMemory retriever (a torch state dict with
keys `retrievers.l{id}.{wq_a.weight,q_norm_weight,wq_b.weight,weights_proj.weight}`,
as read by the official SGLang hook `_TrainedScorer`) loads through the same `load`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vllm_flashmemory.core.atomic import atomic_write
from vllm_flashmemory.core.rotation import hadamard_matrix
from vllm_flashmemory.triton_ops.memory_indexer_score import (
    combine_layers_ref,
    memory_indexer_scores_ref,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "flashmemory-memory-indexer/1"
WEIGHTS_FILE = "memory_indexer.safetensors"
CONFIG_FILE = "config.json"
# Per-layer parameter names, kept identical to the published retriever's so its
# state dict maps onto ours by a prefix rename only.
PARAM_NAMES = ("wq_a.weight", "q_norm_weight", "wq_b.weight", "weights_proj.weight")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


@dataclass(frozen=True)
class MemoryIndexerConfig:
    """Shape and positional geometry of a Memory Indexer (paper §2.1, §2.4)."""

    # Width d of the backbone hidden state h_t fed to W_DQ and W_w (4096 for Flash).
    hidden_size: int
    # Low-rank bottleneck d_c of W_DQ / W_IUQ; the paper's R-series uses 2048 (§2.4).
    rank: int = 2048
    # Indexer heads n_h; the published retriever uses 128 (twice the native 64).
    n_heads: int = 128
    # Per-head width; must equal the width of the native K^IComp (128 in DeepSeek-V4).
    head_dim: int = 128
    # RoPE'd trailing dims of each head (DeepSeek-V4's qk_rope_head_dim, 64).
    rope_dim: int = 64
    # DeepSeek-V4's compress_rope_theta: CSA layers rotate with base 160000.
    rope_theta: float = 160000.0
    # YaRN of the compress rope (factor 16 over 65536 original positions); 1.0 = off.
    rope_factor: float = 16.0
    rope_original_max_position: int = 65536
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    # Indices AMONG the model's CSA layers that carry an indexer (Flash: 10, 12, 20).
    layer_ids: tuple[int, ...] = (10, 12, 20)
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(self.layer_ids))
        for (
            name
        ) in "hidden_size rank n_heads head_dim rope_original_max_position".split():
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("rope_dim", self.rope_dim, minimum=0)
        if self.head_dim & (self.head_dim - 1):
            raise ValueError(
                f"head_dim={self.head_dim} must be a power of two because the query "
                "takes a Walsh-Hadamard rotation over it; use 128 as DeepSeek-V4 does."
            )
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(
                f"rope_dim={self.rope_dim} must be even (RoPE rotates pairs) and at "
                f"most head_dim={self.head_dim}; use the model's qk_rope_head_dim "
                "(64 for Flash)."
            )
        for (
            name
        ) in (
            "rope_theta rope_factor rope_beta_fast rope_beta_slow rms_norm_eps".split()
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value <= 0
            ):
                raise ValueError(f"{name}={value!r} must be a positive number.")
        if self.rope_factor < 1:
            raise ValueError(
                f"rope_factor={self.rope_factor} must be >= 1 (YaRN stretches "
                "context); use 1.0 to switch YaRN off or 16.0 for DeepSeek-V4."
            )
        if not self.layer_ids:
            raise ValueError(
                "layer_ids=() must name at least one CSA layer index, e.g. "
                "(10, 12, 20)."
            )
        for lid in self.layer_ids:
            if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
                raise ValueError(
                    f"layer_ids={self.layer_ids!r} holds {lid!r}; each entry must be a "
                    "non-negative index among the model's CSA layers."
                )
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(
                f"layer_ids={self.layer_ids!r} repeats a layer; list each once."
            )

    @property
    def head_weight_scale(self) -> float:
        """The constant of Eq. 3: H^-0.5 * Dh^-0.5."""
        return self.n_heads**-0.5 * self.head_dim**-0.5

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MemoryIndexerConfig:
        """A named preset ("flash" or "tiny"), looked up by exact name."""
        if name not in PRESETS:
            raise ValueError(
                f"Memory Indexer preset {name!r} does not exist; use one of "
                f"{sorted(PRESETS)} or MemoryIndexerConfig.from_values(...)."
            )
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_values(cls, **values: Any) -> MemoryIndexerConfig:
        """Build from explicit values (e.g. a JSON dict); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"MemoryIndexerConfig has no field(s) {unknown}; known fields: "
                f"{sorted(known)}."
            )
        if "layer_ids" in values:
            values = {**values, "layer_ids": tuple(values["layer_ids"])}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_ids"] = list(self.layer_ids)
        return out


PRESETS: dict[str, MemoryIndexerConfig] = {
    # The published FlashMemory DS-V4-Flash retriever (README "Hyperparameters").
    "flash": MemoryIndexerConfig(hidden_size=4096),
    # The project's tiny DeepSeek-V4 (vllm_flashmemory/dsv4/tiny.py: hidden 256, 4 CSA
    # layers, Flash-shaped 64 x 128 indexer, YaRN over 4096 original positions). Rank
    # hidden/2 and 2x native heads, the published proportions; the last two CSA layers
    # because shallow layers predict poorly (paper §2.4).
    "tiny": MemoryIndexerConfig(
        hidden_size=256,
        rank=128,
        n_heads=128,
        rope_original_max_position=4096,
        layer_ids=(2, 3),
    ),
}


# ---- positional and rotation helpers ------------------------------------------------


def yarn_inv_freq(config: MemoryIndexerConfig) -> torch.Tensor:
    """Inverse frequencies of the compress rope with YaRN blending -> [rope_dim // 2].

    Frequencies faster than beta_fast rotations over the original context keep
    their value, those slower than beta_slow are divided by the factor, with a
    linear ramp between (the YaRN recipe DeepSeek-V4 and transformers use).
    """
    dim, base = config.rope_dim, float(config.rope_theta)
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    )  # [dim/2]
    if config.rope_factor == 1.0:
        return inv_freq

    def correction_dim(n_rot: float) -> float:
        turns = config.rope_original_max_position / (n_rot * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)
    ramp = ramp.clamp(0, 1)  # [dim/2]
    # ramp 0 = extrapolate (keep), ramp 1 = interpolate (divide by the factor).
    return inv_freq * (1 - ramp) + inv_freq / config.rope_factor * ramp


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Interleaved-pair RoPE on the trailing 2*len(inv_freq) dims of x, at `positions`.

    x: [..., T, H, Dh]; positions: [T] int64; inv_freq: [rd/2]. Pairs (x[2i], x[2i+1])
    of the rope slice rotate as complex numbers, as DeepSeek-V4 rotates them.
    """
    rd = 2 * inv_freq.shape[0]
    if rd == 0:
        return x
    # fp32 product of position and frequency, the order transformers uses.
    angles = positions.float()[:, None] * inv_freq.float()  # [T, rd/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, rd/2]
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    a, b = rope[..., 0::2], rope[..., 1::2]  # [..., T, H, rd/2]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)


# ---- the module --------------------------------------------------------------------


class _IndexerLayer(nn.Module):
    """Trainable query encoder of one indexer layer (W_DQ, norm, W_IUQ, W_w)."""

    def __init__(self, config: MemoryIndexerConfig) -> None:
        super().__init__()
        self.wq_a = nn.Linear(config.hidden_size, config.rank, bias=False)  # W_DQ
        self.q_norm_weight = nn.Parameter(torch.ones(config.rank))
        heads_width = config.n_heads * config.head_dim
        self.wq_b = nn.Linear(config.rank, heads_width, bias=False)  # W_IUQ
        self.weights_proj = nn.Linear(config.hidden_size, config.n_heads, bias=False)


class MemoryIndexer(nn.Module):
    """Lookahead query encoder over frozen K^IComp keys (Eq. 1-5, 13)."""

    def __init__(self, config: MemoryIndexerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict(
            {f"l{lid}": _IndexerLayer(config) for lid in config.layer_ids}
        )
        self.register_buffer("inv_freq", yarn_inv_freq(config), persistent=False)
        hadamard = hadamard_matrix(config.head_dim)
        self.register_buffer("hadamard", hadamard, persistent=False)

    def query(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and head weights, Eq. 1-3.

        hidden [L, T, D], positions [T] -> q [L, T, H, Dh], w [L, T, H].
        """
        cfg = self.config
        n_layers = len(cfg.layer_ids)
        if hidden.dim() != 3 or (hidden.shape[0], hidden.shape[2]) != (
            n_layers,
            cfg.hidden_size,
        ):
            raise ValueError(
                f"hidden has shape {tuple(hidden.shape)}; expected [L={n_layers}, T, "
                f"D={cfg.hidden_size}], one row per indexer layer {cfg.layer_ids}."
            )
        if positions.dim() != 1 or positions.shape[0] != hidden.shape[1]:
            raise ValueError(
                f"positions has shape {tuple(positions.shape)}; expected "
                f"[T={hidden.shape[1]}] absolute token positions of the queries."
            )
        qs, ws = [], []
        for i, lid in enumerate(cfg.layer_ids):
            layer = self.layers[f"l{lid}"]
            x = hidden[i].float()  # [T, D]
            c = layer.wq_a(x)  # [T, r]  Eq. 1
            inv_rms = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
            c = c * inv_rms * layer.q_norm_weight
            q = layer.wq_b(c).view(x.shape[0], cfg.n_heads, cfg.head_dim)  # Eq. 2
            q = apply_rope(q, positions, self.inv_freq)
            qs.append(q @ self.hadamard)  # H is symmetric: q H == H q per head
            ws.append(layer.weights_proj(x) * cfg.head_weight_scale)  # [T, H]  Eq. 3
        return torch.stack(qs), torch.stack(ws)  # [L, T, H, Dh], [L, T, H]

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        k_icomp: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        relu_slope: float = 0.0,
    ) -> torch.Tensor:
        """Scores I_{t,s}, Eq. 4 (relu_slope > 0: leaky ReLU, for training only).

        hidden [L, T, D], positions [T], k_icomp [L, N, Dh] (+ k_scale [L, N])
        -> [L, T, N] in (0, 1).
        """
        cfg = self.config
        want = (len(cfg.layer_ids), cfg.head_dim)
        if k_icomp.dim() != 3 or (k_icomp.shape[0], k_icomp.shape[2]) != want:
            raise ValueError(
                f"k_icomp has shape {tuple(k_icomp.shape)}; expected [L={want[0]}, N, "
                f"Dh={want[1]}], the native compressed indexer keys of each layer."
            )
        if k_scale is not None and tuple(k_scale.shape) != tuple(k_icomp.shape[:2]):
            raise ValueError(
                f"k_scale has shape {tuple(k_scale.shape)}; expected "
                f"{tuple(k_icomp.shape[:2])} (one fp32 scale per cached entry), or "
                "None for float keys."
            )
        q, w = self.query(hidden, positions)
        return memory_indexer_scores_ref(q, w, k_icomp, k_scale, relu_slope)  # [L, T, N]

    # ---- checkpoint ----------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str], calibration: dict[str, Any] | None = None
    ) -> Path:
        """Write config.json + memory_indexer.safetensors into `path`, atomically;
        `calibration` (metrics.calibrate_threshold's dict) goes into config.json."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
        meta = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict()}
        if calibration is not None:
            meta["calibration"] = dict(calibration)
        tag = {"format": CHECKPOINT_FORMAT}
        atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata=tag))
        text = json.dumps(meta, indent=2) + "\n"
        atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(text))
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected: MemoryIndexerConfig | None = None,
        map_location: str | torch.device = "cpu",
    ) -> MemoryIndexer:
        """Load our checkpoint directory or the published retriever file (.pt).

        `expected` describes the model the indexer must serve: its hidden size, K^IComp
        width, rope geometry and indexer layer ids must match the checkpoint's, or
        loading refuses with the mismatch named.
        """
        p = Path(path)
        if p.is_dir():
            config, state = _read_native(p)
        elif p.is_file():
            config, state = _read_published(p, expected)
        else:
            raise FileNotFoundError(
                f"Memory Indexer checkpoint {str(p)!r} does not exist; pass a "
                "directory written by `flashmemory train` or the published "
                "retriever file (e.g. top3_R930_joint.pt)."
            )
        if expected is not None:
            _check_fits(config, expected, p)
        model = cls(config)
        _check_state(model, state, p)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model.to(map_location)


def read_calibration(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `calibration` of a checkpoint directory's config.json, or None (no
    directory, no config.json, a published .pt file, or never calibrated)."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        return None
    calibration = json.loads(cfg_file.read_text()).get("calibration")
    if calibration is None:
        return None
    threshold = calibration.get("threshold") if isinstance(calibration, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0.0 <= threshold <= 1.0
    ):
        raise ValueError(
            f"{str(cfg_file)!r} has calibration={calibration!r}; its threshold must be a "
            "number in [0, 1]. Re-run `flashmemory train`, or delete the key."
        )
    return calibration


def _read_native(p: Path) -> tuple[MemoryIndexerConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_file, w_file = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(
            f"{str(p)!r} is not a Memory Indexer checkpoint: it needs {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}; write one with MemoryIndexer.save or "
            "`flashmemory train`."
        )
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{str(cfg_file)!r} has format={meta.get('format')!r}; this version reads "
            f"{CHECKPOINT_FORMAT!r}. Re-export the checkpoint with this version."
        )
    return MemoryIndexerConfig.from_values(**meta["config"]), load_file(str(w_file))


def _read_published(
    p: Path, expected: MemoryIndexerConfig | None
) -> tuple[MemoryIndexerConfig, dict[str, torch.Tensor]]:
    """The official retriever: `retrievers.l{id}.<param>` (joint) or bare `<param>`."""
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
    else:
        raw = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(raw, dict) and "model_state" in raw:  # a training-resume file
            raw = raw["model_state"]
    if not isinstance(raw, dict):
        raise ValueError(
            f"{str(p)!r} does not hold a state dict; it is not a retriever checkpoint."
        )
    # freqs_cis is a RoPE table the official code stores; we recompute it.
    raw = {k: v for k, v in raw.items() if not k.endswith("freqs_cis")}
    state: dict[str, torch.Tensor] = {}
    if any(k.startswith("retrievers.") for k in raw):
        for k, v in raw.items():
            state["layers." + k[len("retrievers.") :]] = v
    elif set(raw) == set(PARAM_NAMES):
        if expected is None or len(expected.layer_ids) != 1:
            raise ValueError(
                f"{str(p)!r} is a single-layer retriever without a layer id; pass "
                "expected=MemoryIndexerConfig(..., layer_ids=(<CSA index>,)) "
                "naming its layer."
            )
        state = {f"layers.l{expected.layer_ids[0]}.{k}": v for k, v in raw.items()}
    else:
        raise ValueError(
            f"{str(p)!r} has keys {sorted(raw)[:6]}...; a published retriever holds "
            f"'retrievers.l<id>.<param>' or {list(PARAM_NAMES)}."
        )
    try:
        layer_ids = sorted({int(k.split(".")[1][1:]) for k in state})
        first = f"layers.l{layer_ids[0]}."
        wq_a, wp = state[first + "wq_a.weight"], state[first + "weights_proj.weight"]
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(
            f"{str(p)!r} is not a retriever checkpoint of the published layout "
            f"('retrievers.l<id>.<param>' with {list(PARAM_NAMES)}): {e!r}."
        ) from e
    base = expected if expected is not None else PRESETS["flash"]
    config = dataclasses.replace(
        base,
        hidden_size=int(wq_a.shape[1]),
        rank=int(wq_a.shape[0]),
        n_heads=int(wp.shape[0]),
        layer_ids=tuple(layer_ids),
    )
    logger.info(
        "Read published retriever %s: layers %s, rank %d, heads %d",
        p,
        layer_ids,
        config.rank,
        config.n_heads,
    )
    return config, state


# The native lightning indexer's query path in an official DeepSeek-V4 checkpoint, per
# decoder layer L: our parameter <- "layers.{L}.attn.<name>". Same maths as Eq. 1-4
# (q = wq_b(q_norm(wq_a(x))), w = weights_proj(x) scaled by H^-0.5 Dh^-0.5).
NATIVE_PARAM_NAMES = {
    "wq_a.weight": "wq_a.weight",
    "q_norm_weight": "q_norm.weight",
    "wq_b.weight": "indexer.wq_b.weight",
    "weights_proj.weight": "indexer.weights_proj.weight",
}


def native_indexer_state(
    weights: dict[str, torch.Tensor], layer_ids: tuple[int, ...], csa_layers: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """A MemoryIndexer state dict that starts as the backbone's own lightning indexer.

    weights: the backbone's official-name tensors (model.safetensors); layer_ids: the
    Memory Indexer's CSA indices; csa_layers: decoder-layer index of each CSA index
    (core/config_format.csa_layer_ids). Its score is then sigmoid(native index score)
    at the refresh position: a warm start that already ranks the entries the current
    query needs, which training turns into the next tau tokens' needs.
    """
    state = {}
    for lid in layer_ids:
        if not 0 <= lid < len(csa_layers):
            raise ValueError(
                f"indexer layer {lid} is not a CSA index; the backbone has "
                f"{len(csa_layers)} CSA layers (0..{len(csa_layers) - 1})."
            )
        for ours, theirs in NATIVE_PARAM_NAMES.items():
            key = f"layers.{csa_layers[lid]}.attn.{theirs}"
            if key not in weights:
                raise ValueError(
                    f"the backbone checkpoint has no {key!r}; native init needs an "
                    "official-name DeepSeek-V4 checkpoint (use init='random' otherwise)."
                )
            state[f"layers.l{lid}.{ours}"] = weights[key].float()
    return state


_ROPE_FIX = "the query must take the same RoPE as the cached keys"
_FITS_FIXES = {
    "hidden_size": "train the indexer on this model's hidden states",
    "head_dim": "the head width must equal the model's K^IComp width (index_head_dim)",
    **{f"rope_{n}": _ROPE_FIX for n in "dim theta factor beta_fast beta_slow".split()},
    "rope_original_max_position": _ROPE_FIX,
    "layer_ids": "set lsa.indexer_layers to the checkpoint's layers, or retrain",
}


def _check_fits(got: MemoryIndexerConfig, want: MemoryIndexerConfig, p: Path) -> None:
    for name, fix in _FITS_FIXES.items():
        a, b = getattr(got, name), getattr(want, name)
        if a != b:
            raise ValueError(
                f"Memory Indexer checkpoint {str(p)!r} has {name}={a!r} but the "
                f"model needs {name}={b!r}; {fix}."
            )


def _check_state(model: MemoryIndexer, state: dict[str, torch.Tensor], p: Path) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(
            f"Memory Indexer checkpoint {str(p)!r} does not fit its config: missing "
            f"{missing}, unexpected {extra}; the weights and config.json come "
            "from different runs."
        )
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(
                f"Memory Indexer checkpoint {str(p)!r}: tensor {k!r} has shape "
                f"{tuple(state[k].shape)} but the config implies {shape}; the "
                "weights and config.json come from different runs."
            )


# ---- selection (Eq. 5, 13) and chunk mapping -----------------------------------------


def combine_layers(scores: torch.Tensor, routing: str = "or") -> torch.Tensor:
    """One score per entry from every layer's (Eq. 13): [L, T, N] -> [T, N].

    "or" takes the max over layers (an entry passes a threshold when any layer's
    score does), "mean" the layer mean. Top-K selection ranks these scores.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [L, T, N].")
    return combine_layers_ref(scores, routing)


def select(
    scores: torch.Tensor, threshold: float = 0.5, routing: str = "or"
) -> torch.Tensor:
    """Entry mask of Eq. 5 with the union of Eq. 13: [L, T, N] -> bool [T, N].

    "or" keeps an entry when any layer scores it >= threshold (max over layers);
    "mean" thresholds the layer mean. Threshold 0 keeps every entry.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [L, T, N].")
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0.0 <= threshold <= 1.0
    ):
        raise ValueError(
            f"threshold={threshold!r} must lie in [0, 1]; use 0.5 (the paper's value)."
        )
    return combine_layers(scores, routing) >= threshold  # [T, N]


def entries_to_chunks(entry_mask: torch.Tensor, entries_per_chunk: int) -> torch.Tensor:
    """A chunk is selected when any of its entries is.

    entry_mask bool [..., N] -> bool [..., ceil(N / entries_per_chunk)].
    """
    _check_positive_int("entries_per_chunk", entries_per_chunk)
    n = entry_mask.shape[-1]
    n_chunks = -(-n // entries_per_chunk)
    pad = n_chunks * entries_per_chunk - n
    padded = torch.nn.functional.pad(entry_mask.to(torch.bool), (0, pad), value=False)
    return padded.view(*entry_mask.shape[:-1], n_chunks, entries_per_chunk).any(-1)


def selected_chunk_ids(
    entry_mask: torch.Tensor, entries_per_chunk: int
) -> torch.Tensor:
    """Ids of selected chunks of one query: bool [N] -> int64 [n_sel], ascending."""
    if entry_mask.dim() != 1:
        raise ValueError(
            f"entry_mask has shape {tuple(entry_mask.shape)}; expected [N] (one query)."
        )
    return entries_to_chunks(entry_mask, entries_per_chunk).nonzero().flatten()


__all__ = [
    "NATIVE_PARAM_NAMES",
    "PRESETS",
    "MemoryIndexer",
    "MemoryIndexerConfig",
    "apply_rope",
    "combine_layers",
    "entries_to_chunks",
    "hadamard_matrix",
    "native_indexer_state",
    "select",
    "selected_chunk_ids",
    "yarn_inv_freq",
]
