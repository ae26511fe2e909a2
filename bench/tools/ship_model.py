"""Copy a `gpt2 train` checkpoint into the package as a shipped model (weights/models/NAME/).

    python -m bench.tools.ship_model CHECKPOINT_DIR weights/models/NAME

Writes config.json, model.safetensors with every tensor in float16 (half the bytes; the
loader computes in float32, transformers loads it as it is), and the run's log.jsonl and
loss.png; not the optimizer state or the token file (they only matter to resume the run).
Refuses a tensor that float16 cannot hold (|x| > 65504) rather than rounding it to inf.
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

from weights import safetensors as st
from weights.checkpoint import CONFIG, MODEL

F16_MAX = float(np.finfo(np.float16).max)


def ship(src: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    tensors = st.read(os.path.join(src, MODEL))
    half = {}
    for name, a in tensors.items():
        a = np.asarray(a, np.float32)
        if np.abs(a).max() > F16_MAX:
            raise SystemExit(f"{src}: tensor {name} does not fit in float16")
        half[name] = a.astype(np.float16)
    st.write(os.path.join(dest, MODEL), half, metadata={"format": "pt"})
    for name in (CONFIG, "log.jsonl", "loss.png"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="a gpt2 train output directory")
    p.add_argument("dest", help="where the shipped model goes (weights/models/NAME)")
    a = p.parse_args()
    ship(a.src, a.dest)
    size = sum(os.path.getsize(os.path.join(a.dest, f)) for f in os.listdir(a.dest))
    print(f"{a.dest}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
