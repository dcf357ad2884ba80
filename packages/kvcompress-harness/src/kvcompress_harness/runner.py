"""Running a grid of cells, each policy measured against ``full``, into a results file.

A cell is (task, length, batch, compress mode, policy); the cells that share everything but the policy
form a group, with ``full`` first. A task with ``run_group`` measures a whole group in one call (``speed``
pairs decode steps across its policies); any other task runs cell by cell.

Under torchrun (``distributed``) the groups are split over the ranks, a group whole on one rank (a policy and
its ``full`` stay in one process); each rank writes its own shard and rank 0 merges them (``shards``).
"""

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

from . import distributed, shards
from .errors import HarnessError
from .models import LoadedModel, load_model
from .progress import bar, say, set_rank
from .results import append_record, cell_key, finished, prepare_out
from .specs import REFERENCE, check_specs, resolve_tasks
from .summary import cell_line
from .task import Task, TaskContext, resolve_params


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
    batches: list[int] | None = None
    compress: list[str] | None = None
    command: str | None = None
    grid: str | None = None
    device_map: str | None = None


@dataclass(frozen=True)
class Group:
    """Cells that differ only by policy: measured together, ``full`` first."""

    task: str
    length: int
    batch: int
    compress: str | None
    specs: tuple[str, ...]


def _registry() -> Any:
    import kvcompress

    return kvcompress.get_registry()


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
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _ratios(metrics: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, float]:
    if not reference:
        return {}
    out = {}
    for key, value in metrics.items():
        ref = reference.get(key)
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)) and not isinstance(value, bool) \
                and not isinstance(ref, bool) and ref != 0:
            out[key] = value / ref
    return out


def _profile_path(out: Path, base: dict[str, Any]) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base["policy"])
    return out.parent / f"{out.stem}-profiles" / f"{base['task']}-{base['length']}-{safe}-{cell_key(base)}.json"


def _profiled(fn: Any, device: Any, profile_to: Path | None) -> Any:
    if profile_to is None:
        return fn()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        result = fn()
    profile_to.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(profile_to))
    return result


def plan(config: RunConfig, tasks: dict[str, Any], max_length: int) -> list[Group]:
    """The groups of cells, ``full`` first in each."""
    specs = tuple([REFERENCE] + [s for s in dict.fromkeys(config.policies) if s != REFERENCE])
    for b in config.batches or []:
        if not isinstance(b, int) or b < 1:
            raise HarnessError(f"--batch: got {b!r}; allowed: an integer >= 1")
    groups = []
    for name, entry in tasks.items():
        task = entry.obj
        lengths = config.lengths or list(task.default_lengths)
        modes = tuple(getattr(task, "compress_modes", None) or ())
        # the batch axis is the speed tasks'; the compress axis the retrieval tasks'; others run once
        batches = list(dict.fromkeys(config.batches or [1])) if getattr(task, "supports_batch", False) else [1]
        compress: list[str | None] = [None]
        if modes:
            compress = list(dict.fromkeys(config.compress or [modes[0]]))
            for mode in compress:
                if mode not in modes:
                    raise HarnessError(f"--compress: got {mode!r}; allowed: {', '.join(modes)}")
        for length in lengths:
            if not isinstance(length, int) or length < 2:
                raise HarnessError(f"--length: got {length!r}; allowed: an integer >= 2")
            if length > max_length:
                raise HarnessError(f"--length: got {length}; allowed: <= {max_length} (the model's context)")
            for batch in batches:
                for mode in compress:
                    groups.append(Group(name, length, batch, mode, specs))
    return groups


def _check_compress(config: RunConfig, tasks: dict[str, Any]) -> None:
    if config.compress and not any(getattr(e.obj, "compress_modes", None) for e in tasks.values()):
        raise HarnessError(f"--compress: none of the tasks {', '.join(tasks)} has compression modes; allowed: "
                           "with passkey, needle or longbench (or a task that declares compress_modes)")


class Runner:
    """Runs the groups of one ``RunConfig`` and appends a record per finished cell."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, tasks: dict[str, Any],
                 params: dict[str, dict[str, Any]], text: Any, key_device: str | None = None,
                 rank: distributed.Rank | None = None) -> None:
        self.config, self.loaded, self.tasks, self.params, self.text = config, loaded, tasks, params, text
        self.out = Path(config.out)
        self.write_to = self.out if rank is None else shards.shard_path(self.out, rank.rank)
        self.done = finished(shards.all_records(self.out)) if rank is None else {}
        self.key_device = key_device or str(loaded.device)
        self.rank = rank
        self.run_id = uuid.uuid4().hex[:12]
        self.memo: dict[Any, Any] = {}
        self.records: list[dict[str, Any]] = []

    def base(self, group: Group, spec: str) -> dict[str, Any]:
        """The identity of a cell (what its key is made of)."""
        out = {"model": self.loaded.name, "policy": spec, "task": group.task, "params": self.params[group.task],
               "length": group.length, "device": self.key_device, "seed": self.config.seed,
               "chunk": self.config.chunk, "data_source": self.text.source, "batch": group.batch,
               "compress": group.compress}
        if self.loaded.device_map is not None:
            out["device_map"] = self.loaded.device_map
        return out

    def context(self, group: Group, spec: str) -> TaskContext:
        """The task context of one cell."""
        return TaskContext(model=self.loaded.model, tokenizer=self.loaded.tokenizer, device=self.loaded.device,
                           spec=spec, length=group.length, params=self.params[group.task], seed=self.config.seed,
                           chunk=self.config.chunk, text=self.text, progress=self.config.progress,
                           batch=group.batch, compress=group.compress, task=group.task, memo=self.memo,
                           devices=tuple(self.loaded.devices))

    def order(self, groups: list[Group]) -> Any:
        """Sort key of a record: its cell's place in ``groups`` (cells of other grids first)."""
        index = {cell_key(self.base(g, s)): i for i, (g, s) in enumerate((g, s) for g in groups for s in g.specs)}
        return lambda record: index.get(cell_key(record), -1)

    def mine(self, groups: list[Group]) -> list[Group]:
        """The unfinished groups this rank runs: split by ``distributed.assign`` over the ranks, the cost of a
        group its tokens (length x batch) times its unfinished cells."""
        if self.rank is None:
            return groups
        todo = [g for g in groups if self.todo(g)]
        owner = distributed.assign([g.length * g.batch * len(self.todo(g)) for g in todo], self.rank.world)
        mine = [g for g, r in zip(todo, owner) if r == self.rank.rank]
        say(f"{len(mine)} of {len(todo)} unfinished group(s) of cells on this rank")
        return mine

    def todo(self, group: Group) -> list[str]:
        """Specs of the group whose cells have not finished."""
        return [s for s in group.specs if cell_key(self.base(group, s)) not in self.done]

    def run(self, groups: list[Group]) -> list[dict[str, Any]]:
        """Every unfinished cell of ``groups``."""
        cells = sum(len(self.todo(g)) for g in groups)
        total = sum(len(g.specs) for g in groups)
        if total > cells:
            say(f"resuming {self.out}: {total - cells} of {total} cells already finished")
        handle = bar(cells, "cells", unit="cell")
        self.n, self.cells, self.bar = 0, cells, None
        if handle is None:
            self._run_all(groups)
        else:
            with handle as b:
                self.bar = b
                self._run_all(groups)
        return self.records

    def _run_all(self, groups: list[Group]) -> None:
        for group in groups:
            specs = self.todo(group)
            if not specs:
                continue
            task = self.tasks[group.task].obj
            if hasattr(task, "run_group"):
                self._group(group, task, specs)
            else:
                for spec in specs:
                    self._cell(group, task, spec)

    def _announce(self, group: Group, spec: str) -> None:
        self.n += 1
        extra = "".join([f" batch={group.batch}" if group.batch != 1 else "",
                         f" compress={group.compress}" if group.compress else ""])
        say(f"cell {self.n}/{self.cells}: {group.task} L={group.length}{extra} {spec}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{group.task} L={group.length} {spec}")

    def _cell(self, group: Group, task: Task, spec: str) -> None:
        self._announce(group, spec)
        base = self.base(group, spec)
        profile_to = _profile_path(self.out, base) if self.config.profile else None
        _seed(self.config.seed)
        started, t0 = time.time(), time.perf_counter()
        try:
            metrics = _profiled(lambda: task.run(self.context(group, spec)), self.loaded.device, profile_to)
            outcome: dict[str, Any] = {"status": "ok", "metrics": metrics}
        except Exception as exc:  # noqa: BLE001 - a failing cell is recorded and the run goes on
            outcome = _failure(exc, self.loaded.device)
        if profile_to is not None and profile_to.exists():
            outcome["profile"] = os.path.relpath(profile_to, self.out.parent)
        ref = self.done.get(cell_key(self.base(group, REFERENCE)))
        ref_metrics = ref["metrics"] if ref else (outcome.get("metrics") if spec == REFERENCE else None)
        ref_run = ref["run_id"] if ref else (self.run_id if ref_metrics else None)
        self._record(group, task, base, outcome, started, time.perf_counter() - t0, ref_metrics, ref_run)

    def _group(self, group: Group, task: Task, specs: list[str]) -> None:
        measured = list(group.specs)  # full and every policy held at once, even those already finished
        for spec in specs:
            self._announce(group, spec)
        _seed(self.config.seed)
        profile_to = _profile_path(self.out, self.base(group, REFERENCE)) if self.config.profile else None
        started, t0 = time.time(), time.perf_counter()
        try:
            results = _profiled(lambda: task.run_group(self.context(group, REFERENCE), measured),
                                self.loaded.device, profile_to)
            failure = None
        except Exception as exc:  # noqa: BLE001
            results, failure = {}, _failure(exc, self.loaded.device)
        wall = time.perf_counter() - t0
        if profile_to is not None and profile_to.exists():
            profiled = os.path.relpath(profile_to, self.out.parent)
        else:
            profiled = None
        full = results.get(REFERENCE)
        for spec in specs:
            metrics = results.get(spec)
            if failure is not None:
                outcome = dict(failure)
            elif metrics is not None and metrics.get("oom"):
                outcome = {"status": "oom", "error": metrics.get("error", "out of memory"), "metrics": metrics}
            else:
                outcome = {"status": "ok", "metrics": metrics or {}}
            if profiled:
                outcome["profile"] = profiled
            ref = full if full is not None and not full.get("oom") else None
            self._record(group, task, self.base(group, spec), outcome, started, wall, ref,
                         self.run_id if ref else None)

    def _record(self, group: Group, task: Task, base: dict[str, Any], outcome: dict[str, Any], started: float,
                wall: float, ref_metrics: dict[str, Any] | None, ref_run: str | None) -> None:
        import torch

        entry = self.tasks[group.task]
        record: dict[str, Any] = {**base, "primary": task.primary, "higher_is_better": task.higher_is_better,
                                  "run_id": self.run_id, "started_at": started, "model_source": self.loaded.source,
                                  "data_note": self.text.note, "torch_threads": torch.get_num_threads(),
                                  "command": self.config.command, "grid": self.config.grid,
                                  "device_name": _device_name(self.loaded), **outcome, "wall_s": wall}
        if self.key_device != str(self.loaded.device) or self.loaded.device_map is not None:
            record["local_device"] = str(self.loaded.device)
        if self.loaded.device_map is not None:
            record["devices"], record["placement"] = list(self.loaded.devices), self.loaded.placement
        if self.rank is not None:
            record["rank"], record["world_size"] = self.rank.rank, self.rank.world
        labels = getattr(task, "labels", None)
        if labels:
            record["labels"] = dict(labels)
        record["reference"] = {"policy": REFERENCE, "metrics": ref_metrics, "run_id": ref_run}
        record["ratio_to_full"] = _ratios(record.get("metrics") or {}, ref_metrics)
        dists = {"kvcompress", "kvcompress-harness", "torch", "transformers", entry.distribution}
        record["versions"] = _versions(dists | _policy_dists(base["policy"]))
        append_record(self.write_to, record)
        self.records.append(record)
        if record["status"] in ("ok", "oom"):
            self.done[cell_key(base)] = record
        say(cell_line(record))


def _failure(exc: BaseException, device: Any) -> dict[str, Any]:
    from .tasks.inputs import is_oom, release

    if is_oom(exc):
        release(device)
        return {"status": "oom", "error": f"OutOfMemoryError: {exc}".splitlines()[0], "metrics": {"oom": True},
                "traceback": traceback.format_exc()}
    return {"status": "error", "error": " ".join(f"{type(exc).__name__}: {exc}".split()),
            "traceback": traceback.format_exc()}


def _device_name(loaded: LoadedModel) -> str:
    import platform

    import torch

    gpus = [d for d in dict.fromkeys([str(loaded.device), *loaded.devices]) if d.startswith("cuda")]
    if not gpus:
        return f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    names = [torch.cuda.get_device_name(torch.device(d)) for d in gpus]
    return names[0] if len(names) == 1 else (f"{len(names)} x {names[0]}" if len(set(names)) == 1
                                              else " + ".join(names))


def _key_device(config: RunConfig) -> str:
    """The ``device`` of a cell's identity: what a single process would record (``cuda``, ``cpu``, ``cuda:N``),
    the same on every rank of a sharded run and for a model over a device map."""
    from .models import pick_device

    if config.device_map is not None:
        return pick_device(config.device or None).type
    return str(pick_device(config.device))


def _rank_devices(config: RunConfig, rank: distributed.Rank) -> tuple[str | None, list[int] | None, str]:
    """(--device, GPUs for a device map, the process group's device type) of this rank."""
    import torch

    cuda = config.device != "cpu" and torch.cuda.is_available()
    if config.device_map is None:
        device = distributed.rank_device(config.device, rank)
        return device, None, "cuda" if device and device.startswith("cuda") else "cpu"
    if not cuda or rank.local_world == 1:
        return config.device, None, "cuda" if cuda else "cpu"
    share = torch.cuda.device_count() // rank.local_world
    if share < 1:
        raise HarnessError(f"--device-map under torchrun: {rank.local_world} ranks on a node with "
                           f"{torch.cuda.device_count()} GPU(s); allowed: --nproc-per-node <= the GPUs of a node")
    return config.device, list(range(rank.local_rank * share, (rank.local_rank + 1) * share)), "cuda"


def run(config: RunConfig, loaded: LoadedModel | None = None) -> list[dict[str, Any]]:
    """Run every unfinished cell of the grid; append one record per cell to ``config.out``; return them."""

    from .data import describe, load_text

    if not config.policies:
        raise HarnessError("--policy: give at least one policy spec (see 'kvcompress list')")
    if not config.tasks:
        raise HarnessError("--task: give at least one task (see 'kvcompress list')")
    if config.chunk is not None and config.chunk < 1:
        raise HarnessError(f"--chunk: got {config.chunk}; allowed: an integer >= 1")
    config.policies = check_specs(config.policies)
    tasks = resolve_tasks(config.tasks)
    _check_compress(config, tasks)
    unknown = set(config.params) - set(_registry().tasks)
    if unknown:
        raise HarnessError(f"--param: unknown task(s) {', '.join(sorted(unknown))}; "
                           f"known tasks: {', '.join(sorted(_registry().tasks))}")
    params = {name: resolve_params(entry.obj, config.params.get(name, {})) for name, entry in tasks.items()}
    if config.device_map is not None:
        from .placement import label, parse_device_map

        config.device_map = label(parse_device_map(config.device_map))
    rank = distributed.from_env()
    if rank is None or rank.leader:
        for path in [config.out, *shards.shard_files(config.out)]:  # appends start on a line of their own
            for warning in prepare_out(path):
                say(f"warning: {warning}")
    elif Path(config.out).is_dir():
        prepare_out(config.out)  # the same one-line error on every rank
    random_model = loaded.tokenizer is None if loaded else (config.model or "").startswith("random:")
    if random_model and loaded is None:
        from .architectures import parse_random

        parse_random(str(config.model))  # an unknown name or option is the error to show first
    if random_model:
        texty = [n for n, e in tasks.items() if getattr(e.obj, "needs_text", True)]
        if texty:
            raise HarnessError(f"--task {texty[0]}: needs text and a tokenizer, and {config.model or 'this model'} "
                               "is a random-init model without either; allowed with random: models: "
                               f"{', '.join(n for n, e in _registry().tasks.items() if not getattr(e.obj, 'needs_text', True))}")
    text = load_text(config.data, config.data_file)
    if not random_model:
        say(f"data: {describe(text)}")
    key_device = _key_device(config) if rank is not None or config.device_map is not None else None
    group = None
    if rank is not None:
        set_rank(rank.rank, rank.world)
        device, gpus, kind = _rank_devices(config, rank)
        group = distributed.Group(rank, kind)
        say(f"joined the {group.backend} process group of {rank.world} rank(s) (torchrun)")
    else:
        device, gpus = config.device, None
    records = _run(config, loaded, tasks, params, text, rank, group, device, gpus, key_device)
    if group is not None:  # not on an error: the process ends, and leaving would wait on ranks that are gone
        group.close()
    return records


def _run(config: RunConfig, loaded: LoadedModel | None, tasks: dict[str, Any], params: dict[str, dict[str, Any]],
         text: Any, rank: distributed.Rank | None, group: distributed.Group | None, device: str | None,
         gpus: list[int] | None, key_device: str | None) -> list[dict[str, Any]]:
    import kvcompress

    loaded = loaded or load_model(config.model, device, config.dtype, device_map=config.device_map, gpus=gpus)
    try:
        kvcompress.attach(loaded.model)
    except ValueError as exc:
        raise HarnessError(f"--model {loaded.name!r} cannot be used: {exc}") from exc
    groups = plan(config, tasks, loaded.max_length)
    runner = Runner(config, loaded, tasks, params, text, key_device=key_device, rank=rank)
    if group is None:
        records = runner.run(groups)
        merged = shards.merge(config.out, runner.order(groups))  # a killed sharded run's cells, if any
        if merged:
            say(f"merged {len(merged)} record(s) of an earlier sharded run into {config.out}")
        return records
    # rank 0 reads what has finished and every rank gets the same picture, before any rank writes
    runner.done = group.broadcast(finished(shards.all_records(config.out)) if group.rank.leader else None)
    records = runner.run(runner.mine(groups))
    say(f"finished my cells ({len(records)}); waiting for the other ranks")
    sent = group.gather(records)  # every rank's records reach rank 0, whatever its filesystem shows
    if group.rank.leader:
        records = shards.merge(config.out, runner.order(groups), sent=[r for rs in sent or [] for r in rs])
        say(f"merged {len(records)} record(s) of {group.rank.world} rank(s) into {config.out}")
    return records
