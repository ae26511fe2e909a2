"""A training run of `gpt2 finetune` or `gpt2 train`: its settings (flags over defaults, or a
checkpoint's on --resume), the model and data they name, and one function, `run`, that trains
on any backend and saves checkpoints.

`finetune` starts from a model (--model); `train` from GPT-2's initialisation (ref/init.py)
of an architecture given by a size name or by its dimensions (the settings' "init"), on text
tokenized once into a memory-mapped uint16 file in the output directory (`tokens.u16`), so a
corpus larger than RAM trains. Everything else is shared: the trainers, checkpoints, resume,
Ctrl-C, the event stream, and the run's log (`log.jsonl`, `loss.png`, see gpt2/runlog.py).

The numpy trainer (`ref.train.train`, --backend ref|numba) and the torch one
(`fast.torch.train.train`, --backend torch|triton, data-parallel under torchrun) take the same
TrainConfig, the same data splits and the same `save(params, state)`, and emit the same
events; `run` passes every event, and the checkpoint events of its saver, to one `on_event`.
A checkpoint saved by one backend resumes on another (weights/checkpoint.py).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading
from collections.abc import Callable

from gpt2.cli import UsageError
from gpt2.runlog import RunLog
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
    # also keep the model of the evaluated save with the lowest validation loss in OUT/best/
    "keep_best": False,
    "seed": 0,
    "context_length": None,
    "val_fraction": 0.1,
    "mask_prompt": False,
    "samples": 3,
    # model dropout (embeddings, attention probabilities, residual branches); each of the
    # three, when not given, is `dropout`
    "dropout": 0.0,
    "embd_dropout": None,
    "attn_dropout": None,
    "resid_dropout": None,
    # `gpt2 train`: the architecture to initialise ({n_layer, n_head, n_embd, n_ctx,
    # tie_word_embeddings} and the init scheme of ref/init.py); None
    # for finetuning, which starts from --model
    "init": None,
}
# `gpt2 train`'s defaults: the book's pretraining run (ch. 5: AdamW 4e-4, weight decay 0.1),
# a sample at each evaluation; no model to start from.
TRAIN_DEFAULTS = {**DEFAULTS, "model": None, "lr": 4e-4, "weight_decay": 0.1, "samples": 1}
ARCH = ("n_layer", "n_head", "n_embd", "n_ctx")
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
    **{k: _NUM for k in ("dropout", "embd_dropout", "attn_dropout", "resid_dropout")},
    **{k: (str,) for k in ("model", "data", "decay", "lora_targets")},
    "context_length": (int,),
    "mask_prompt": (bool,),
    "keep_best": (bool,),
    "init": (dict,),
}
# May differ on --resume: they change neither the batches nor the arithmetic of a step.
RESUME_FREE = {"steps", "epochs", "eval_every", "save_every", "eval_batches", "samples"}
RESUME_FREE |= {"keep_best"}


def _explicit(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}


def dropout_rates(s: dict) -> tuple[float, float, float]:
    """(embd, attn, resid): each its own flag, else --dropout."""
    return tuple(
        s["dropout"] if s[k] is None else s[k]
        for k in ("embd_dropout", "attn_dropout", "resid_dropout")
    )


def architecture(args: argparse.Namespace) -> dict:
    """`gpt2 train`'s {n_layer, n_head, n_embd, n_ctx}: --config's, with any of --n-layer,
    --n-head, --n-embd, --n-ctx over it (alone they need all four)."""
    from ref.config import SIZES, ConfigError, GPT2Config, canonical_size

    arch: dict = {}
    if args.config is not None:
        size = canonical_size(args.config)
        _check(size is not None, f"--config {args.config}: unknown; expected {', '.join(SIZES)}")
        arch = {k: getattr(SIZES[size], k) for k in ARCH}
    for k in ARCH:
        if getattr(args, k) is not None:
            arch[k] = getattr(args, k)
    missing = [f"--{k.replace('_', '-')}" for k in ARCH if k not in arch]
    _check(not missing, f"give --config NAME or all of {', '.join(missing)}")
    for k in ARCH:
        lo = 2 if k == "n_ctx" else 1
        _check(arch[k] >= lo, f"--{k.replace('_', '-')} must be >= {lo}, got {arch[k]}")
    _check(
        arch["n_embd"] % arch["n_head"] == 0,
        f"--n-embd {arch['n_embd']} is not divisible by --n-head {arch['n_head']}",
    )
    arch["tie_word_embeddings"] = not getattr(args, "untied_head", False)
    try:
        GPT2Config(**arch)
    except ConfigError as e:  # absurd sizes
        raise UsageError(f"the architecture: {e}") from None
    scheme = getattr(args, "init_scheme", None) or "gpt2"
    _check(
        scheme != "pytorch" or not arch["tie_word_embeddings"],
        "--init pytorch needs --untied-head: its N(0, 1) embeddings as the LM head would give "
        "logits of std ~sqrt(n_embd) (see ref/init.py)",
    )
    return {**arch, "scheme": scheme}


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def validate(s: dict) -> None:
    """Check every setting; messages name the flag. Needs no model."""
    from ref.lora import parse_targets

    _check(s["data"] is not None, "--data is required (a text or instruction file)")
    _check(os.path.isfile(s["data"]), f"--data {s['data']}: file not found")
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
    for key in ("dropout", "embd_dropout", "attn_dropout", "resid_dropout"):
        v = s[key]
        flag = "--" + key.replace("_", "-")
        _check(v is None or 0 <= v < 1, f"{flag} must be in [0, 1), got {v}")
    if s["init"] is not None:
        _check(
            not is_instructions(s["data"]),
            f"--data {s['data']}: gpt2 train pretrains on text; instruction records are for "
            "gpt2 finetune",
        )
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
    checkpoint's state when resuming. `args.command` is "finetune" or "train"."""
    given = _explicit(args)
    training = getattr(args, "command", "finetune") == "train"
    defaults = TRAIN_DEFAULTS if training else DEFAULTS
    if training and args.resume is None:
        given["init"] = architecture(args)
    elif training:
        _check(
            args.config is None
            and all(getattr(args, k) is None for k in ARCH)
            and not getattr(args, "untied_head", False)
            and getattr(args, "init_scheme", None) is None,
            "the architecture flags must be left out with --resume (the run keeps its model)",
        )
    if args.resume is None:
        _check(args.out is not None, "--out DIR is required (or --resume DIR)")
        _check(
            not os.path.exists(args.out) or os.path.isdir(args.out),
            f"--out {args.out}: exists and is not a directory",
        )
        _check(
            not os.path.isdir(args.out) or not os.listdir(args.out) or args.overwrite,
            f"--out {args.out} is not empty; pass --overwrite to write the new run there, or "
            f"--resume {args.out} to continue the run saved in it",
        )
        s = {**defaults, **given}
        if s["model"] is not None and os.path.exists(s["model"]):
            _check(
                os.path.realpath(s["model"]) != os.path.realpath(args.out),
                f"--out {args.out} is the --model directory; write the finetuned model elsewhere",
            )
            s["model"] = os.path.abspath(s["model"])
        _check(not training or s["data"] is not None, "--data is required (a text file)")
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
            (v is None and defaults[k] is None)
            or (isinstance(v, TYPES[k]) and (bool in TYPES[k] or not isinstance(v, bool)))
        )
        _check(ok, f"--resume {args.resume}: the checkpoint's setting {k}={v!r} is invalid")
    _check(
        (saved.get("init") is not None) == training,
        f"--resume {args.resume}: that run was made by gpt2 "
        f"{'train' if saved.get('init') is not None else 'finetune'}; resume it with that command",
    )
    s = {**defaults, **saved}
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


def read_data(s: dict, out_dir: str | None = None, quiet: bool = False):
    """The --data file read and checked (instruction records, or UTF-8 text), before any
    model is: a bad file is refused without waiting for weights. For `gpt2 train` (and
    `out_dir`), the text is tokenized once into out_dir/tokens.u16, memory-mapped."""
    from ref.data import DataError, read_instructions

    path = s["data"]
    if s["init"] is not None and out_dir is not None:
        return token_file(path, out_dir, quiet)
    try:
        if is_instructions(path):
            return read_instructions(path)
        from gpt2.cmd_eval import read_text

        return read_text(path)
    except DataError as e:
        raise UsageError(f"--data {_named(str(e), path)}") from None
    except UsageError as e:
        raise UsageError(f"--data {e}") from None


def _named(msg: str, path: str) -> str:
    return msg if msg.startswith(path) else f"{path}: {msg}"  # every message names the file


TOKENS = "tokens.u16"  # `gpt2 train`'s token file in the output directory
TOKENS_META = "tokens.json"  # which text it holds (path, size, mtime) and how many tokens


def token_file(path: str, out_dir: str, quiet: bool = False):
    """The text at `path` as a read-only uint16 memory map of its tokens, from
    out_dir/tokens.u16, made in one streaming pass (with a bar) unless it is there already for
    the same file (same size and mtime)."""
    import json

    import numpy as np

    from gpt2.progress import Progress
    from weights.checkpoint import write_json
    from weights.tokenizer import TOKEN_DTYPE, encode_file

    st = os.stat(path)
    want = {"data": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    dest, meta_path = os.path.join(out_dir, TOKENS), os.path.join(out_dir, TOKENS_META)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        fresh = {k: meta.get(k) for k in want} == want
        fresh = fresh and os.path.getsize(dest) == 2 * meta["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if not fresh:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out_dir}: cannot create the directory ({e})") from None
        bar = Progress(st.st_size, desc="tokenize", unit="B", enabled=False if quiet else None)
        try:
            n = encode_file(path, dest, progress=lambda done, total: bar.set(done))
        except UnicodeDecodeError as e:
            raise UsageError(f"--data {path}: not UTF-8 text ({e})") from None
        except OSError as e:
            raise UsageError(f"--data {path}: cannot tokenize into {dest} ({e})") from None
        finally:
            bar.close()
        write_json(meta_path, {**want, "tokens": n})
    if os.path.getsize(dest) < 4:
        raise UsageError(f"--data {path}: needs at least 2 tokens to train on")
    return np.memmap(dest, dtype=TOKEN_DTYPE, mode="r")


def load_data(s: dict, n_ctx: int, data=None) -> tuple:
    """(train split, validation split) for the settings' data (`read_data`'s, or read here)."""
    from ref.data import DataError, instruction_splits, text_splits
    from weights.tokenizer import encode

    T = s["context_length"] or n_ctx
    _check(T <= n_ctx, f"--context-length must be in [2, {n_ctx}] for this model, got {T}")
    data = read_data(s) if data is None else data
    try:
        if isinstance(data, list):
            return instruction_splits(data, encode, T, s["val_fraction"])
        ids = data if not isinstance(data, str) else encode(data, allow_eot=True)
        return text_splits(ids, T, s["val_fraction"])
    except DataError as e:
        raise UsageError(f"--data {_named(str(e), s['data'])}") from None


def is_instructions(path: str) -> bool:
    """.json (a list) and .jsonl (a record per line) are instruction records; any other
    file is UTF-8 text."""
    return path.endswith((".json", ".jsonl"))


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

    from gpt2.progress import download_bar, note
    from ref.lora import add_lora, parse_targets, set_adapter_tensors
    from ref.train import TrainState, get_flat, param_names
    from weights import checkpoint, loader

    lora = s["lora_rank"] > 0
    if s["init"] is not None and state is None:  # gpt2 train: GPT-2's initialisation
        from ref.config import GPT2Config
        from ref.init import init_params

        arch = {k: v for k, v in s["init"].items() if k != "scheme"}
        cfg = GPT2Config(**arch)
        rng = np.random.default_rng([s["seed"], 3])
        return cfg, init_params(cfg, rng, scheme=s["init"].get("scheme", "gpt2")), None
    source = resume_dir if (state is not None and not lora) else s["model"]
    cfg, params = loader.load(source, cache_dir=cache_dir, progress=download_bar(), notify=note)
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


def train_config(s: dict, steps: int):
    """The `ref.train.TrainConfig` of the run's settings."""
    from ref.train import TrainConfig

    same = ("batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay", "decay")
    same += ("grad_clip", "eval_every", "eval_batches", "save_every", "seed")
    return TrainConfig(
        steps=steps,
        **{k: s[k] for k in same},
        mask_prompt=bool(s["mask_prompt"]),
        train="lora" if s["lora_rank"] > 0 else "all",
        n_samples=s["samples"],
        sample_at_eval=s["init"] is not None,
        dropout=dropout_rates(s),
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
    s: dict,
    cfg,
    steps: int,
    n_train: int,
    out_dir: str,
    last: dict,
    emit: Callable[[dict], None],
    **info,
) -> Callable:
    """The trainers' `save(params, state)`: the merged model (HF layout), the optimizer state
    and data position, and for LoRA the adapters alone too; `info` joins trainer_state.json.
    `last` holds the latest train event (its loss is recorded); each save emits
    {"event": "checkpoint", step, dir}."""
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
        emit({"event": "checkpoint", "step": st.step, "dir": out_dir})

    return save


class Best:
    """--keep-best: OUT/best/ holds the model (config.json, model.safetensors, best.json with
    its step and validation loss) of the saved step whose validation loss is the lowest so far.
    Only steps that are both evaluated and saved compete (--eval-every and --save-every
    aligned); each new best is written whole before it replaces the old (atomic files, the
    model last). A resumed run reads best.json and goes on from its figure."""

    def __init__(self, out_dir: str, cfg, emit: Callable[[dict], None]):
        self.dir, self.cfg, self.emit = os.path.join(out_dir, "best"), cfg, emit
        self.loss, self.val = math.inf, None  # the best so far; the last evaluation (step, loss)
        path = os.path.join(self.dir, "best.json")
        if os.path.exists(path):
            from ref.config import read_json

            saved = read_json(path, UsageError, "best.json")
            loss = saved.get("val_loss") if isinstance(saved, dict) else None
            _check(isinstance(loss, (int, float)), f"{path}: no val_loss number; remove it")
            self.loss = float(loss)

    def seen(self, e: dict) -> None:
        self.val = (e["step"], e["val_loss"])

    def offer(self, params: dict, step: int, lora: bool) -> None:
        if self.val is None or self.val[0] != step or not self.val[1] < self.loss:
            return
        from ref.lora import merge_lora
        from weights import checkpoint
        from weights import safetensors as st

        os.makedirs(self.dir, exist_ok=True)
        self.loss = self.val[1]
        record = {"step": step, "val_loss": self.loss}
        checkpoint.write_json(os.path.join(self.dir, "config.json"), self.cfg.to_hf_config())
        tensors = checkpoint.hf_tensors(merge_lora(params) if lora else params)
        st.write(os.path.join(self.dir, "model.safetensors"), tensors, metadata={"format": "pt"})
        checkpoint.write_json(os.path.join(self.dir, "best.json"), record)
        self.emit({"event": "best", **record, "dir": self.dir})


def run(
    s: dict,
    state: dict | None,
    *,
    out_dir: str,
    resume: str | None,
    backend: str,
    cache_dir: str | None,
    on_event: Callable[[dict], None],
    quiet: bool = False,
) -> bool:
    """Train with the run's settings `s` (from `settings`) on `backend`, saving into `out_dir`.
    Returns True when Ctrl-C stopped the run (after saving the last step it finished).

    Events, in order: {"event": "start", step, steps, backend, world_size} (the step it starts
    from), then the trainer's "train", "val" and "sample" events and a {"event": "checkpoint",
    step, dir} after each save; on Ctrl-C {"event": "interrupt"} at once, and the trainer's
    {"event": "interrupted", step} once the step is saved. Under torchrun only rank 0 emits
    and saves.
    """
    from fast import NUMPY_BACKENDS, get_backend

    rank, world = 0, 1
    if backend not in NUMPY_BACKENDS:
        get_backend(backend)  # a clear error where torch or triton is missing
        from fast.torch import train as torch_train

        rank, world = torch_train.distributed()
    emit = on_event if rank == 0 else (lambda e: None)
    # the data and every setting are checked against the model's config before any weights
    # are read (or downloaded)
    from weights.loader import read_config

    lora = s["lora_rank"] > 0
    data = read_data(s, out_dir, quiet=quiet)
    if s["init"] is not None:
        n_ctx = s["init"]["n_ctx"]
    else:
        n_ctx = read_config(resume if (state is not None and not lora) else s["model"]).n_ctx
    train_split, val_split = load_data(s, n_ctx, data)
    steps = total_steps(s, len(train_split))
    if state is not None:
        check_extension(s, state, state["step"], steps, resume)
    _check(
        s["warmup"] < steps or s["warmup"] == 0,
        f"--warmup {s['warmup']} must be below the run's {steps} steps (the rate would never "
        "reach --lr)",
    )
    cfg, params, tstate = build(s, state, resume, cache_dir)
    tcfg = train_config(s, steps)
    emit(
        {"event": "start", "step": tstate.step if tstate else 0, "steps": steps,
         "backend": backend, "world_size": world}
    )  # fmt: skip
    last: dict = {}
    log = RunLog(out_dir, tstate.step if tstate else 0) if rank == 0 else None
    if log is not None:
        emit = _tee(log, emit)

    best = Best(out_dir, cfg, emit) if s["keep_best"] and rank == 0 else None

    def on_train_event(e: dict) -> None:
        if e["event"] == "train":
            last.update(e)
        elif e["event"] == "val" and best is not None:
            best.seen(e)
        emit(e)

    checkpoint = saver(
        s, cfg, steps, len(train_split), out_dir, last, emit, backend=backend, world_size=world
    )

    def save(p: dict, st) -> None:
        if log is not None:
            log.flush()  # the log covers every step a checkpoint holds
        checkpoint(p, st)
        if best is not None:
            best.offer(p, st.step, s["lora_rank"] > 0)

    interrupt = Interrupt(emit)
    common = dict(state=tstate, on_event=on_train_event, save=save, stop=interrupt.requested)
    try:
        with interrupt:
            if backend in NUMPY_BACKENDS:
                from ref.train import train

                train(params, cfg, train_split, val_split, tcfg, ops=get_backend(backend), **common)
            else:
                torch_train.train(
                    params, cfg, train_split, val_split, tcfg, backend=backend, **common
                )
    except FloatingPointError as e:
        raise UsageError(str(e)) from None
    finally:
        if log is not None:
            log.close()
        if backend not in NUMPY_BACKENDS:
            torch_train.shutdown()
    return interrupt.pressed


def _tee(first: Callable[[dict], None], then: Callable[[dict], None]) -> Callable[[dict], None]:
    def both(e: dict) -> None:
        first(e)
        then(e)

    return both


def check_extension(s: dict, state: dict, done: int, steps: int, resume: str | None) -> None:
    """A resumed run may run longer (or shorter) than it was started for only where that
    changes no step's learning rate: a constant rate after warmup (--min-lr-ratio 1). The
    cosine decay is laid over the whole run, so a longer run would have taken every step
    after warmup at another rate; continuing would not be the run the README promises."""
    saved_total = state.get("total_steps")
    if done >= steps:
        raise UsageError(
            f"--resume {resume}: the run is already at step {done} of {steps}; "
            + (
                "pass a larger --steps to continue"
                if s["min_lr_ratio"] == 1
                else "its schedule has ended, so start a new run with a larger --steps"
            )
        )
    if isinstance(saved_total, int) and steps != saved_total and s["min_lr_ratio"] != 1:
        raise UsageError(
            f"--steps/--epochs: the resumed run was laid out over {saved_total} step"
            f"{'s' if saved_total != 1 else ''} (warmup, "
            f"then cosine decay to {s['min_lr_ratio']} x --lr) and {done} are done; over "
            f"{steps} steps every step after warmup would have had another learning rate. "
            f"Resume without --steps/--epochs to finish it, or start a new run with "
            f"--steps {steps} (runs with --min-lr-ratio 1, a constant rate, can be extended)"
        )


class Interrupt:
    """Ctrl-C during training: the first finishes the step under way, saves a resumable
    checkpoint of it (atomically, as every save) and stops; a second exits at once."""

    def __init__(self, emit: Callable[[dict], None]):
        self.emit = emit
        self.pressed = False
        self.old = None

    def requested(self) -> bool:
        return self.pressed

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one is final
        self.emit({"event": "interrupt"})

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
