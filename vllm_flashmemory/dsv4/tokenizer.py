"""Byte-level tokenizer of the tiny model: 3 specials + one id per byte.

A byte vocabulary keeps the embedding at 259 rows (DeepSeek-V4's is 129,280) while
still encoding any text; it is saved as tokenizer.json so `AutoTokenizer` and vLLM
load it offline. Ids: 0 BOS, 1 EOS (DeepSeek-V4's ids), 2 PAD, 3 + b for byte b.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>"
N_SPECIAL = 3
BYTE_VOCAB_SIZE = N_SPECIAL + 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (ByteLevel's alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tokenizer() -> Tokenizer:
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = N_SPECIAL + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    # DeepSeek-V4 prompts start with BOS; vLLM and AutoTokenizer add it the same way.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
    )
    return tok


def save_tokenizer(out_dir: str | os.PathLike[str]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tokenizer.json.tmp"
    build_tokenizer().save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 65536,
        "clean_up_tokenization_spaces": False,
    }
    tmp = out / ".tokenizer_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "tokenizer_config.json")
    gen = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
    tmp = out / ".generation_config.json.tmp"
    tmp.write_text(json.dumps(gen, indent=2) + "\n")
    os.replace(tmp, out / "generation_config.json")
