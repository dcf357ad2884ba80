"""The ``kvcompress`` command: ``list``, ``run`` and ``report``."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .errors import HarnessError
from .grid import apply_grid, parse_params


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_list(_: argparse.Namespace) -> int:
    """Print policies, metrics and tasks with their distribution and version, then broken plugins."""
    import kvcompress

    reg = kvcompress.get_registry()
    policies = {p.name: p for p in kvcompress.list_policies()}
    rows = []
    for name, e in sorted(reg.policies.items()):
        info = policies.get(name)
        params = ", ".join(f"{k}={v}" for k, v in (info.params if info else {}).items())
        rows.append(["policy", name, e.distribution, e.version, params, e.description])
    for name, e in sorted(reg.metrics.items()):
        rows.append(["metric", name, e.distribution, e.version, "", e.description])
    for name, e in sorted(reg.tasks.items()):
        defaults = getattr(e.obj, "defaults", {}) or {}
        rows.append(["task", name, e.distribution, e.version, ", ".join(f"{k}={v}" for k, v in defaults.items()),
                     e.description])
    print(_table(rows, ["kind", "name", "distribution", "version", "parameters", "description"]))
    if reg.failures:
        print("\nplugins that failed to load:")
        print(_table([[f.plugin, f.distribution, f.error] for f in reg.failures],
                     ["plugin", "distribution", "error"]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the grid; print where the results went."""
    from .runner import RunConfig, run

    if args.threads is not None:
        if args.threads < 1:
            raise HarnessError(f"--threads: got {args.threads}; allowed: an integer >= 1")
        import torch

        torch.set_num_threads(args.threads)
    config = RunConfig(policies=args.policy or [], tasks=args.task or [], model=args.model, lengths=args.length,
                       out=args.out, device=args.device, dtype=args.dtype, chunk=args.chunk, seed=args.seed,
                       profile=args.profile, params=parse_params(args.param or []), data=args.data,
                       data_file=args.data_file, progress=not args.no_progress)
    if args.grid:
        config = apply_grid(config, args.grid, given=vars(args))
    records = run(config)
    failed = [r for r in records if r["status"] != "ok"]
    print(f"{len(records)} cell(s) run, {len(failed)} failed; results in {config.out}")
    for r in failed:
        print(f"  failed: {r['task']} L={r['length']} {r['policy']}: {r['error']}")
    return 1 if failed and len(failed) == len(records) else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the markdown table and PNG plots next to the results."""
    from .report import report

    out = report(args.results, args.out_dir)
    print(json.dumps({k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in out.items()},
                     indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvcompress``."""
    p = argparse.ArgumentParser(prog="kvcompress", description="KV-cache compression harness")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="policies, metrics and tasks installed").set_defaults(fn=cmd_list)
    r = sub.add_parser("run", help="measure policies on tasks against the full cache")
    r.add_argument("--policy", action="append", help="policy spec, e.g. 'sink(budget=128)'; repeatable")
    r.add_argument("--task", action="append", help="task name; repeatable")
    r.add_argument("--model", default=None, help="HF id, local dir or .gguf file (default: SmolLM2-135M)")
    r.add_argument("--length", type=int, nargs="+", help="lengths in tokens (default: each task's)")
    r.add_argument("--out", default="results.jsonl", help="results file (JSON lines; reruns resume)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--dtype", default=None, help="model dtype: float32, float16 or bfloat16")
    r.add_argument("--chunk", type=int, default=None, help="tokens fed per forward while streaming")
    r.add_argument("--grid", default=None, help="TOML file with policies, tasks, lengths, params")
    r.add_argument("--param", action="append", help="task parameter TASK.KEY=VALUE; repeatable")
    r.add_argument("--data", default="auto", help="auto (WikiText-2, else shipped excerpt), wikitext, excerpt")
    r.add_argument("--data-file", default=None, help="local UTF-8 text file to use instead")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--profile", action="store_true", help="write a torch.profiler trace per cell")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="markdown table and PNG plots from a results file")
    rep.add_argument("results", help="results .jsonl file")
    rep.add_argument("--out-dir", default=None, help="where to write (default: beside the results)")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    rep.set_defaults(fn=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line on error, the traceback with --debug."""
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("kvcompress: interrupted; finished cells are saved, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for a person
        if args.debug:
            traceback.print_exc()
        print(f"kvcompress: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text: Any = str(exc) or type(exc).__name__
    if not isinstance(exc, (HarnessError, ValueError)):
        text = f"{type(exc).__name__}: {text}"
    return " ".join(str(text).split())


if __name__ == "__main__":
    sys.exit(main())
