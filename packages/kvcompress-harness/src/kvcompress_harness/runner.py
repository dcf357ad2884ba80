"""Running a grid of (task, length, policy) cells, each measured against ``full``, into a results file."""

from __future__ import annotations

import importlib.metadata as md
import os
import random
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import load_text
from .errors import HarnessError, UnknownNameError
from .models import LoadedModel, load_model
from .results import append_record, cell_key, finished, read_records
from .task import Task, TaskContext, resolve_params

REFERENCE = "full"


@dataclass
class RunConfig:
    """What ``kvcompress run`` measures and where it writes."""

    policies: list[str]
    tasks: list[str]
    model: str | None = None
    lengths: list[int] | None = None
    out: str = "results.jsonl"
    device: str | None = None
    dtype: str | None = None
    chunk: int | None = None
    seed: int = 0
    profile: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    data: str = "auto"
    data_file: str | None = None
    progress: bool = True


def _registry() -> Any:
    import kvcompress

    return kvcompress.get_registry()


def resolve_tasks(names: list[str]) -> dict[str, Any]:
    """Registry entries of the named tasks; an unknown or broken one is a clear error."""
    reg = _registry()
    out = {}
    for name in names:
        if name in reg.tasks:
            out[name] = reg.tasks[name]
            continue
        broken = [f for f in reg.failures if name in (f.plugin, f.distribution)]
        why = "".join(f"; plugin {f.plugin!r} ({f.distribution}) failed to load: {f.error}" for f in broken)
        raise UnknownNameError(
            f"--task: unknown task {name!r}; known tasks: {', '.join(sorted(reg.tasks)) or 'none'}{why}"
        )
    return out


def canonical_spec(spec: str) -> str:
    """Check a policy spec (names and parameters) without a model; return it without spaces."""
    import kvcompress

    try:
        kvcompress.build_policies(spec)
    except (ValueError, TypeError, kvcompress.KVCompressError) as exc:
        raise HarnessError(f"--policy {spec!r}: {exc}") from exc
    return spec.replace(" ", "")


def _versions(names: set[str]) -> dict[str, str]:
    out = {}
    for name in sorted(names):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _policy_dists(spec: str) -> set[str]:
    import kvcompress

    reg = kvcompress.get_registry()
    return {reg.policies[name].distribution for name, _ in kvcompress.parse_spec(spec) if name in reg.policies}


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _ratios(metrics: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float]:
    if not reference:
        return {}
    out = {}
    for key, value in metrics.items():
        ref = reference.get(key)
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)) and not isinstance(value, bool) \
                and ref != 0:
            out[key] = value / ref
    return out


def _profile_path(out: Path, base: dict[str, Any]) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base["policy"])
    return out.parent / f"{out.stem}-profiles" / f"{base['task']}-{base['length']}-{safe}-{cell_key(base)}.json"


def _run_cell(task: Task, ctx: TaskContext, profile_to: Path | None) -> dict[str, Any]:
    if profile_to is None:
        return task.run(ctx)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        metrics = task.run(ctx)
    profile_to.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(profile_to))
    return metrics


def plan(config: RunConfig, tasks: dict[str, Any], max_length: int) -> list[tuple[str, int, str]]:
    """The cells (task, length, policy), ``full`` first for every (task, length)."""
    specs = [REFERENCE] + [s for s in dict.fromkeys(config.policies) if s != REFERENCE]
    cells = []
    for name, entry in tasks.items():
        lengths = config.lengths or list(entry.obj.default_lengths)
        for length in lengths:
            if not isinstance(length, int) or length < 2:
                raise HarnessError(f"--length: got {length!r}; allowed: an integer >= 2")
            if length > max_length:
                raise HarnessError(f"--length: got {length}; allowed: <= {max_length} (the model's context)")
            cells.extend((name, length, spec) for spec in specs)
    return cells


def run(config: RunConfig, loaded: LoadedModel | None = None) -> list[dict[str, Any]]:
    """Run every unfinished cell of the grid; append one record per cell to ``config.out``; return them."""
    import kvcompress

    if not config.policies:
        raise HarnessError("--policy: give at least one policy spec (see 'kvcompress list')")
    if not config.tasks:
        raise HarnessError("--task: give at least one task (see 'kvcompress list')")
    if config.chunk is not None and config.chunk < 1:
        raise HarnessError(f"--chunk: got {config.chunk}; allowed: an integer >= 1")
    config.policies = [canonical_spec(s) for s in config.policies]
    tasks = resolve_tasks(config.tasks)
    unknown = set(config.params) - set(_registry().tasks)
    if unknown:
        raise HarnessError(f"--param: unknown task(s) {', '.join(sorted(unknown))}; "
                           f"known tasks: {', '.join(sorted(_registry().tasks))}")
    params = {name: resolve_params(entry.obj, config.params.get(name, {})) for name, entry in tasks.items()}
    text = load_text(config.data, config.data_file)
    loaded = loaded or load_model(config.model, config.device, config.dtype)
    try:
        kvcompress.attach(loaded.model)
    except ValueError as exc:
        raise HarnessError(f"--model {loaded.name!r} cannot be used: {exc}") from exc
    cells = plan(config, tasks, loaded.max_length)
    out = Path(config.out)
    done = finished(read_records(out))
    run_id = uuid.uuid4().hex[:12]
    memo: dict[Any, Any] = {}
    records = []
    bar = tqdm(cells, desc="cells", unit="cell", disable=not config.progress)
    for task_name, length, spec in bar:
        entry = tasks[task_name]
        base = {"model": loaded.name, "policy": spec, "task": task_name, "params": params[task_name],
                "length": length, "device": str(loaded.device), "seed": config.seed, "chunk": config.chunk,
                "data_source": text.source}
        key = cell_key(base)
        if key in done:
            continue
        bar.set_postfix_str(f"{task_name} L={length} {spec}")
        ref = done.get(cell_key({**base, "policy": REFERENCE}))
        ctx = TaskContext(model=loaded.model, tokenizer=loaded.tokenizer, device=loaded.device, spec=spec,
                          length=length, params=params[task_name], seed=config.seed, chunk=config.chunk,
                          text=text, progress=config.progress, memo=memo)
        profile_to = _profile_path(out, base) if config.profile else None
        _seed(config.seed)
        started = time.time()
        t0 = time.perf_counter()
        record: dict[str, Any] = {**base, "primary": entry.obj.primary,
                                  "higher_is_better": entry.obj.higher_is_better, "run_id": run_id,
                                  "started_at": started, "model_source": loaded.source,
                                  "data_note": text.note, "torch_threads": torch.get_num_threads()}
        try:
            metrics = _run_cell(entry.obj, ctx, profile_to)
            record.update(status="ok", metrics=metrics)
        except torch.OutOfMemoryError as exc:
            record.update(status="error", error=f"OutOfMemoryError: {exc}".splitlines()[0],
                          traceback=traceback.format_exc())
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - a failing cell is recorded and the run goes on
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        record["wall_s"] = time.perf_counter() - t0
        if profile_to is not None and profile_to.exists():
            record["profile"] = os.path.relpath(profile_to, out.parent)
        ref_metrics = ref["metrics"] if ref else (record.get("metrics") if spec == REFERENCE else None)
        record["reference"] = {"policy": REFERENCE, "metrics": ref_metrics,
                               "run_id": ref["run_id"] if ref else (run_id if ref_metrics else None)}
        record["ratio_to_full"] = _ratios(record.get("metrics") or {}, ref_metrics)
        dists = {"kvcompress", "kvcompress-harness", "torch", "transformers", entry.distribution}
        record["versions"] = _versions(dists | _policy_dists(spec))
        append_record(out, record)
        records.append(record)
        if record["status"] == "ok":
            done[key] = record
        else:
            tqdm.write(f"cell failed: {task_name} L={length} {spec}: {record['error']}")
    return records
