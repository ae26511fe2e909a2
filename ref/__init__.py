"""The executable spec: GPT-2 in plain numpy.

Modules, in reading order:
    config.py   -- the hyperparameters of the four released sizes
    ops.py      -- every op as a `*_forward` / `*_backward` pair (the backend contract)
    lora.py     -- LoRA adapters, and the linear layer with or without one (forward, backward)
    model.py    -- the model as forward/backward pairs (attention, MLP, block, whole model),
                   batched, with a KV cache and padding masks; the loss; the `Model` interface
    sampling.py -- the sampler: logit bias, penalties, temperature, top-k/top-p/min-p, draws
    generate.py -- the decoding loop: sampling and greedy, batched, with stop strings
    beam.py     -- beam search and beam sampling
    prompts.py  -- the Alpaca instruction prompt
    optim.py    -- AdamW, warmup + cosine schedule, clipping
    data.py     -- text windows and instruction batches
    train.py    -- the finetuning loop
    evaluate.py -- cross-entropy / perplexity over a long token stream

Nothing in ref/ imports anything but numpy and the standard library.
"""
