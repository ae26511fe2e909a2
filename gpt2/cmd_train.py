"""gpt2 train --data FILE --out DIR (--config NAME | --n-layer L --n-head H --n-embd C
--n-ctx T) [options] | --resume DIR

Pretraining from GPT-2's initialisation (ref/init.py), as "Build a Large Language Model (From
Scratch)", chapter 5, does: the architecture of a released size (--config 124M) or of given
dimensions, GPT-2's vocabulary, on any UTF-8 text, tokenized once into DIR/tokens.u16 (a
memory map: a corpus larger than RAM trains). The rest is `gpt2 finetune`'s: the trainers and
their flags, checkpoints that `--model DIR` and transformers load, --resume, Ctrl-C, DDP under
torchrun, the same output. DIR/log.jsonl holds a line per step and DIR/loss.png the curves;
with --samples (default 1) a greedy sample is printed at each evaluation.
"""

from __future__ import annotations

import argparse

from gpt2 import finetune
from gpt2.cli import add_backend_args
from gpt2.cmd_finetune import add_run_args
from gpt2.cmd_finetune import run as run_training


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a GPT-2 from scratch on a text file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backend_args(p)
    a = p.add_argument
    a("--data", help="training text: any UTF-8 file (its last --val-fraction validates)")
    a("--config", help="the architecture of a released size: 124M 355M 774M 1558M")
    a("--n-layer", type=int, help="blocks (over --config's)")
    a("--n-head", type=int, help="attention heads (n_embd must divide by it)")
    a("--n-embd", type=int, help="channels")
    a("--n-ctx", type=int, help="context: positions of wpe (the book uses 256)")
    a(
        "--untied-head",
        action="store_true",
        help="an LM head of its own, not wte (transformers' tie_word_embeddings=false; the book's)",
    )
    a("--init", dest="init_scheme", choices=("gpt2", "pytorch"), default=None,
      help="gpt2: GPT-2's N(0, 0.02) (default); pytorch: torch.nn's defaults, the book's GPTModel "
      "(needs --untied-head; see ref/init.py)")  # fmt: skip
    add_run_args(p, finetune.TRAIN_DEFAULTS)
    p.set_defaults(run=run_training, model=None, lora_rank=None, lora_alpha=None)
    p.set_defaults(lora_dropout=None, lora_targets=None, mask_prompt=None)
