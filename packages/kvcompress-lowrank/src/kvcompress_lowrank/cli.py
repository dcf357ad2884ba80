"""``kvcompress-lowrank`` (also ``python -m kvcompress_lowrank``): calibrate a model, analyse a calibration.

kvcompress-lowrank calibrate --model M --data FILE --out calib.safetensors [--tokens N] [--split first-half]
kvcompress-lowrank analyze calib.safetensors [--ranks 8 16 32 48 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def load_model(spec: str, device: str, dtype: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``: through kvcompress-harness when it is installed (it also knows the embedded
    SmolLM2, ``smollm2``, and ``.gguf`` files), else ``transformers`` from a hub id or a local directory."""
    try:
        from kvcompress_harness import load_model as harness_load
    except ImportError:
        harness_load = None
    if harness_load is not None:
        loaded = harness_load(spec, device=device, dtype=dtype)
        return loaded.model, loaded.tokenizer
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        spec, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    return model.to(device).eval(), AutoTokenizer.from_pretrained(spec)


def _calibrate(args: argparse.Namespace) -> int:
    import hashlib
    from pathlib import Path

    import torch

    from .calibrate import calibrate, curves_path
    from .text import read_text, split_text

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out: {args.out!r} must end in .safetensors (pickle files are not written)")
    torch.set_num_threads(args.threads)
    text = split_text(read_text(args.data), args.split)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    c0, t0 = time.process_time(), time.perf_counter()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    out = calibrate(
        model,
        tokenizer,
        text,
        args.out,
        tokens=args.tokens,
        seq_len=args.seq_len,
        skip=args.skip,
        progress=not args.no_progress,
        source=f"{Path(args.data).name} ({args.split}, text sha256 {digest}...)",
    )
    print(
        f"wrote {out} and {curves_path(out)} in {time.perf_counter() - t0:.0f} s "
        f"({time.process_time() - c0:.0f} s of CPU time)"
    )
    return 0


def _split(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .text import read_text, split_text

    text = read_text(args.data)
    Path(args.out).write_text(split_text(text, args.split), encoding="utf-8")
    message = f"wrote the {args.split} of {args.data}'s articles to {args.out}"
    if args.tokenizer_of:
        from .text import heldout_offset

        _, tokenizer = load_model(args.tokenizer_of, "cpu", "float32")
        message += (f"; the second half starts at token {heldout_offset(tokenizer, text)} of the whole file "
                    "(kvcompress run --param perplexity.offset=N)")
    print(message)
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import report

    print(report(args.file, args.ranks))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvcompress-lowrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser(
        "calibrate", help="mean and PCA basis of keys before RoPE and values, per layer/kv head"
    )
    cal.add_argument(
        "--model",
        default="smollm2",
        help="HF id, local dir, .gguf (with kvcompress-harness: "
        "'smollm2', the embedded SmolLM2-135M-Instruct; default)",
    )
    cal.add_argument("--data", required=True, help="UTF-8 text file to calibrate on")
    cal.add_argument("--out", required=True, help="output .safetensors file (curves go beside it)")
    cal.add_argument("--tokens", type=int, default=16384, help="tokens to read (default 16384)")
    cal.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default 1024)")
    cal.add_argument(
        "--split",
        default="all",
        choices=("all", "first-half", "second-half"),
        help="use the whole file or one half of its articles (' = Title = ' headings)",
    )
    cal.add_argument(
        "--skip",
        type=int,
        default=4,
        help="first tokens of each window left out (default 4: the store keeps the first tokens exact)",
    )
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="float32")
    cal.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(run=_calibrate)
    spl = sub.add_parser("split", help="write one half of a WikiText file's articles (held-out text)")
    spl.add_argument("--data", required=True, help="UTF-8 text file")
    spl.add_argument("--split", default="second-half", choices=("first-half", "second-half"))
    spl.add_argument("--out", required=True, help="output text file")
    spl.add_argument("--tokenizer-of", default=None, help="a model (as --model) whose tokenizer gives the "
                     "token where the second half starts in the whole file")
    spl.set_defaults(run=_split)
    ana = sub.add_parser("analyze", help="explained variance at given ranks, per kind and layer (markdown)")
    ana.add_argument("file", help="a calibration .safetensors file")
    ana.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 24, 32, 40, 48, 56, 64])
    ana.set_defaults(run=_analyze)
    args = parser.parse_args(argv)
    if getattr(args, "tokens", 1) < 1 or getattr(args, "seq_len", 1) < 1:
        parser.error("--tokens and --seq-len must be >= 1")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvcompress-lowrank: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
