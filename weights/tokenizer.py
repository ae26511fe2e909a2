"""GPT-2's byte-level BPE tokenizer, built by tiktoken from the files shipped in
`weights/data/` (OpenAI's `encoder.json` and `vocab.bpe`), with no network access.

The sha256 of both files is checked at load, with the hashes tiktoken itself checks for its
`gpt2` encoding.
"""

from __future__ import annotations

import functools
import os

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenizer split (the regex of OpenAI's encoder.py, as tiktoken writes it).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The tiktoken Encoding for GPT-2 (cached: building the rank table takes ~1 s)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(DATA_DIR, "vocab.bpe"),
        encoder_json_file=os.path.join(DATA_DIR, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=50257,
    )


def encode(text: str, allow_eot: bool = False) -> list[int]:
    """Text -> token ids. `<|endoftext|>` in the text is the special token only with
    allow_eot=True; otherwise it is encoded as ordinary text (user text cannot forge it)."""
    enc = get_encoding()
    if allow_eot:
        return enc.encode(text, allowed_special={EOT_TOKEN})
    return enc.encode(text, disallowed_special=())


def check_ids(ids) -> list[int]:
    """ids as a list of Python ints in [0, n_vocab), or a ValueError naming the bad one
    (tiktoken itself raises KeyError, OverflowError or TypeError)."""
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"token id {i!r} is not an integer")
        if not 0 <= i <= EOT_ID:
            raise ValueError(f"token id {i} is outside GPT-2's vocabulary [0, {EOT_ID}]")
        out.append(int(i))
    return out


def decode(ids: list[int]) -> str:
    """Token ids -> text; bytes that are not valid UTF-8 (a token boundary inside a
    character) become U+FFFD."""
    return get_encoding().decode(check_ids(ids), errors="replace")


def decode_bytes(ids: list[int]) -> bytes:
    return get_encoding().decode_bytes(check_ids(ids))
