"""Write-then-rename, so no checkpoint, shard or manifest is ever half-written.

A reader (another process, a resumed run) sees either the old file or the new
one, never a prefix: the bytes go to a temp file in the destination folder and
`os.replace` swaps it in atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    dest: str | os.PathLike[str], write: Callable[[str], object], *, suffix: str = ".tmp"
) -> Path:
    """Call `write(tmp_path)`, then rename the result onto `dest`.

    `suffix` keeps writers that pick the format from the name (matplotlib) happy.
    On any error the temp file is removed and `dest` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600; the server (vLLM) may run as another user.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(dest, lambda p: Path(p).write_text(text))


def atomic_save_tensors(dest: str | os.PathLike[str], tensors: dict, metadata: dict | None = None) -> Path:
    """safetensors file written atomically (tensors made contiguous first)."""
    from safetensors.torch import save_file

    flat = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(dest, lambda p: save_file(flat, p, metadata=metadata))
