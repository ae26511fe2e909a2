"""A training run's history in its output directory, for `gpt2 train` and `gpt2 finetune`.

log.jsonl: one JSON object per optimizer step, in order:
    {"step", "tokens_seen" (inputs so far, the run's resumed part included), "train_loss",
     "lr", "grad_norm", "seconds" (the step's own time), and "val_loss" and
     "train_eval_loss" where the step was followed by a validation: the loss of the first
     --eval-batches of each split, without dropout, as the book's evaluate_model measures both}
loss.png: train and validation loss against steps, with tokens seen on the top axis (the
book's figure 5.12), redrawn at every validation and at the end (needs matplotlib; without it
there is only the log).

A resumed run keeps the lines of the steps its checkpoint holds and drops any later ones (a
run killed after its last save logged steps the resumed run will take again), then appends.
A step's line is written once the step is complete: after its validation, if any, and before
its checkpoint is reported, so the log on disk always covers the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

LOG = "log.jsonl"
PLOT = "loss.png"


class RunLog:
    def __init__(self, out_dir: str, start_step: int):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOG)
        self.lines = [r for r in _read(self.path) if r.get("step", 0) <= start_step]
        os.makedirs(out_dir, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:  # the kept lines, rewritten
            f.writelines(json.dumps(r) + "\n" for r in self.lines)
        self.tokens_seen = self.lines[-1]["tokens_seen"] if self.lines else 0
        self.pending: dict | None = None
        self.failed = False

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "train":
            self.flush()
            self.tokens_seen += e["tokens"]
            self.pending = {
                "step": e["step"],
                "tokens_seen": self.tokens_seen,
                "train_loss": e["loss"],
                "lr": e["lr"],
                "grad_norm": e["grad_norm"],
                "seconds": e["tokens"] / max(e["tokens_per_s"], 1e-12),
            }
        elif kind == "val":
            if self.pending is not None and self.pending["step"] == e["step"]:
                self.pending["val_loss"] = e["val_loss"]
                if "train_eval_loss" in e:
                    self.pending["train_eval_loss"] = e["train_eval_loss"]
            self.flush()
            self.plot()
        elif kind in ("checkpoint", "interrupted"):
            self.flush()

    def flush(self) -> None:
        if self.pending is None:
            return
        self.lines.append(self.pending)
        line, self.pending = json.dumps(self.pending) + "\n", None
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:  # a full disk: the training and its checkpoints matter more
            self._lost(e)

    def _lost(self, e: OSError) -> None:
        if not self.failed:
            print(f"gpt2: warning: cannot write the run's log in {self.out_dir} ({e})",
                  file=sys.stderr)  # fmt: skip
        self.failed = True

    def close(self) -> None:
        self.flush()
        self.plot()

    def plot(self) -> None:
        """loss.png from the lines so far (written to a temporary file, then renamed)."""
        if not self.lines:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        steps = [r["step"] for r in self.lines]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r["train_loss"] for r in self.lines], label="training loss", lw=1)
        val = [(r["step"], r["val_loss"]) for r in self.lines if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", ms=3, label="validation loss")
        tev = [(r["step"], r["train_eval_loss"]) for r in self.lines if "train_eval_loss" in r]
        if tev:  # the book's "training loss": measured at each evaluation, without dropout
            ax.plot(*zip(*tev, strict=True), "s-", ms=3, label="training loss (at evaluation)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        # tokens seen grow by the same amount every step (batch x context x accumulation)
        per_step = self.lines[-1]["tokens_seen"] / max(self.lines[-1]["step"], 1)
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s * per_step, lambda t: t / max(per_step, 1e-12))
        )
        top.set_xlabel("tokens seen")
        fig.tight_layout()
        tmp = os.path.join(self.out_dir, f".{PLOT}.tmp-{os.getpid()}.png")
        try:
            fig.savefig(tmp, dpi=120)
            os.replace(tmp, os.path.join(self.out_dir, PLOT))
        except OSError as e:
            self._lost(e)
            with contextlib.suppress(OSError):
                os.remove(tmp)
        finally:
            plt.close(fig)


def _read(path: str) -> list[dict]:
    """The log's lines, where there is one (a line cut short by a kill is dropped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and isinstance(r.get("step"), int):
                    out.append(r)
    except OSError:
        pass
    return out
