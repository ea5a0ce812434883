"""Capture the native Lightning Indexer's inputs and logits from a transformers forward.

A forward hook on each CSA layer's `DeepseekV4IndexerScorer` sees exactly what the
paper's indexer score (notes/deepseek_v4.md §2, V4 indexer eqs. 13-16) is computed
from: the rotated index queries q (from the layer's q_lora latent), the running
K^IComp of the layer (all compressed entries emitted so far, read from the cache),
and the layer's attention input x (after mHC pre-mix and attn_norm), which is also
the input of the indexer's weights_proj. Its output is the logit
I_{t,s} = sum_h w_{t,h} * ReLU(q_{t,h} . K^IComp_s) before any causal mask.

With `record_attention`, a forward hook on each CSA layer's attention also keeps the
main attention's probability on every compressed entry, averaged over heads: what
the layer actually read, after the native top-k (entries outside it get exactly 0).
It needs the eager attention, which returns its weights (`load_hf_model` sets it).

One-call prefill is quadratic in transformers (notes/deepseek_v4.md §7), so
`chunked_forward` feeds the sequence through the cache in chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DeepseekV4ForCausalLM, DynamicCache

logger = logging.getLogger(__name__)


@dataclass
class LayerCapture:
    """What one CSA layer's scorer saw in the latest forward call."""

    hidden: torch.Tensor  # [S, D] attention input x of the chunk's tokens
    k_icomp: torch.Tensor  # [T, Dk] every compressed index key emitted so far
    logits: torch.Tensor  # [S, T] unmasked native indexer logits
    q: torch.Tensor | None = None  # [S, H, Dk] rotated index queries (record_qw)
    weights: torch.Tensor | None = None  # [S, H] head weights incl. both scales
    # [S, T] main attention probability on each compressed entry, mean over heads
    # (record_attention); rows sum to <= 1, the rest sits on the sliding window.
    attention: torch.Tensor | None = None


@dataclass
class IndexerCapture:
    """Context manager: hooks every CSA layer's indexer scorer of `model`.

    `layers` holds, per CSA layer in model order, the capture of the latest call.
    """

    model: DeepseekV4ForCausalLM
    record_qw: bool = False
    record_attention: bool = False
    csa_layers: tuple[int, ...] = field(init=False)
    layers: list[LayerCapture | None] = field(init=False)
    _handles: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.csa_layers = csa_layer_ids(self.model)
        if not self.csa_layers:
            raise ValueError(
                "model has no compressed_sparse_attention layer, so there is no "
                "native indexer to capture; use a DeepSeek-V4 config with CSA layers."
            )
        self.layers = [None] * len(self.csa_layers)

    def __enter__(self) -> IndexerCapture:
        for slot, layer_id in enumerate(self.csa_layers):
            attn = self.model.model.layers[layer_id].self_attn
            scorer = attn.compressor.indexer.scorer
            self._handles.append(scorer.register_forward_hook(self._hook(slot)))
            if self.record_attention:
                self._handles.append(attn.register_forward_hook(self._attention_hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, slot: int):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            q, k_icomp, hidden = inputs  # [B,S,H,Dk], [B,T,Dk], [B,S,D]
            if q.shape[0] != 1:
                raise ValueError(
                    f"batch size {q.shape[0]} is not supported by IndexerCapture; "
                    "run one sequence at a time."
                )
            cap = LayerCapture(
                hidden=hidden[0].detach().float(),
                k_icomp=k_icomp[0].detach().float(),
                logits=output[0].detach().float(),  # [S, T]
            )
            if self.record_qw:
                cap.q = q[0].detach().float()
                w = module.weights_proj(hidden).float() * module.weights_scaling
                # softmax_scale is folded into w so logits = sum_h w_h ReLU(q_h.k).
                cap.weights = (w[0] * module.softmax_scale).detach()
            self.layers[slot] = cap

        return hook


    def _attention_hook(self, slot: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(
                    "the attention returned no weights, so IndexerCapture cannot "
                    "record attention; load the model with attn_implementation "
                    "'eager' (dsv4.checkpoint.load_hf_model does)."
                )
            cap = self.layers[slot]
            assert cap is not None, "the scorer runs inside the attention, before it"
            n = cap.k_icomp.shape[0]
            # [B, H, S, window + T]: the compressed entries are the last T columns.
            cap.attention = weights[0, :, :, weights.shape[-1] - n :].detach().float().mean(0)

        return hook


def csa_layer_ids(model: DeepseekV4ForCausalLM) -> tuple[int, ...]:
    return tuple(
        i for i, t in enumerate(model.config.layer_types)
        if t == "compressed_sparse_attention"
    )


def recompute_logits(q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """I_{t,s} = sum_h w_{t,h} ReLU(q_{t,h} . k_s): q [S,H,Dk], w [S,H], k [T,Dk] -> [S,T]."""
    return torch.einsum("sh,sht->st", weights, torch.relu(torch.einsum("shd,td->sht", q, k)))


def visible_entries(positions: torch.Tensor, compress_ratio: int = 4) -> torch.Tensor:
    """Number of compressed entries visible to each absolute position: (p + 1) // m."""
    return torch.div(positions + 1, compress_ratio, rounding_mode="floor")


def mask_to_doc(
    logits: torch.Tensor, positions: torch.Tensor, n_entries: int, compress_ratio: int = 4,
    fill: float = float("-inf"),
) -> torch.Tensor:
    """Pad [S, T] logits to [S, n_entries] and set invisible entries to `fill`
    (-inf for logits, 0 for probabilities)."""
    s, t = logits.shape
    out = logits.new_full((s, n_entries), fill)
    t_keep = min(t, n_entries)
    out[:, :t_keep] = logits[:, :t_keep]
    entry = torch.arange(n_entries, device=logits.device)
    visible = visible_entries(positions.to(logits.device), compress_ratio)
    invisible = entry[None, :] >= visible[:, None]
    return out.masked_fill(invisible, fill)


@torch.no_grad()
def chunked_forward(
    model: DeepseekV4ForCausalLM,
    input_ids: torch.Tensor,
    chunk_tokens: int,
    capture: IndexerCapture,
) -> Iterator[tuple[int, int]]:
    """Teacher-force `input_ids` [N] through the cache; yield (start, end) of each
    chunk right after its forward, while `capture.layers` holds that chunk."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D [N], got shape {tuple(input_ids.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be at least 1")
    cache = DynamicCache(config=model.config)
    n = input_ids.shape[0]
    for start in range(0, n, chunk_tokens):
        end = min(n, start + chunk_tokens)
        # logits_to_keep=1: the LM head output is not needed, only the hooks' data.
        model(
            input_ids=input_ids[None, start:end],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        yield start, end
