"""``kvcompress report``: a markdown table and PNG plots from a results file."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import DataError
from .results import read_records

KV_TASK_ORDER = ("speed", "perplexity", "fidelity", "agreement", "passkey", "needle", "longbench")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _compression(rec: dict[str, Any]) -> float | None:
    kv = (rec.get("metrics") or {}).get("kv_bytes")
    ref = ((rec.get("reference") or {}).get("metrics") or {}).get("kv_bytes")
    return ref / kv if kv and ref else None


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each (model, task, length, policy, params, chunk, device)."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r.get("model"), r.get("task"), r.get("length"), r.get("policy"), str(r.get("params")),
               r.get("chunk"), r.get("device"))
        out[key] = r
    return list(out.values())


def markdown(records: list[dict[str, Any]]) -> str:
    """One table per task: policy, length, the primary metric, full's, ratio, KV bytes, compression."""
    lines = ["# kvcompress results", ""]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    for task, recs in sorted(by_task.items()):
        primary = recs[0].get("primary", "")
        first = recs[0]
        lines += [f"## {task}", "",
                  (f"model `{first.get('model')}`, device `{first.get('device')}`, "
                   f"chunk `{first.get('chunk')}`, data `{first.get('data_source')}`, primary metric `{primary}` "
                   f"({'higher' if first.get('higher_is_better') else 'lower'} is better)"), "",
                  f"| policy | length | {primary} | full | ratio to full | KV bytes | KV compression | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(recs, key=lambda r: (r["length"], r["policy"] != "full", r["policy"])):
            if r.get("status") != "ok":
                lines.append(f"| `{r['policy']}` | {r['length']} | error: {r.get('error', '')[:80]} "
                             "| | | | | |")
                continue
            m = r.get("metrics") or {}
            ref = (r.get("reference") or {}).get("metrics") or {}
            lines.append(
                f"| `{r['policy']}` | {r['length']} | {_fmt(m.get(primary))} | {_fmt(ref.get(primary))} | "
                f"{_fmt((r.get('ratio_to_full') or {}).get(primary))} | {_fmt(m.get('kv_bytes'))} | "
                f"{_fmt(_compression(r))} | {_fmt(r.get('wall_s'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_quality(records: list[dict[str, Any]], task: str, path: Path) -> Path | None:
    """Primary metric against KV compression (full bytes / policy bytes), one series per policy."""
    recs = [r for r in records if r["task"] == task and r.get("status") == "ok" and _compression(r)]
    if not recs:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    primary = recs[0].get("primary", "")
    for policy in sorted({r["policy"] for r in recs}):
        pts = sorted((_compression(r), r["metrics"].get(primary), r["length"]) for r in recs
                     if r["policy"] == policy and isinstance(r["metrics"].get(primary), (int, float)))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
            for x, y, length in pts:
                ax.annotate(str(length), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV compression (full bytes / policy bytes)")
    ax.set_ylabel(primary)
    ax.set_title(f"{task}: quality vs KV compression (labels: length)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_by_length(records: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path,
                   tasks: tuple[str, ...]) -> Path | None:
    """``metric`` against length, one line per policy, from the first of ``tasks`` that has it."""
    for task in tasks:
        recs = [r for r in records if r["task"] == task and r.get("status") == "ok"
                and isinstance((r.get("metrics") or {}).get(metric), (int, float))]
        if recs:
            break
    else:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for policy in sorted({r["policy"] for r in recs}):
        pts = sorted((r["length"], r["metrics"][metric]) for r in recs if r["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({task})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_needle(records: list[dict[str, Any]], policy: str, path: Path) -> Path | None:
    """Needle accuracy heat map: depth x length."""
    recs = sorted((r for r in records if r["task"] == "needle" and r["policy"] == policy
                   and r.get("status") == "ok"), key=lambda r: r["length"])
    if not recs:
        return None
    depths = sorted({float(d) for r in recs for d in r["metrics"]["by_depth"]})
    grid = [[r["metrics"]["by_depth"].get(f"{d:g}", float("nan")) for r in recs] for d in depths]
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(recs)), [str(r["length"]) for r in recs])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle accuracy: {policy}")
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def report(results: str, out_dir: str | None = None) -> dict[str, Any]:
    """Write ``<stem>-report.md`` and PNGs beside ``results`` (or in ``out_dir``); return their paths."""
    src = Path(results)
    if not src.is_file():
        raise DataError(f"report: results file {results!r} does not exist")
    records = latest(read_records(src))
    if not records:
        raise DataError(f"report: {results!r} holds no results")
    out = Path(out_dir) if out_dir else src.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = src.stem
    md_path = out / f"{stem}-report.md"
    md_path.write_text(markdown(records), encoding="utf-8")
    plots = []
    for task in sorted({r["task"] for r in records}):
        plots.append(plot_quality(records, task, out / f"{stem}-quality-{task}.png"))
    plots.append(plot_by_length(records, "kv_bytes", "KV bytes held", "KV cache bytes vs length",
                                out / f"{stem}-kv-bytes.png", KV_TASK_ORDER))
    plots.append(plot_by_length(records, "decode_tokens_per_s", "decode tokens/s", "decode speed vs length",
                                out / f"{stem}-decode-speed.png", ("speed",)))
    for policy in sorted({r["policy"] for r in records if r["task"] == "needle"}):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in policy)
        plots.append(plot_needle(records, policy, out / f"{stem}-needle-{safe}.png"))
    return {"markdown": md_path, "plots": [p for p in plots if p is not None]}
