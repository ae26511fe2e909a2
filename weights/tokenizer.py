"""GPT-2's byte-level BPE tokenizer, built by tiktoken from the files shipped in
`weights/data/` (OpenAI's `encoder.json` and `vocab.bpe`), with no network access.

The sha256 of both files is checked at load, with the hashes tiktoken itself checks for its
`gpt2` encoding.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

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


TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the bytes of int32


def encode_file(
    src: str,
    dest: str,
    allow_eot: bool = True,
    chunk_bytes: int = 1 << 20,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Tokenize the UTF-8 text file `src` into `dest`, a flat file of uint16 ids that
    `np.memmap(dest, np.uint16, mode="r")` reads back, in one streaming pass: a corpus larger
    than RAM is fine. Returns the number of tokens.

    The text is read in pieces of about `chunk_bytes`, each ending just after a line break
    with a visible character on both sides (x, line break, Y): GPT-2's pre-tokenizer makes
    that line break a piece of its own whether or not the text goes on, so the pieces' tokens
    are exactly the whole text's, and decoding the file gives the text back.
    `progress(bytes_done, bytes_total)` is told as it goes. `dest` is
    written to a temporary file and renamed when complete: a cut-short run leaves no partial
    token file behind. Raises UnicodeDecodeError or OSError for the caller to name.
    """
    import codecs

    total = os.path.getsize(src)
    tmp = f"{dest}.tmp-{os.getpid()}"
    n, done = 0, 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(src, "rb") as f, open(tmp, "wb") as out:
            pending = ""
            while True:
                raw = f.read(chunk_bytes)
                done += len(raw)
                text = pending + decoder.decode(raw, final=not raw)
                cut = _safe_cut(text) if raw else len(text)
                piece, pending = text[:cut], text[cut:]
                if piece:
                    ids = np.asarray(encode(piece, allow_eot=allow_eot), TOKEN_DTYPE)
                    out.write(ids.tobytes())
                    n += len(ids)
                if progress is not None:
                    progress(done, total)
                if not raw:
                    break
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def _safe_cut(text: str) -> int:
    """Where to end a piece of `text` without changing its tokens: after the last line break
    with a non-space character on both sides (0: nowhere, read more first)."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i <= 0:
            return 0
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
