"""Forward hooks that make a transformers DeepSeek-V4 model obey chunk residency.

Installed on every CSA layer (no model code is copied or patched):

- `DeepseekV4Indexer` pre-hook: notes which layer and cache the call belongs to.
- `DeepseekV4IndexerScorer` hook: native logits of non-allowed entries become -inf,
  so the native top-k runs over allowed entries only (Eq. 6); it also records the
  scorer's hidden input (the attention input x of the layer, the Memory Indexer's
  h_t) and, for `quest`, picks the layer's pages from per-chunk key bounds.
- `DeepseekV4Indexer` hook: a pick of a non-allowed entry (possible when fewer
  than `index_topk` entries are allowed) becomes -1, which the CSA compressor turns
  into an -inf block bias: such an entry is never attended.
- `DeepseekV4Attention` hook (CSA layers): when recording, adds the last query's
  attention probability on each compressed entry to `attention_mass` (the oracle).

"Allowed" = resident in the LSACache (not cold) and, for quest, picked this step.

Every tensor the hooks make lives on the device of the tensors they see (the
model's), and the hooks never sync the device except for quest's per-step pick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DeepseekV4ForCausalLM

from vllm_flashmemory.reference.cache import LSACache, csa_layer_ids


@dataclass
class QuestState:
    """Quest page selection for one decode step (Tang et al. 2024, per-page bounds)."""

    # Historical chunks quest chooses from (the rest of the cache is always allowed).
    historical_chunks: tuple[int, ...]
    # Chunks kept per layer and step.
    budget_chunks: int
    # Union over layers of this step's picks (the chunks a per-step fetch would hold).
    picked: set[int] = field(default_factory=set)


@dataclass
class HookState:
    """What the hooks read and write during one forward; owned by the engine."""

    # Apply residency (False: the hooks pass everything through untouched).
    active: bool = False
    # Record each CSA layer's last-row scorer hidden input into `hidden`.
    record_hidden: bool = False
    # Accumulate attention mass of the last query row per compressed entry.
    record_attention: bool = False
    quest: QuestState | None = None
    # Per CSA slot: hidden input of the last query of the latest forward, [D].
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    # [T] attention probability summed over CSA layers, heads and recorded steps,
    # on the model's device (the engine resets it there).
    attention_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # Set by the indexer pre-hook for the scorer and indexer hooks of one call.
    _slot: int | None = None
    _cache: LSACache | None = None
    _allowed: torch.Tensor | None = None


class ResidencyHooks:
    """Context manager: installs the hooks on `model`; `state` steers them."""

    def __init__(self, model: DeepseekV4ForCausalLM) -> None:
        self.model = model
        self.csa_layers = csa_layer_ids(model.config)
        self.state = HookState(hidden=[None] * len(self.csa_layers))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # The attention module does not see its cache in a hook; the engine runs
        # one request at a time and sets it here.
        self.current_cache: LSACache | None = None

    def __enter__(self) -> ResidencyHooks:
        for slot, layer_id in enumerate(self.csa_layers):
            attn = self.model.model.layers[layer_id].self_attn
            indexer = attn.compressor.indexer
            self._handles += [
                indexer.register_forward_pre_hook(self._indexer_pre(slot)),
                indexer.scorer.register_forward_hook(self._scorer_hook),
                indexer.register_forward_hook(self._indexer_hook),
                attn.register_forward_hook(self._attention_hook),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- hooks ------------------------------------------------------------------

    def _indexer_pre(self, slot: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            # DeepseekV4CSACompressor calls indexer(hidden, q_residual, position_ids,
            # past_key_values, layer_idx) positionally.
            cache = args[3] if len(args) > 3 else None
            self.state._slot = slot
            self.state._cache = cache if isinstance(cache, LSACache) else None
            self.state._allowed = None

        return hook

    def _scorer_hook(
        self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        st = self.state
        q, k_icomp, hidden = inputs  # [B,S,H,Dk], [B,T,Dk], [B,S,D]
        slot = st._slot
        assert slot is not None, "scorer ran outside its indexer"
        if st.record_hidden:
            st.hidden[slot] = hidden[0, -1].detach().float().clone()  # [D]
        if not st.active or st._cache is None:
            return None
        n_entries = k_icomp.shape[1]
        quest = st.quest is not None and q.shape[1] == 1
        # Host-side check: nothing cold and no quest pick means nothing to mask.
        if not quest and not st._cache.has_cold:
            return None
        allowed = st._cache.entry_resident_mask(n_entries)  # [T], shared: no in-place
        if quest:
            allowed = allowed & self._quest_allowed(module, q, k_icomp, hidden, st._cache)
        st._allowed = allowed
        return output.masked_fill(~allowed.view(1, 1, -1), float("-inf"))  # [B,S,T]

    def _indexer_hook(
        self, module: torch.nn.Module, args: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        st = self.state
        allowed, st._allowed = st._allowed, None
        st._slot, st._cache = None, None
        if allowed is None:
            return None
        # output: [B, S, k] entry ids, -1 = invalid pick.
        safe = output.clamp(min=0)
        ok = (output >= 0) & allowed[safe]
        return torch.where(ok, output, torch.full_like(output, -1))

    def _attention_hook(
        self, module: torch.nn.Module, args: tuple, output: tuple
    ) -> None:
        st = self.state
        if not st.record_attention:
            return
        weights = output[1]  # [B, H, S, K_window + T]
        cache = self.current_cache
        if weights is None or cache is None:
            return
        n = cache.n_entries
        mass = weights[0, :, -1, weights.shape[-1] - n :].detach().float().sum(0)  # [T]
        if st.attention_mass.device != mass.device:
            st.attention_mass = st.attention_mass.to(mass.device)
        if st.attention_mass.numel() < n:
            grown = torch.zeros(n, device=mass.device)
            grown[: st.attention_mass.numel()] = st.attention_mass
            st.attention_mass = grown
        st.attention_mass[:n] += mass

    # ---- helpers ----------------------------------------------------------------

    def _quest_allowed(
        self,
        scorer: torch.nn.Module,
        q: torch.Tensor,
        k_icomp: torch.Tensor,
        hidden: torch.Tensor,
        cache: LSACache,
    ) -> torch.Tensor:
        """Quest: per-chunk upper bound of the indexer score, top-`budget` chunks.

        For each chunk, channel-wise key min/max give, per head, the largest
        (w_h > 0) or smallest (w_h < 0) reachable q_h . k; the bound is the
        indexer's own head-weighted ReLU sum (notes §2, Eq. 13-16 of DeepSeek-V4).
        """
        quest = self.state.quest
        assert quest is not None
        n_entries = k_icomp.shape[1]
        device = k_icomp.device
        chunks = quest.historical_chunks
        if not chunks:
            return torch.ones(n_entries, dtype=torch.bool, device=device)
        e = cache.entries_per_chunk
        idx = torch.tensor(chunks, device=device)
        whole = (n_entries // e) * e  # historical chunks are complete
        keys = k_icomp[0, :whole].float().view(-1, e, k_icomp.shape[-1])[idx]
        # keys: [C, E, Dk]
        kmin, kmax = keys.amin(1), keys.amax(1)  # [C, Dk]
        qv = q[0, -1].float()  # [H, Dk]
        lo = torch.minimum(qv[None] * kmin[:, None], qv[None] * kmax[:, None]).sum(-1)
        hi = torch.maximum(qv[None] * kmin[:, None], qv[None] * kmax[:, None]).sum(-1)
        w = scorer.weights_proj(hidden[0, -1]).float()  # [H]
        bound = torch.where(w > 0, w * hi.relu(), w * lo.relu()).sum(-1)  # [C]
        k = min(quest.budget_chunks, len(chunks))
        # Highest bound first; ties to the earlier chunk (stable sort).
        order = torch.sort(-bound, stable=True).indices[:k]
        picked = {chunks[i] for i in order.tolist()}  # the one sync per layer
        quest.picked |= picked
        dropped = [c for c in chunks if c not in picked]
        chunk_ok = torch.ones(-(-n_entries // e), dtype=torch.bool)
        if dropped:
            chunk_ok[dropped] = False
        return chunk_ok.repeat_interleave(e)[:n_entries].to(device)  # [T]


__all__ = ["ResidencyHooks", "HookState", "QuestState"]
