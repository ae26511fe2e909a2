"""Prompt templates: the Alpaca format used for instruction finetuning.

The format of "Build a Large Language Model (From Scratch)", chapter 7 (Stanford Alpaca's
template): a preamble, the instruction, the optional input, then the response header that the
model completes.
"""

from __future__ import annotations

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"
# Where a model that keeps going after its answer starts the next example.
INSTRUCTION_STOP = "### Instruction"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt for `instruction` (and `input`, left out when empty), ending with the
    response header: the text the model continues with its answer."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + RESPONSE_HEADER
