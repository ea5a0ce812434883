"""vllm-flashmemory: Lookahead Sparse Attention (LSA) for DeepSeek-V4 on vLLM."""

__version__ = "0.1.0"

import os as _os

# Run from a checkout with PYTHONPATH=<repo> (not installed), resolve the subpackages
# pyproject.toml maps from top-level folders (package-dir): vllm_flashmemory.triton_ops
# -> triton_ops/ and vllm_flashmemory.connectors -> connectors/. A wheel install has
# no pyproject.toml beside the package, so nothing changes there; an editable install
# already maps these names to the same folders.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "triton_ops", "__init__.py")
):
    __path__.append(_root)  # noqa: F821  (the package's search path)
del _os, _root
