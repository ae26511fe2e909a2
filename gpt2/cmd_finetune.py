"""gpt2 finetune --model M --data FILE (.txt or .json) --out DIR [options] | --resume DIR

Full finetuning, or LoRA with --lora-rank R. Plain text (.txt) is cut into --context-length
windows; a .json file is a list of {instruction, input, output} records in the Alpaca format.
DIR receives a Hugging Face model directory (config.json + model.safetensors) that
`--model DIR` and transformers load, plus the optimizer state to resume from
(see weights/checkpoint.py). `--resume DIR` continues a run with its saved settings; only
--steps/--epochs (to extend it), --eval-every, --eval-batches, --save-every, --samples, --json
and --backend may differ.

--json prints one object per line: {"event": "train", step, loss, lr, grad_norm, tokens,
tokens_per_s}, {"event": "val", step, val_loss, val_perplexity}, {"event": "checkpoint", step,
dir}, {"event": "sample", prompt, response}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from gpt2.cli import UsageError, add_model_args
from weights.tokenizer import DATA_DIR

# Settings of a run: the flag defaults, and what a checkpoint stores for --resume.
DEFAULTS = {
    "model": "124M",
    "data": None,
    "steps": None,
    "epochs": None,
    "batch_size": 4,
    "grad_accum": 1,
    "lr": 1e-4,
    "warmup": 0,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.0,
    "decay": "matrices",
    "grad_clip": 1.0,
    "lora_rank": 0,
    "lora_alpha": None,
    "lora_dropout": 0.0,
    "lora_targets": "c_attn,c_proj",
    "eval_every": 0,
    "eval_batches": None,
    "save_every": 0,
    "seed": 0,
    "context_length": None,
    "val_fraction": 0.1,
    "mask_prompt": False,
    "samples": 3,
}
# The example data set shipped with the package: the book's instruction records.
DEFAULT_DATA = os.path.join(DATA_DIR, "instruction-data.json")
# The type of each setting, to check those a checkpoint brings back (a hand-edited or corrupt
# file must give a clear error, not a TypeError deep in training). None is allowed where the
# default is None.
_NUM = (int, float)
TYPES = {
    **{k: (int,) for k in ("steps", "batch_size", "grad_accum", "warmup", "lora_rank")},
    **{k: (int,) for k in ("eval_every", "eval_batches", "save_every", "seed", "samples")},
    **{k: _NUM for k in ("epochs", "lr", "min_lr_ratio", "weight_decay", "grad_clip")},
    **{k: _NUM for k in ("lora_alpha", "lora_dropout", "val_fraction")},
    **{k: (str,) for k in ("model", "data", "decay", "lora_targets")},
    "context_length": (int,),
    "mask_prompt": (bool,),
}
# May differ on --resume: they change neither the batches nor the arithmetic of a step.
RESUME_FREE = {"steps", "epochs", "eval_every", "save_every", "eval_batches", "samples"}


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="finetune on a text or instruction data set")
    add_model_args(p)
    # every default is None here so --resume can tell which flags were given
    p.set_defaults(model=None)
    a = p.add_argument
    a(
        "--data",
        help="training data: a UTF-8 .txt file or a .json list of "
        "{instruction, input, output} records (default: the 1,100 instruction records of "
        "'Build a Large Language Model (From Scratch)', ch. 7, shipped in weights/data/)",
    )
    a("--out", help="output directory (a checkpoint, loadable with --model DIR)")
    a("--resume", metavar="DIR", help="continue the run saved in DIR (written to DIR)")
    a("--steps", type=int, help="optimizer steps (default: --epochs 1)")
    a("--epochs", type=float, help="passes over the training split (instead of --steps)")
    a("--batch-size", type=int, help="rows per micro-batch (4)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (1)")
    a("--lr", type=float, help="peak learning rate (1e-4)")
    a("--warmup", type=int, help="linear warmup steps before the cosine decay (0)")
    a(
        "--min-lr-ratio",
        type=float,
        help="the cosine decays to this fraction of --lr (0.1); 1 keeps the rate constant",
    )
    a("--weight-decay", type=float, help="AdamW's decoupled weight decay (0)")
    a(
        "--decay",
        choices=["matrices", "matrices+embeddings", "all"],
        help="which tensors decay: the projection matrices (default), plus the embeddings, "
        "or all (biases and LayerNorm too, as llm.c does)",
    )
    a("--grad-clip", type=float, help="clip gradients to this global norm (1.0); 0: off")
    a("--lora-rank", type=int, help="train LoRA adapters of this rank (0: full finetuning)")
    a(
        "--lora-alpha",
        type=float,
        help="LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank)",
    )
    a("--lora-dropout", type=float, help="dropout on the adapters' input (0)")
    a(
        "--lora-targets",
        help="comma-separated projections to adapt: c_attn, c_proj, c_fc, "
        "mlp_c_proj (default c_attn,c_proj)",
    )
    a("--eval-every", type=int, help="validation loss every N steps (0: at the end only)")
    a("--eval-batches", type=int, help="at most this many validation batches per evaluation")
    a("--save-every", type=int, help="checkpoint every N steps (0: at the end only)")
    a("--seed", type=int, help="seed for batch order, adapter init and dropout (0)")
    a(
        "--context-length",
        type=int,
        help="tokens per row: text windows, instruction rows "
        "are cut to it (default: the model's context)",
    )
    a("--val-fraction", type=float, help="fraction of the data held out for validation (0.1)")
    a(
        "--mask-prompt",
        action="store_true",
        default=None,
        help="instruction data: leave the prompt out of the loss",
    )
    a("--samples", type=int, help="responses generated from validation prompts at the end (3)")
    a("--json", action="store_true", help="log one JSON object per line on stdout")
    p.set_defaults(run=run)


def _explicit(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def validate(s: dict) -> None:
    """Check every setting; messages name the flag. Needs no model."""
    from ref.lora import parse_targets

    _check(s["data"] is not None, "--data is required (a .txt or .json file)")
    _check(os.path.isfile(s["data"]), f"--data {s['data']}: file not found")
    _check(
        s["data"].endswith((".txt", ".json")),
        f"--data {s['data']}: expected a .txt (plain text) or .json (instructions) file",
    )
    _check(s["steps"] is None or s["epochs"] is None, "give --steps or --epochs, not both")
    _check(s["steps"] is None or s["steps"] >= 1, f"--steps must be >= 1, got {s['steps']}")
    _check(
        s["epochs"] is None or (math.isfinite(s["epochs"]) and s["epochs"] > 0),
        f"--epochs must be > 0, got {s['epochs']}",
    )
    for flag, key, lo in (
        ("--batch-size", "batch_size", 1),
        ("--grad-accum", "grad_accum", 1),
        ("--warmup", "warmup", 0),
        ("--lora-rank", "lora_rank", 0),
        ("--eval-every", "eval_every", 0),
        ("--save-every", "save_every", 0),
        ("--seed", "seed", 0),
        ("--samples", "samples", 0),
    ):
        _check(s[key] >= lo, f"{flag} must be >= {lo}, got {s[key]}")
    _check(
        s["eval_batches"] is None or s["eval_batches"] >= 1,
        f"--eval-batches must be >= 1, got {s['eval_batches']}",
    )
    _check(math.isfinite(s["lr"]) and 0 < s["lr"] < 1, f"--lr must be in (0, 1), got {s['lr']}")
    _check(
        0 <= s["min_lr_ratio"] <= 1, f"--min-lr-ratio must be in [0, 1], got {s['min_lr_ratio']}"
    )
    _check(
        math.isfinite(s["weight_decay"]) and s["weight_decay"] >= 0,
        f"--weight-decay must be >= 0, got {s['weight_decay']}",
    )
    _check(
        math.isfinite(s["grad_clip"]) and s["grad_clip"] >= 0,
        f"--grad-clip must be >= 0 (0 disables clipping), got {s['grad_clip']}",
    )
    _check(
        s["context_length"] is None or s["context_length"] >= 2,
        f"--context-length must be >= 2, got {s['context_length']}",
    )
    _check(0 <= s["val_fraction"] < 1, f"--val-fraction must be in [0, 1), got {s['val_fraction']}")
    if s["lora_rank"] == 0:
        for flag, key in (
            ("--lora-alpha", "lora_alpha"),
            ("--lora-dropout", "lora_dropout"),
            ("--lora-targets", "lora_targets"),
        ):
            _check(s[key] == DEFAULTS[key], f"{flag} needs --lora-rank >= 1")
        return
    _check(
        s["lora_alpha"] is None or (math.isfinite(s["lora_alpha"]) and s["lora_alpha"] > 0),
        f"--lora-alpha must be > 0, got {s['lora_alpha']}",
    )
    _check(0 <= s["lora_dropout"] < 1, f"--lora-dropout must be in [0, 1), got {s['lora_dropout']}")
    try:
        parse_targets(s["lora_targets"])
    except ValueError as e:
        raise UsageError(str(e)) from None


def settings(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """The run's settings (flags over defaults, or the checkpoint's on --resume) and the
    checkpoint's state when resuming."""
    given = _explicit(args)
    if args.resume is None:
        _check(args.out is not None, "--out DIR is required (or --resume DIR)")
        _check(
            not os.path.exists(args.out) or os.path.isdir(args.out),
            f"--out {args.out}: exists and is not a directory",
        )
        s = {**DEFAULTS, **given}
        if s["model"] is not None and os.path.exists(s["model"]):
            _check(
                os.path.realpath(s["model"]) != os.path.realpath(args.out),
                f"--out {args.out} is the --model directory; write the finetuned model elsewhere",
            )
            s["model"] = os.path.abspath(s["model"])
        s["data"] = os.path.abspath(s["data"] or DEFAULT_DATA)
        return s, None
    from weights import checkpoint

    _check(os.path.isdir(args.resume), f"--resume {args.resume}: no such directory")
    _check(
        args.out is None or os.path.realpath(args.out) == os.path.realpath(args.resume),
        "--out must be left out with --resume (the run continues in the --resume directory)",
    )
    state = checkpoint.read_state(args.resume)
    saved = state.get("settings")
    _check(isinstance(saved, dict), f"--resume {args.resume}: the checkpoint has no settings")
    for k, v in saved.items():
        ok = k in TYPES and (
            (v is None and DEFAULTS[k] is None)
            or (isinstance(v, TYPES[k]) and (bool in TYPES[k] or not isinstance(v, bool)))
        )
        _check(ok, f"--resume {args.resume}: the checkpoint's setting {k}={v!r} is invalid")
    s = {**DEFAULTS, **saved}
    for k, v in given.items():
        if k in RESUME_FREE:
            s[k] = v
            if k == "steps":
                s["epochs"] = None
            if k == "epochs":
                s["steps"] = None
        elif v != s[k]:
            flag = "--" + k.replace("_", "-")
            raise UsageError(
                f"{flag} {v} differs from the resumed run's {s[k]}; a resumed run "
                "keeps its settings (only --steps/--epochs, --eval-every, "
                "--save-every, --eval-batches, --samples may change)"
            )
    return s, state


def load_data(s: dict, n_ctx: int) -> tuple:
    """(train split, validation split) for the settings' data file."""
    from ref.data import DataError, instruction_splits, read_instructions, text_splits
    from weights.tokenizer import encode

    T = s["context_length"] or n_ctx
    _check(T <= n_ctx, f"--context-length must be in [2, {n_ctx}] for this model, got {T}")
    try:
        if s["data"].endswith(".json"):
            return instruction_splits(read_instructions(s["data"]), encode, T, s["val_fraction"])
        from gpt2.cmd_eval import read_text

        ids = encode(read_text(s["data"]), allow_eot=True)
        return text_splits(ids, T, s["val_fraction"])
    except DataError as e:
        raise UsageError(f"--data {e}") from None


def total_steps(s: dict, n_train: int) -> int:
    from ref.data import batches_per_epoch

    if s["steps"] is not None:
        return s["steps"]
    per_epoch = math.ceil(batches_per_epoch(n_train, s["batch_size"]) / s["grad_accum"])
    return max(1, math.ceil((s["epochs"] or 1.0) * per_epoch))


def lora_alpha(s: dict) -> float:
    """--lora-alpha, or the rank when it is not given (scale alpha / rank = 1)."""
    return float(s["lora_rank"]) if s["lora_alpha"] is None else s["lora_alpha"]


def build(s: dict, state: dict | None, resume_dir: str | None, cache_dir: str | None) -> tuple:
    """(cfg, params, TrainState or None): the model to train, from scratch or a checkpoint."""
    import numpy as np

    from ref.lora import add_lora, parse_targets, set_adapter_tensors
    from ref.train import TrainState, get_flat, param_names
    from weights import checkpoint, loader

    lora = s["lora_rank"] > 0
    source = resume_dir if (state is not None and not lora) else s["model"]
    cfg, params = loader.load(source, cache_dir=cache_dir)
    if lora:
        params = add_lora(
            params,
            parse_targets(s["lora_targets"]),
            s["lora_rank"],
            lora_alpha(s),
            s["lora_dropout"],
            np.random.default_rng([s["seed"], 2]),
        )
    if state is None:
        return cfg, params, None
    moments, adapters = checkpoint.read_optimizer(resume_dir, state)
    if lora:
        try:
            set_adapter_tensors(params, adapters)
        except ValueError as e:
            raise UsageError(f"--resume {resume_dir}: {e}") from None
    names = param_names(params, "lora" if lora else "all")
    if set(names) != set(moments["m"]):
        raise UsageError(f"--resume {resume_dir}: optimizer state does not match the model")
    trainable = {n: np.array(a, np.float32) for n, a in get_flat(params, names).items()}
    for n, a in trainable.items():
        for kind in ("m", "v"):  # a moment of another shape would broadcast without a word
            if moments[kind][n].shape != a.shape:
                raise UsageError(
                    f"--resume {resume_dir}: optimizer state {kind}/{n} has shape "
                    f"{moments[kind][n].shape}, the model's tensor {a.shape}"
                )
    opt = {"step": state["step"], "m": moments["m"], "v": moments["v"]}
    return cfg, params, TrainState(state["step"], trainable, opt)


def run(args: argparse.Namespace) -> int:
    from fast import NUMPY_BACKENDS, get_backend

    s, state = settings(args)
    validate(s)
    backend = args.backend or "ref"
    if backend not in NUMPY_BACKENDS:
        try:
            from fast.torch import train as torch_train
        except ModuleNotFoundError as e:
            if e.name != "fast.torch.train":
                raise
            raise UsageError(
                f"--backend {backend}: finetuning with torch/triton is not available "
                "(fast/torch/train.py is missing); use --backend ref or numba"
            ) from None
        for k, v in s.items():
            setattr(args, k, v)
        args.train = "lora" if s["lora_rank"] > 0 else "all"  # TrainConfig.train, as ref/train.py
        return int(torch_train.finetune(args) or 0)
    ops = get_backend(backend)
    out_dir = args.resume or args.out
    return _finetune(s, state, out_dir, args, ops)


def train_config(s: dict, steps: int):
    """The `ref.train.TrainConfig` of the run's settings."""
    from ref.train import TrainConfig

    return TrainConfig(
        steps=steps,
        batch_size=s["batch_size"],
        grad_accum=s["grad_accum"],
        lr=s["lr"],
        warmup=s["warmup"],
        min_lr_ratio=s["min_lr_ratio"],
        weight_decay=s["weight_decay"],
        decay=s["decay"],
        grad_clip=s["grad_clip"],
        eval_every=s["eval_every"],
        eval_batches=s["eval_batches"],
        save_every=s["save_every"],
        seed=s["seed"],
        mask_prompt=bool(s["mask_prompt"]),
        train="lora" if s["lora_rank"] > 0 else "all",
        n_samples=s["samples"],
    )


def checkpoint_state(s: dict, step: int, steps: int, n_train: int, last_loss: float | None) -> dict:
    """The training state a checkpoint stores: step, settings and where the data stands."""
    from ref.data import batches_per_epoch

    per_epoch = batches_per_epoch(n_train, s["batch_size"])
    consumed = step * s["grad_accum"]
    return {
        "step": step,
        "total_steps": steps,
        "settings": s,
        "data_position": {
            "micro_batches": consumed,
            "epoch": consumed // per_epoch,
            "batch_in_epoch": consumed % per_epoch,
        },
        "last_loss": last_loss,
    }


def saver(
    s: dict, cfg, steps: int, n_train: int, out_dir: str, last: dict, as_json: bool, **info
) -> Callable:
    """The trainers' `save(params, state)`: the merged model (HF layout), the optimizer state
    and data position, and for LoRA the adapters alone too; `info` joins trainer_state.json.
    `last` holds the latest train event (its loss is recorded)."""
    from ref.lora import adapter_tensors, lora_targets, merge_lora
    from weights import checkpoint

    lora = s["lora_rank"] > 0

    def save(p: dict, st) -> None:
        train_state = checkpoint_state(s, st.step, steps, n_train, last.get("loss"))
        train_state.update(info)
        adapters = adapter_tensors(p) if lora else None
        adapter_cfg = None
        if lora:
            adapter_cfg = {
                "rank": s["lora_rank"],
                "targets": lora_targets(p),
                "alpha": lora_alpha(s),
                "dropout": s["lora_dropout"],
                "base_model": s["model"],
            }
        checkpoint.save(
            out_dir,
            cfg,
            merge_lora(p) if lora else p,
            train_state,
            {"m": st.opt["m"], "v": st.opt["v"]},
            adapters,
            adapter_cfg,
        )
        if as_json:
            print(json.dumps({"event": "checkpoint", "step": st.step, "dir": out_dir}), flush=True)

    return save


def _finetune(s: dict, state: dict | None, out_dir: str, args, ops) -> int:
    from gpt2.progress import Progress
    from ref.train import train
    from weights.tokenizer import decode

    cfg, params, tstate = build(s, state, args.resume, args.cache_dir)
    train_split, val_split = load_data(s, cfg.n_ctx)
    steps = total_steps(s, len(train_split))
    if tstate is not None and tstate.step >= steps:
        raise UsageError(
            f"--resume {args.resume}: the run is already at step {tstate.step} of "
            f"{steps}; pass a larger --steps to continue"
        )
    tcfg = train_config(s, steps)
    bar = Progress(steps, desc="finetune", unit=" step", enabled=False if args.json else None)
    bar.set(tstate.step if tstate else 0)
    last: dict = {}

    def on_event(e: dict) -> None:
        if e["event"] == "train":
            last.update(e)
            bar.set(e["step"], f"loss {e['loss']:.4f} {e['tokens_per_s']:.0f} tok/s")
        if args.json:
            if e["event"] == "sample":
                e = {**e, "prompt": decode(e["prompt"]), "response": decode(e["response"])}
            print(json.dumps(e), flush=True)
        elif e["event"] == "val":
            if bar.enabled:
                bar.close()  # end the bar's line before printing
            print(
                f"step {e['step']}: val loss {e['val_loss']:.4f} "
                f"perplexity {e['val_perplexity']:.2f}",
                flush=True,
            )
        elif e["event"] == "sample":
            print(f"--- {decode(e['prompt'])!r}\n{decode(e['response'])}", flush=True)

    save = saver(s, cfg, steps, len(train_split), out_dir, last, args.json)
    try:
        train(
            params,
            cfg,
            train_split,
            val_split,
            tcfg,
            ops=ops,
            state=tstate,
            on_event=on_event,
            save=save,
        )
    except FloatingPointError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    if not args.json:
        print(f"saved {out_dir} (step {steps})", file=sys.stderr)
    return 0
