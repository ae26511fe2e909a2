"""Finetuning checkpoints: a Hugging Face model directory plus what resuming needs.

A checkpoint directory holds
    config.json                 GPT2Config.to_hf_config()
    model.safetensors           every weight under HF names (adapters merged in), so
                                transformers' GPT2LMHeadModel.from_pretrained and our
                                `--model DIR` load it unchanged; its header metadata carries the
                                training state (JSON under "gpt2_spec_state")
    optimizer-<step>.safetensors  AdamW's moments m/<name>, v/<name> and, with LoRA, the
                                adapters param/<name>: the exact float32 values to resume from
    adapter_model.safetensors   with LoRA: the adapters alone (canonical names) and
    adapter_config.json         their rank, alpha, dropout and targets
    trainer_state.json          a readable copy of the training state

No pickle anywhere: tensors in safetensors, the rest JSON.

Atomicity: every file is written to a temporary name, fsynced and renamed (os.replace). The
rename of model.safetensors is the commit point: its metadata names the optimizer file of the
same step, which was written before it, and older optimizer files are deleted only after it.
A crash at any moment therefore leaves a model.safetensors whose optimizer file exists: the
previous checkpoint (or the new one) loads and resumes. The adapter files and
trainer_state.json are written after the commit, for people and PEFT-style tools; resuming
reads the adapters from the optimizer file, which always matches the committed model.
`GPT2_SPEC_SAVE_PAUSE=<seconds>` sleeps between the files of a save, so tests can kill a
process mid-save for real.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np

from ref.config import GPT2Config, brief, parse_json
from weights import WeightsError, read_error
from weights import safetensors as st
from weights.layout import canonical_to_hf, flatten

MODEL = "model.safetensors"
CONFIG = "config.json"
STATE = "trainer_state.json"
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_KEY = "gpt2_spec_state"


def _pause() -> None:
    """Test hook: widen the window between the files of a save (GPT2_SPEC_SAVE_PAUSE)."""
    delay = os.environ.get("GPT2_SPEC_SAVE_PAUSE")
    if delay:
        time.sleep(float(delay))


def _fsync_dir(directory: str) -> None:
    """Make the renames durable (POSIX: a rename lives in the directory's own data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    """Atomic JSON write: temporary file, fsync, rename."""

    def write(f) -> None:
        json.dump(obj, f, indent=2)
        f.write("\n")

    st.atomic_write(path, write)


def hf_tensors(params: dict) -> dict[str, np.ndarray]:
    """Nested params (no adapters) -> {HF name: array}."""
    return {canonical_to_hf(k): v for k, v in flatten(params).items()}


def save(
    directory: str,
    cfg: GPT2Config,
    params: dict,
    state: dict,
    moments: dict[str, dict[str, np.ndarray]],
    adapters: dict[str, np.ndarray] | None = None,
    adapter_config: dict | None = None,
) -> None:
    """Write a checkpoint (see the module docstring for the files and the commit order).

    params: nested params with adapters already merged; state: JSON-able dict with at least
    "step"; moments: {"m": {name: array}, "v": {...}}; adapters: the LoRA tensors, flat.
    """
    step = int(state["step"])
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:  # a file of that name, no permission
        raise WeightsError(f"{directory}: cannot create the checkpoint directory ({e})") from None
    for leftover in glob.glob(os.path.join(directory, "*.tmp-*")):
        os.remove(leftover)  # a save killed earlier left these; nothing refers to them
    opt_name = f"optimizer-{step:08d}.safetensors"
    tensors = {f"m/{k}": v for k, v in moments["m"].items()}
    tensors.update({f"v/{k}": v for k, v in moments["v"].items()})
    if adapters:
        tensors.update({f"param/{k}": v for k, v in adapters.items()})
    st.write(os.path.join(directory, opt_name), tensors)
    _pause()
    write_json(os.path.join(directory, CONFIG), cfg.to_hf_config())
    full_state = {**state, "optimizer_file": opt_name}
    _pause()
    st.write(
        os.path.join(directory, MODEL),
        hf_tensors(params),
        metadata={"format": "pt", STATE_KEY: json.dumps(full_state)},
    )  # the commit point
    _fsync_dir(directory)
    _pause()
    if adapters:
        st.write(os.path.join(directory, ADAPTER), adapters, metadata={"format": "pt"})
        write_json(os.path.join(directory, ADAPTER_CONFIG), adapter_config or {})
    write_json(os.path.join(directory, STATE), full_state)
    for old in glob.glob(os.path.join(directory, "optimizer-*.safetensors")):
        if os.path.basename(old) != opt_name:
            os.remove(old)
    _fsync_dir(directory)


def read_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when it has none)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            # checked against the file before reading: f.read(n) allocates n bytes up front
            if n > st.MAX_HEADER or n > size - 8:
                raise WeightsError(
                    f"{path}: header length {n} is larger than the file ({size} bytes) allows"
                )
            raw = f.read(n)
    except OSError as e:
        raise read_error(path, e) from None
    header = parse_json(raw, WeightsError, f"{path}: header is not valid JSON")
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def read_state(directory: str) -> dict:
    """The training state committed with the directory's model.safetensors."""
    path = os.path.join(directory, MODEL)
    raw = read_metadata(path).get(STATE_KEY)
    if raw is None:
        raise WeightsError(f"{path}: not a gpt2 finetune checkpoint (no training state)")
    state = parse_json(raw, WeightsError, f"{path}: training state is not valid JSON")
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise WeightsError(f"{path}: training state lacks a non-negative integer 'step'")
    _check_ints(state, path, "training state")
    return state


def _check_ints(value: object, path: str, where: str) -> None:
    """Refuse any integer of the training state outside int64: the state's numbers become
    step counts, sizes and seeds, and reach floats (AdamW's beta**step, torch's step tensor);
    our saver writes none larger. Walked without recursion (the JSON may nest 1,000 deep)."""
    todo: list[tuple[object, object]] = [(value, None)]
    while todo:
        v, key = todo.pop()
        if isinstance(v, dict):
            todo += [(x, k) for k, x in v.items()]
        elif isinstance(v, list):
            todo += [(x, i) for i, x in enumerate(v)]
        elif isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            raise WeightsError(f"{path}: {where}: {brief(key)}: {brief(v)} is out of range (int64)")


def read_optimizer(
    directory: str, state: dict
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """-> (moments {"m": {...}, "v": {...}}, adapters {name: array}) as writable float32."""
    name = state.get("optimizer_file")
    if not isinstance(name, str) or os.path.basename(name) != name:
        raise WeightsError(f"{directory}: checkpoint names no valid optimizer file ({name!r})")
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: optimizer state named by {MODEL} is missing")
    moments: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}
    adapters: dict[str, np.ndarray] = {}
    for key, a in st.read(path).items():
        kind, _, pname = key.partition("/")
        if kind in ("m", "v"):
            moments[kind][pname] = np.array(a, np.float32)
        elif kind == "param":
            adapters[pname] = np.array(a, np.float32)
        else:
            raise WeightsError(f"{path}: unknown tensor {key!r}")
    if set(moments["m"]) != set(moments["v"]):
        raise WeightsError(f"{path}: first and second moments name different tensors")
    return moments, adapters
