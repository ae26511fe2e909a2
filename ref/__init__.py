"""The executable spec: GPT-2 in plain numpy.

Modules, in reading order:
    config.py   -- the hyperparameters of the four released sizes
    ops.py      -- every op as a `*_forward` / `*_backward` pair (the backend contract)
    model.py    -- the forward pass, batched, with a KV cache and padding masks
    generate.py -- the decoding loop
    evaluate.py -- cross-entropy / perplexity over a long token stream

Nothing in ref/ imports anything but numpy and the standard library.
"""
