"""The ``kvcompress`` command: ``list``, ``run`` and ``report``.

Nothing heavy is imported at the top: ``--help``, ``list`` and a misspelt policy or task answer before
torch or transformers load (those come in only once a run has been checked and needs a model).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .errors import HarnessError


class Terminated(BaseException):
    """SIGTERM arrived: stop the run between two writes (finished cells are on disk)."""


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

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


def _config(args: argparse.Namespace) -> Any:
    from .grid import apply_grid, parse_params
    from .runner import RunConfig

    tasks = list(args.task or [])
    if args.max_batch and "max_batch" not in tasks:
        tasks.append("max_batch")
    command = "kvcompress " + " ".join(shlex.quote(a) for a in (args.argv or []))
    config = RunConfig(policies=args.policy or [], tasks=tasks, model=args.model, lengths=args.length,
                       out=args.out, device=args.device, dtype=args.dtype, chunk=args.chunk, seed=args.seed,
                       profile=args.profile, params=parse_params(args.param or []), data=args.data,
                       data_file=args.data_file, progress=not args.no_progress, batches=args.batch,
                       compress=args.compress, command=command, device_map=args.device_map)
    if args.grid:
        config = apply_grid(config, args.grid, given={**vars(args), "task": tasks or None})
    return config


def cmd_run(args: argparse.Namespace) -> int:
    """Check the options, run the grid, print where the results went."""
    from . import progress
    from .specs import check_specs, resolve_tasks

    progress.set_enabled(not args.no_progress)
    if args.threads is not None and args.threads < 1:
        raise HarnessError(f"--threads: got {args.threads}; allowed: an integer >= 1")
    config = _config(args)
    if not config.policies:
        raise HarnessError("--policy: give at least one policy spec (see 'kvcompress list')")
    if not config.tasks:
        raise HarnessError("--task: give at least one task (see 'kvcompress list')")
    config.policies = check_specs(config.policies)  # before torch is imported: a typo answers at once
    resolve_tasks(config.tasks)
    if config.device_map is not None:
        from .placement import parse_device_map

        parse_device_map(config.device_map)
    args.out_path = config.out

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    progress.say("starting: importing torch and transformers")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .runner import run

    records = run(config)
    from .distributed import from_env

    rank = from_env()
    if rank is not None and not rank.leader:
        print(f"rank {rank.rank}/{rank.world}: {len(records)} cell(s) run; rank 0 merges them into {config.out}")
        return 0
    failed = [r for r in records if r["status"] == "error"]
    oom = [r for r in records if r["status"] == "oom"]
    print(f"{len(records)} cell(s) run, {len(failed)} failed, {len(oom)} out of memory; results in {config.out}")
    for r in failed:
        print(f"  failed: {r['task']} L={r['length']} {r['policy']}: {r['error']}")
    if records and not failed:
        print(f"next: kvcompress report {shlex.quote(config.out)}")
    return 1 if failed and len(failed) == len(records) else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the markdown report, the leaderboard and PNG plots next to the results."""
    from .report import report

    out = report(args.results, args.out_dir, docs=args.docs)
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
    r.add_argument("--model", default=None,
                   help="HF id, local dir, .gguf file, or random:NAME[?layers=N] (llama-3-8b, llama-3-70b, qwen2.5-7b, "
                        "mistral-7b, smollm2-135m; random weights, speed only); default: SmolLM2-135M")
    r.add_argument("--length", type=int, nargs="+", help="lengths in tokens (default: each task's)")
    r.add_argument("--batch", type=int, nargs="+", help="batch sizes for speed (default 1)")
    r.add_argument("--max-batch", action="store_true", help="also run max_batch: the largest batch that fits")
    r.add_argument("--compress", nargs="+", help="retrieval tasks: 'prompt' (whole prompt, default) and/or "
                                                 "'context' (context compressed, then the question)")
    r.add_argument("--out", default="results.jsonl", help="results file (JSON lines; reruns resume)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--device-map", default=None,
                   help="spread the model over devices with accelerate: auto, balanced, balanced_low_0, sequential, "
                        "or a JSON object of module to device (see docs/scale.md)")
    r.add_argument("--dtype", default=None, help="model dtype: float32, float16 or bfloat16")
    r.add_argument("--chunk", type=int, default=None, help="tokens fed per forward while streaming")
    r.add_argument("--grid", default=None, help="TOML file with policies, tasks, lengths, params")
    r.add_argument("--param", action="append", help="task parameter TASK.KEY=VALUE; repeatable")
    r.add_argument("--data", default="auto", help="auto (WikiText-2, else shipped excerpt), wikitext, excerpt")
    r.add_argument("--data-file", default=None, help="local UTF-8 text file to use instead")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--profile", action="store_true", help="write a torch.profiler trace per cell")
    r.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="markdown tables, leaderboard and PNG plots from results files")
    rep.add_argument("results", nargs="+", help="results .jsonl file(s)")
    rep.add_argument("--out-dir", default=None, help="where to write (default: beside the first results file)")
    rep.add_argument("--docs", default=None, help="also rewrite the generated part of this markdown page "
                                                  "(docs/benchmarks.md)")
    rep.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    rep.set_defaults(fn=cmd_report)
    return p


def _saved(args: argparse.Namespace) -> str:
    path = getattr(args, "out_path", None)
    if not path:
        return "finished cells are saved"
    try:
        with open(path, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
    except OSError:
        n = 0
    return f"{n} finished cell(s) are kept in {path}; rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line on error, the traceback with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print(f"kvcompress: interrupted; {_saved(args)}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"kvcompress: terminated (SIGTERM); {_saved(args)}", file=sys.stderr)
        return 143
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
