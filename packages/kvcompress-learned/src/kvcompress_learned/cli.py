"""``kvcompress-learned``: ``train`` a model's scorer, ``show`` a weights file's metadata, ``split`` a text
into its training and held-out halves. Also ``python -m kvcompress_learned``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .train import DEFAULTS


def load(model: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model``: through kvcompress-harness's loader when it is installed (it
    also takes ``smollm2``, the default model, and ``.gguf`` files), else transformers' from a directory or
    hub id."""
    try:
        from kvcompress_harness.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model(model, device=device)
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2" or model.endswith(".gguf"):
        raise SystemExit(f"--model {model}: loading it needs kvcompress-harness "
                         "(pip install kvcompress-harness); "
                         "or pass a transformers model directory or hub id")
    return AutoModelForCausalLM.from_pretrained(model).eval().to(device), AutoTokenizer.from_pretrained(model)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .train import train

    torch.set_num_threads(args.threads)
    start_cpu, start = time.process_time(), time.perf_counter()
    model, tokenizer = load(args.model, args.device)
    done = train(model, tokenizer, args.data, args.out, label=args.label, tokens=args.tokens, seed=args.seed,
                 horizon=args.horizon, units=args.units, epochs=args.epochs, seq_len=args.seq_len,
                 progress=not args.no_progress, also=tuple(args.also) if args.also else None)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    for file in (done, done.also):
        if file is not None:
            print(f"wrote {file.path} ({file.path.stat().st_size} bytes; label {file.metadata['label']}; "
                  f"validation rank correlation {file.metadata['val_spearman']})")
    print(f"{cpu:.0f} s CPU time, {wall:.0f} s wall")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .files import header

    print(json.dumps(header(Path(args.weights)), indent=2, sort_keys=True))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .text import half

    part = half(args.data, args.half)
    Path(args.out).write_text(part.text, encoding="utf-8")
    print(f"wrote {args.out}: {part.describe()}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcompress-learned", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model's scorer on the first half of a text file (by article)")
    t.add_argument("--model", required=True, help="smollm2, a .gguf, a transformers directory or a hub id")
    t.add_argument("--data", required=True, help="a UTF-8 text file; its first half (by article) is used")
    t.add_argument("--out", required=True, help="the weights file to write (.safetensors)")
    t.add_argument("--label", choices=("future", "h2o"), default=DEFAULTS["label"],
                   help="what the scorer predicts (default %(default)s)")
    t.add_argument("--also", nargs=2, metavar=("LABEL", "OUT"),
                   help="also fit LABEL's scorer from the same collected attention and write it to OUT")
    t.add_argument("--tokens", type=int, default=DEFAULTS["tokens"],
                   help="training tokens (default %(default)s)")
    t.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    t.add_argument("--horizon", type=int, default=DEFAULTS["horizon"],
                   help="queries of the future label (default %(default)s)")
    t.add_argument("--units", type=int, default=DEFAULTS["units"],
                   help="hidden units per layer, 0 for a linear scorer (default %(default)s)")
    t.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    t.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="tokens per training sequence")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("show", help="print a weights file's metadata")
    s.add_argument("weights")
    s.set_defaults(func=cmd_show)
    h = sub.add_parser("split", help="write one half (by article) of a text file: the held-out half for "
                                     "quality")
    h.add_argument("--data", required=True)
    h.add_argument("--half", choices=("first", "second"), default="second")
    h.add_argument("--out", required=True)
    h.set_defaults(func=cmd_split)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"kvcompress-learned {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
