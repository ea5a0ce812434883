"""vllm-flashmemory: Lookahead Sparse Attention (LSA) for DeepSeek-V4 on vLLM."""

__version__ = "0.1.0"
