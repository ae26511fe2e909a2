"""gpt2 download NAME [--cache-dir D] [--source openai|hf|auto] [--force] [--verify] [--json]"""

from __future__ import annotations

import argparse
import json
import os

from gpt2.cli import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help="download a released GPT-2 into the cache (resumable, verified)",
        description="Download OpenAI's GPT-2 weights into the cache directory. Interrupted "
        "downloads resume where they stopped; each file is checked against the size and "
        "hashes the server declares before it is renamed into place.",
    )
    p.add_argument("name", help="124M 355M 774M 1558M (or gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where downloaded models live (default: $GPT2_CACHE or ~/.cache/gpt2-spec)",
    )
    p.add_argument(
        "--source",
        default="auto",
        choices=["openai", "hf", "auto"],
        help="OpenAI's bucket, Hugging Face, or auto: OpenAI then Hugging Face (default auto)",
    )
    p.add_argument("--force", action="store_true", help="download again even if complete")
    p.add_argument(
        "--verify", action="store_true", help="re-hash the files against the manifest afterwards"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gpt2.progress import download_bar, note
    from ref.config import canonical_size
    from weights import download as dl

    size = canonical_size(args.name)
    if size is None:
        raise UsageError(dl.unknown_size(args.name))
    present = dl.is_complete(size, args.cache_dir) and not args.force
    path = dl.download(
        size,
        args.cache_dir,
        source=args.source,
        force=args.force,
        progress=download_bar(),
        notify=note,
    )
    if args.verify:
        dl.verify(size, args.cache_dir)
    manifest = dl.read_manifest(size, args.cache_dir) or {}
    files = manifest.get("files", {})
    if args.json:
        out = {
            "model": size,
            "path": path,
            "source": manifest.get("source"),
            "already_present": present,
            "verified_hashes": bool(args.verify),
            "files": {k: {"size": v["size"], "sha256": v["sha256"]} for k, v in files.items()},
        }
        print(json.dumps(out))
        return 0
    total = sum(v["size"] for v in files.values())
    state = "already downloaded" if present else f"downloaded from {manifest.get('source')}"
    print(f"{size}: {state}, {len(files)} files, {total / 1e6:.1f} MB in {path}")
    for name, rec in sorted(files.items()):
        checks = ", ".join(rec.get("verified", [])) or "nothing declared by the server"
        print(f"  {name:<32} {rec['size']:>12}  sha256 {rec['sha256'][:16]}...  ({checks})")
    if args.verify:
        print(f"  all sha256 match {os.path.join(path, dl.MANIFEST)}")
    return 0
