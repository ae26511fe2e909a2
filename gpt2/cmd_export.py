"""gpt2 export --format gguf --dtype f32|f16|q8_0 MODEL OUT.gguf [--overwrite] [--json]

Writes MODEL (a size name, a model directory, a .safetensors or .gguf file) as a GGUF file that
llama.cpp loads and generates with: GPT-2's metadata and BPE tokenizer, the tensors in the
types of `--dtype` as llama.cpp's own converter lays them out (weights/gguf.py). The file is
written to OUT.tmp-<pid> and renamed into place when whole, so a failed export leaves nothing.
"""

from __future__ import annotations

import argparse
import json
import os

from gpt2.cli import UsageError

FORMATS = ("gguf",)
GGUF_TYPES = ("f32", "f16", "q8_0")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model in another format (GGUF, for llama.cpp)",
        description="Write MODEL as a GGUF file for llama.cpp: f32, f16 or q8_0 matrices "
        "(blocks of 32 with a float16 scale; a matrix whose input size is not a multiple of 32 "
        "falls back to f16, as llama.cpp's converter does), GPT-2's tokenizer included.",
    )
    p.add_argument("model", help="size name (124M ...), model directory, .safetensors or .gguf")
    p.add_argument("out", help="the GGUF file to write (OUT.gguf)")
    p.add_argument("--format", default="gguf", choices=FORMATS, help="output format (gguf)")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=GGUF_TYPES,
        help="tensor type of the matrices: f32 (default), f16 or q8_0; vectors stay f32",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where downloaded models live (default: $GPT2_CACHE or ~/.cache/gpt2-spec)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gpt2.progress import download_bar, note
    from weights import gguf, loader

    out = args.out
    if os.path.isdir(out):
        raise UsageError(f"OUT {out}: is a directory, expected a file name (OUT.gguf)")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"OUT {out}: exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"OUT {out}: directory {parent} does not exist")
    try:
        import gguf as _  # noqa: F401  (refused before any weights are read)
    except ImportError:
        raise UsageError(
            "--format gguf needs the gguf package (pip install gguf, or the [gguf] extra)"
        ) from None
    loader.read_config(args.model)  # a bad model is refused before weights are read
    cfg, params = loader.load(
        args.model, cache_dir=args.cache_dir, progress=download_bar(), notify=note
    )
    gguf.write(out, cfg, params, args.dtype)
    size = os.path.getsize(out)
    if args.json:
        print(json.dumps({"model": args.model, "out": out, "dtype": args.dtype, "bytes": size}))
    else:
        print(f"{out}: GGUF, {args.dtype}, {size / 1e6:.1f} MB")
    return 0
