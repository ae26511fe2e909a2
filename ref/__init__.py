"""The executable spec: GPT-2 in plain numpy.

Modules, in reading order:
    config.py   -- the hyperparameters of the four released sizes
    ops.py      -- every op as a `*_forward` / `*_backward` pair (the backend contract)
    model.py    -- the forward pass, batched, with a KV cache and padding masks
    sampling.py -- the sampler: logit bias, penalties, temperature, top-k/top-p/min-p, draws
    generate.py -- the decoding loops: sampling and beam search, batched, with stop strings
    prompts.py  -- the Alpaca instruction prompt
    lora.py     -- LoRA adapters
    backward.py -- the whole model's backward
    optim.py    -- AdamW, warmup + cosine schedule, clipping
    data.py     -- text windows and instruction batches
    train.py    -- the finetuning loop
    evaluate.py -- cross-entropy / perplexity over a long token stream

Nothing in ref/ imports anything but numpy and the standard library.
"""
