"""gpt2-spec's Python API (the CLI is built on it).

import gpt2
model = gpt2.load("124M")                       # or a directory / .safetensors file
ids = gpt2.encode("Alan Turing theorized that")
logits = model.forward(np.array([ids]))         # (1, T, 50257)
print(gpt2.generate(model, "The dog", max_new_tokens=20)[0].text)
print(gpt2.evaluate(model, open("book.txt").read()).perplexity)
"""

from gpt2.api import GenerateResult, Model, evaluate, generate, generate_batch, instruct, load
from weights.tokenizer import decode, encode

__all__ = [
    "GenerateResult",
    "Model",
    "decode",
    "encode",
    "evaluate",
    "generate",
    "generate_batch",
    "instruct",
    "load",
]
