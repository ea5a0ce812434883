"""DeepSeek-V4 on transformers: tiny preset, official weight names, capture hooks.

Imports core and transformers; offline/ and reference/ build on it.
"""
