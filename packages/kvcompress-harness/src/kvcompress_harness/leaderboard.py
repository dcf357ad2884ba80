"""The leaderboard: per task and setting, quality against the fraction of KV bytes kept, the Pareto front,
one summary line, and a speed table."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .summary import SHORT, kept_fraction, label, mb, number

SPEED_TASKS = ("speed", "max_batch")


def setting(record: dict[str, Any]) -> tuple[int, int, str]:
    """What else a point depends on besides the policy: (length, batch, compress mode)."""
    return (int(record.get("length") or 0), int(record.get("batch") or 1), str(record.get("compress") or ""))


def setting_words(key: tuple[int, int, str]) -> str:
    """``(2048, 1, "context")`` -> ``2,048 tokens, context compressed``."""
    length, batch, mode = key
    words = [f"{length:,} tokens"]
    if batch != 1:
        words.append(f"batch {batch}")
    if mode:
        words.append({"prompt": "whole prompt compressed", "context": "context compressed, then the question"}
                     .get(mode, f"compress={mode}"))
    return ", ".join(words)


def points(records: list[dict[str, Any]], task: str) -> dict[tuple, list[dict[str, Any]]]:
    """Finished records of ``task`` with a primary metric and a kept fraction, by setting."""
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("task") != task or r.get("status") != "ok":
            continue
        value = (r.get("metrics") or {}).get(r.get("primary", ""))
        if isinstance(value, (int, float)) and kept_fraction(r) is not None:
            out[setting(r)].append(r)
    return dict(sorted(out.items()))


def value(record: dict[str, Any]) -> float:
    """The record's primary metric."""
    return float(record["metrics"][record["primary"]])


def pareto(recs: list[dict[str, Any]]) -> set[str]:
    """Policies no other beats on both axes (fewer KV bytes kept and better quality)."""
    better = (lambda a, b: a > b) if recs and recs[0].get("higher_is_better") else (lambda a, b: a < b)
    front = set()
    for r in recs:
        x, y = kept_fraction(r), value(r)
        dominated = any(
            (kept_fraction(o) <= x and not better(y, value(o)) and (kept_fraction(o) < x or better(value(o), y)))
            for o in recs if o is not r)
        if not dominated:
            front.add(r["policy"])
    return front


def change(record: dict[str, Any]) -> str:
    """How far the policy is from ``full`` in words (``+6% perplexity``, ``accuracy 0.6 (full 1.0)``)."""
    ref = ((record.get("reference") or {}).get("metrics") or {}).get(record["primary"])
    v, short = value(record), SHORT.get(record["primary"], record["primary"])
    if not isinstance(ref, (int, float)):
        return f"{short} {number(v)}"
    if not record.get("higher_is_better") and ref:
        return f"{(v / ref - 1) * 100:+.1f}% {short}"
    return f"{short} {number(v)} (full {number(ref)})"


def summary_line(task: str, by_setting: dict[tuple, list[dict[str, Any]]]) -> str | None:
    """One sentence per task: at the most common compression of its largest setting, what each policy loses."""
    if not by_setting:
        return None
    key = max(by_setting, key=lambda k: (len(by_setting[k]), k))
    recs = [r for r in by_setting[key] if r["policy"] != "full"]
    if not recs:
        return None
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        buckets[max(1, round(1 / max(kept_fraction(r), 1e-9)))].append(r)
    times = max(buckets, key=lambda t: (len(buckets[t]), t))
    group = sorted(buckets[times], key=value, reverse=bool(recs[0].get("higher_is_better")))
    kept = sorted(kept_fraction(r) for r in group)
    span = f"{kept[0]:.0%}" if f"{kept[0]:.0%}" == f"{kept[-1]:.0%}" else f"{kept[0]:.0%}-{kept[-1]:.0%}"
    parts = ", ".join(f"`{r['policy']}` {change(r)}" for r in group)
    return (f"**{task}** at {setting_words(key)}, about {times}x compression ({span} of full's KV bytes kept): "
            f"{parts}; best: `{group[0]['policy']}`.")


def quality_table(task: str, by_setting: dict[tuple, list[dict[str, Any]]]) -> list[str]:
    """Markdown: one table per setting, best first, Pareto front marked."""
    lines: list[str] = []
    for key, recs in by_setting.items():
        front = pareto(recs)
        first = recs[0]
        lines += [f"#### {task}: {setting_words(key)}", "",
                  (f"| rank | policy | KV kept (% of full) | KV held | {label(first, first['primary'])} | vs full | "
                  "Pareto |"), "|---|---|---|---|---|---|---|"]
        ranked = sorted(recs, key=value, reverse=bool(first.get("higher_is_better")))
        for i, r in enumerate(ranked, 1):
            lines.append(f"| {i} | `{r['policy']}` | {kept_fraction(r):.1%} | {mb(r['metrics'].get('kv_bytes'))} | "
                         f"{number(value(r))} | {change(r) if r['policy'] != 'full' else '-'} | "
                         f"{'yes' if r['policy'] in front else ''} |")
        lines += ["", ("KV kept: the policy's cache bytes over `full`'s on the same cell; Pareto: no other policy "
                  "keeps fewer bytes with better quality."), ""]
    return lines


def speed_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: every speed / max_batch record, grouped by setting."""
    lines: list[str] = []
    speed = [r for r in records if r.get("task") == "speed" and r.get("status") in ("ok", "oom")]
    if speed:
        lines += [("| policy | context | batch | decode tokens/s | step / full's (median of pairs) | mean step / full's "
                  "| prefill s | KV held | KV kept | allocator peak |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(speed, key=lambda r: (setting(r), r["policy"] != "full", r["policy"])):
            m = r.get("metrics") or {}
            if r["status"] == "oom":
                lines.append(f"| `{r['policy']}` | {r['length']} | {r.get('batch', 1)} | out of memory | | | | | | |")
                continue
            frac = kept_fraction(r)
            peak = m.get("peak_memory_bytes") if m.get("peak_memory_kind") == "cuda_allocator" else None
            lines.append(f"| `{r['policy']}` | {r['length']} | {r.get('batch', 1)} | {number(m.get('decode_tokens_per_s'))}"
                         f" | {number(m.get('median_step_ratio'))} | {number(m.get('mean_ratio'))} | "
                         f"{number(m.get('prefill_s'))} | {mb(m.get('kv_bytes'))} | "
                         f"{'-' if frac is None else f'{frac:.1%}'} | {mb(peak) if peak is not None else '-'} |")
        lines += ["", ("Decode steps are paired: every policy and `full` held at once, single steps alternating in a "
                  "shuffled order; step / full's is the median over steps of the ratio to `full`'s step of the same "
                  "round (below 1 is faster). Allocator peak: the CUDA allocator's peak during the prefill, above "
                  "what was held before it (CPU: not measured)."), ""]
    lines += graph_table(speed)
    cap = [r for r in records if r.get("task") == "max_batch" and r.get("status") in ("ok", "oom")]
    if cap:
        lines += [("| policy | context | largest batch that fits | out of memory at | decode tokens/s there | "
                  "vs full |"), "|---|---|---|---|---|---|"]
        for r in sorted(cap, key=lambda r: (r["length"], r["policy"] != "full", r["policy"])):
            m = r.get("metrics") or {}
            ratio = (r.get("ratio_to_full") or {}).get("max_batch")
            lines.append(f"| `{r['policy']}` | {r['length']} | {number(m.get('max_batch'))} | "
                         f"{number(m.get('oom_at'))} | {number(m.get('decode_tokens_per_s'))} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append("")
    return lines


def graph_table(speed: list[dict[str, Any]]) -> list[str]:
    """Markdown: decode without the host in the way, for speed records with a graph phase or GPU times."""
    keys = ("graph_replay_ms_per_token", "graph_refused", "gpu_ms_per_step", "generate_ms_per_token")
    rows = [r for r in speed if r["status"] == "ok" and any(k in (r.get("metrics") or {}) for k in keys)]
    if not rows:
        return []
    lines = [("| policy | context | batch | eager step ms | GPU ms per step | graph replay ms/token | replay / GPU "
              "time | full's eager step / replay | setup s | full's generate ms/token |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (setting(r), r["policy"] != "full", r["policy"])):
        m = r.get("metrics") or {}
        if m.get("graph_refused"):
            replay = "refused: " + m["graph_refused"].split(";")[0].removeprefix("static_generate: ")
        else:
            replay = number(m.get("graph_replay_ms_per_token"))
        speedup = m.get("graph_replay_speedup_over_full_step")
        lines.append(f"| `{r['policy']}` | {r['length']} | {r.get('batch', 1)} | {number(m.get('decode_ms_per_token'))}"
                     f" | {number(m.get('gpu_ms_per_step'))} | {replay} | {number(m.get('graph_replay_over_gpu'))} | "
                     f"{'-' if speedup is None else f'{speedup:.2f}x'} | {number(m.get('graph_setup_s'))} | "
                     f"{number(m.get('generate_ms_per_token'))} |")
    lines += ["", ("Graph replay: `kvcompress.static_generate`'s steady decode steps (each a replayed CUDA graph on a "
              "GPU, with its eviction when due), the layout, warm-up and capture apart (setup s, once per call). "
              "GPU ms per step: torch.profiler's kernel time of the policy's eager step (`speed.profile_steps`). "
              "full's generate: transformers' eager `model.generate`, median of the graph phase's rounds."), ""]
    return lines


def leaderboard(records: list[dict[str, Any]]) -> str:
    """The whole ``leaderboard.md``."""
    lines = ["# Leaderboard", ""]
    tasks = sorted({r["task"] for r in records} - set(SPEED_TASKS))
    summaries = [s for s in (summary_line(t, points(records, t)) for t in tasks) if s]
    if summaries:
        lines += ["## In one line per task", "", *[f"- {s}" for s in summaries], ""]
    for task in tasks:
        by_setting = points(records, task)
        if by_setting:
            lines += [f"## {task}", "", *quality_table(task, by_setting)]
    speed = speed_table(records)
    if speed:
        lines += ["## Speed", "", *speed]
    return "\n".join(lines).rstrip() + "\n"
