"""Training data: plain text cut into context windows, and Alpaca-style instruction records.

Shape legend: B = batch, T = tokens per row (context length).

Plain text: the token stream is split into train / validation (the last `val_fraction` of the
tokens is validation), then cut into windows of T + 1 tokens advancing by T; a window gives
inputs w[:-1] and targets w[1:].

Instructions: JSON records {instruction, input, output} are formatted with the Alpaca prompt
(Raschka, "Build a Large Language Model (From Scratch)", ch. 7), the response appended, then
<|endoftext|>. A batch is padded on the right with <|endoftext|> to its longest row; the
targets keep the first end token (the model must learn to stop) and ignore the padding after
it (-100), and with `mask_prompt` also every target inside the prompt. Right padding needs no
attention mask: causal attention never lets a real token see the padding after it.

Batches are drawn by index: micro-batch k of the run is a slice of epoch k // per_epoch's
permutation, seeded by (seed, epoch); the position in the data is the step alone, so a run
resumed at step s sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ref.config import parse_json, read_json
from ref.prompts import alpaca_prompt

EOT = 50256  # <|endoftext|>
IGNORE = -100  # targets the loss skips (torch's and crossentropy_forward's ignore_index)


class DataError(ValueError):
    """A data file is missing, malformed or too small; the message names the file."""


@dataclass
class Split:
    """One split of a data set: text windows (n, T + 1) or instruction examples."""

    kind: str  # "text" | "instruction"
    windows: np.ndarray | None = None  # text: (n, T + 1) ints (a view of the token stream)
    examples: list[tuple[list[int], int]] = field(default_factory=list)  # (tokens, prompt len)
    records: list[dict] = field(default_factory=list)  # instruction: the JSON records
    context_length: int = 0  # T: rows are cut to this many inputs

    def __len__(self) -> int:
        return len(self.windows) if self.kind == "text" else len(self.examples)


# ---------------------------------------------------------------------------------------------
# plain text


def _as_tokens(ids) -> np.ndarray:
    """A token stream as an integer array; an integer array (a uint16 memory map of a token
    file, say) is kept as it is, not copied."""
    a = np.asarray(ids)
    return a if a.dtype.kind in "iu" and a.ndim == 1 else np.asarray(ids, dtype=np.int64)


def text_windows(ids: np.ndarray, T: int) -> np.ndarray:
    """ids (n,) -> windows (n_win, T + 1) advancing by T; a stream shorter than T + 1 tokens
    gives one window of all of it. The windows are a read-only view of `ids` (consecutive
    windows share a token), so a memory-mapped token file larger than RAM stays on disk."""
    ids = _as_tokens(ids)
    if len(ids) < 2:
        raise DataError(f"need at least 2 tokens for a training window, got {len(ids)}")
    if len(ids) < T + 1:
        return ids[None, :]  # (1, n)
    n_win = (len(ids) - 1) // T
    step = ids.strides[0]
    return np.lib.stride_tricks.as_strided(
        ids, shape=(n_win, T + 1), strides=(T * step, step), writeable=False
    )  # (n_win, T + 1)


def text_splits(ids: list[int] | np.ndarray, T: int, val_fraction: float) -> tuple[Split, Split]:
    """Train and validation windows of a token stream (validation = its last fraction)."""
    ids = _as_tokens(ids)
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 2)
    if len(ids) - n_val < 2:
        raise DataError(
            f"{len(ids)} tokens leave too few for training after a validation fraction of "
            f"{val_fraction}"
        )
    train = Split("text", windows=text_windows(ids[: len(ids) - n_val], T), context_length=T)
    val = Split("text", windows=np.zeros((0, T + 1), np.int64), context_length=T)
    if n_val:
        val = Split("text", windows=text_windows(ids[len(ids) - n_val :], T), context_length=T)
    return train, val


# ---------------------------------------------------------------------------------------------
# instruction records


def read_instructions(path: str) -> list[dict]:
    """Load and check {instruction, input, output} records: a JSON list (.json), or one JSON
    object per line (.jsonl, blank lines skipped)."""
    if path.endswith(".jsonl"):
        return check_records(_read_jsonl(path), path)
    data = read_json(path, DataError)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of records")
    return check_records(data, path)


def _read_jsonl(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read UTF-8 text ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            # parse_json: the one JSON reader, with its cap on an integer's digits
            records.append(parse_json(line, DataError, f"{path}: line {n} is not valid JSON"))
    if not records:
        raise DataError(f"{path}: no records (every line is blank)")
    return records


def check_records(data: list, path: str) -> list[dict]:
    """Each record an object with string 'instruction' and 'output' (and 'input', if any)."""
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise DataError(f"{path}: record {i} needs a string {key!r}")
        if not isinstance(r.get("input", ""), str):
            raise DataError(f"{path}: record {i} has a non-string 'input'")
    return data


def encode_instruction(record: dict, encode) -> tuple[list[int], int]:
    """(prompt + response tokens, prompt length). Prompt and response are tokenised apart so
    the boundary is exact (the prompt is what generation is later given)."""
    prompt = encode(alpaca_prompt(record["instruction"], record.get("input", "")))
    return prompt + encode(record["output"]), len(prompt)


def instruction_splits(
    records: list[dict], encode, T: int, val_fraction: float
) -> tuple[Split, Split]:
    """Train / validation (the last `val_fraction` of the records, the book's in-order split)."""
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if len(records) - n_val < 1:
        raise DataError(f"{len(records)} records leave none for training")
    examples = [encode_instruction(r, encode) for r in records]
    cut = len(records) - n_val
    return (
        Split("instruction", examples=examples[:cut], records=records[:cut], context_length=T),
        Split("instruction", examples=examples[cut:], records=records[cut:], context_length=T),
    )


def instruction_batch(
    examples: list[tuple[list[int], int]], T: int, mask_prompt: bool = False, pad_id: int = EOT
) -> tuple[np.ndarray, np.ndarray]:
    """Pad and mask a batch of (tokens, prompt length) -> ids (B, T'), targets (B, T').

    Row r with n tokens gets one end token appended, then padding to the longest row + 1;
    ids = padded[:-1], targets = padded[1:]. Targets j < n - 1 predict the example's own
    tokens and j = n - 1 the end token; targets j >= n are padding and become -100, and with
    `mask_prompt` so do targets j < prompt_len - 1 (they predict prompt tokens). Rows are cut
    to T inputs, T' = min(longest, T): the longest row's end token is the target of its last
    input, and a column more would hold padding alone.
    """
    width = max(len(tok) for tok, _ in examples)  # the longest row + its end token, minus one
    ids = np.full((len(examples), width), pad_id, np.int64)  # (B, width): padded[:-1]
    targets = np.full((len(examples), width), IGNORE, np.int64)  # (B, width)
    for r, (tok, n_prompt) in enumerate(examples):
        n = len(tok)
        ids[r, :n] = tok
        targets[r, : n - 1] = tok[1:]
        targets[r, n - 1] = pad_id  # the first end token is a real target
        if mask_prompt:
            targets[r, : max(n_prompt - 1, 0)] = IGNORE
    return ids[:, :T], targets[:, :T]


# ---------------------------------------------------------------------------------------------
# batching by index


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; a split smaller than a batch is one
    batch of all of it)."""
    return max(n // batch_size, 1)


def batch_indices(n: int, batch_size: int, k: int, seed: int) -> np.ndarray:
    """Indices of micro-batch k (0-based, counted over the whole run)."""
    per_epoch = batches_per_epoch(n, batch_size)
    epoch, j = divmod(k, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)  # (n,)
    return perm[j * batch_size : (j + 1) * batch_size]


def make_batch(split: Split, indices, mask_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """ids (B, T), targets (B, T) for the rows `indices` of `split`."""
    if split.kind == "text":
        w = split.windows[np.asarray(indices)].astype(np.int64)  # (B, T + 1), a copy
        return w[:, :-1], w[:, 1:]
    ex = [split.examples[i] for i in indices]
    return instruction_batch(ex, split.context_length, mask_prompt)


def eval_batches(
    split: Split, batch_size: int, max_batches: int | None = None
) -> Iterator[list[int]]:
    """Row indices of the validation batches, in order, over the whole split (or its first
    `max_batches` batches)."""
    n_batches = math.ceil(len(split) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield list(range(b * batch_size, min((b + 1) * batch_size, len(split))))
