"""PNG plots of a results file: quality against KV kept (Pareto front marked), KV memory and decode speed
against length (bars when there is one length), needle heat maps. Axes in words with units."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .leaderboard import pareto, points, setting_words, value
from .summary import kept_fraction, label

MARKERS = "osD^v<>pPXh*"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def family(spec: str) -> str:
    """``h2o(budget=256)+quant(bits=4)`` -> ``h2o+quant``: what a colour and marker stand for."""
    return "+".join(part.split("(")[0] for part in spec.split("+"))


def _styles(specs: list[str]) -> dict[str, tuple[Any, str]]:
    plt = _plt()
    families = sorted({family(s) for s in specs}, key=lambda f: (f != "full", f))
    colours = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    by_family = {f: (colours(i % colours.N), MARKERS[i % len(MARKERS)]) for i, f in enumerate(families)}
    return {s: by_family[family(s)] for s in specs}


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_quality(records: list[dict[str, Any]], task: str, path: Path) -> Path | None:
    """Quality against the fraction of KV bytes kept, one point per policy; a panel per setting."""
    by_setting = points(records, task)
    if not by_setting:
        return None
    plt = _plt()
    rows, cols = _grid(len(by_setting))
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    styles = _styles(sorted({r["policy"] for recs in by_setting.values() for r in recs}))
    shown: set[str] = set()
    for ax, (key, recs) in zip(axes.flat, by_setting.items()):
        front = pareto(recs)
        seen: dict[tuple, int] = defaultdict(int)
        for r in sorted(recs, key=kept_fraction):
            x, y = 100 * kept_fraction(r), value(r)
            spot = (round(x, 1), round(y, 3))
            nudge = seen[spot]
            seen[spot] += 1
            colour, marker = styles[r["policy"]]
            fam = family(r["policy"])
            ax.scatter([x + 0.6 * nudge], [y], color=colour, marker=marker, s=70 if r["policy"] in front else 40,
                       edgecolors="black" if r["policy"] in front else "none", zorder=3,
                       label=fam if fam not in shown else None)
            shown.add(fam)
            near = sum(1 for o in recs if o is not r and abs(100 * kept_fraction(o) - x) < 4
                       and kept_fraction(o) <= kept_fraction(r) and abs(value(o) - y) < 0.04 * (abs(y) + 1e-9))
            ax.annotate(r["policy"], (x + 0.6 * nudge, y), fontsize=6, xytext=(4, 3 - 8 * near),
                        textcoords="offset points")
        line = sorted((100 * kept_fraction(r), value(r)) for r in recs if r["policy"] in front)
        if len(line) > 1:
            ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="gray", lw=1, zorder=2,
                    label="Pareto front" if "Pareto front" not in shown else None)
            shown.add("Pareto front")
        ax.set_xlabel("KV cache kept (% of full's bytes)")
        ax.set_ylabel(label(recs[0], recs[0]["primary"]))
        ax.set_title(f"{task}: {setting_words(key)}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(by_setting):]:
        ax.set_visible(False)
    fig.suptitle(f"{task}: quality against KV memory kept (outlined: Pareto front)", fontsize=11)
    fig.legend(loc="lower center", ncol=min(6, len(shown)), fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.18)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(records: list[dict[str, Any]], tasks: tuple[str, ...], metric: str) -> tuple[str, list[dict[str, Any]]]:
    for task in tasks:
        recs = [r for r in records if r.get("task") == task and r.get("status") == "ok"
                and isinstance((r.get("metrics") or {}).get(metric), (int, float))]
        if recs:
            return task, recs
    return "", []


def plot_by_length(records: list[dict[str, Any]], metric: str, ylabel: str, title: str, path: Path,
                   tasks: tuple[str, ...], scale: float = 1.0) -> Path | None:
    """``metric`` (times ``scale``) against length, one line per policy, a panel per batch size; bars per
    policy when there is one length."""
    task, recs = _series(records, tasks, metric)
    if not recs:
        return None
    plt = _plt()
    batches = sorted({int(r.get("batch") or 1) for r in recs})
    modes = sorted({str(r.get("compress") or "") for r in recs})
    recs = [r for r in recs if str(r.get("compress") or "") == modes[0]]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.8 * len(batches), 4.6), squeeze=False)
    specs = sorted({r["policy"] for r in recs}, key=lambda s: (s != "full", s))
    styles = _styles(specs)
    for ax, batch in zip(axes.flat, batches):
        mine = [r for r in recs if int(r.get("batch") or 1) == batch]
        lengths = sorted({r["length"] for r in mine})
        if len(lengths) == 1:
            vals = {r["policy"]: r["metrics"][metric] * scale for r in mine}
            names = [s for s in specs if s in vals]
            ax.barh(range(len(names)), [vals[s] for s in names], color=[styles[s][0] for s in names])
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            for i, s in enumerate(names):
                ax.annotate(f"{vals[s]:,.0f}" if vals[s] >= 100 else f"{vals[s]:.3g}", (vals[s], i), fontsize=7, xytext=(3, -3), textcoords="offset points")
            ax.set_xlabel(ylabel)
            ax.set_title(f"{title}: {lengths[0]:,} tokens" + (f", batch {batch}" if len(batches) > 1 else ""),
                         fontsize=10)
        else:
            for k, spec in enumerate(specs):
                pts = sorted((r["length"], r["metrics"][metric] * scale) for r in mine if r["policy"] == spec)
                if not pts:
                    continue
                jitter = 1 + 0.01 * (k - len(specs) / 2)  # lines that coincide stay visible side by side
                colour, marker = styles[spec]
                ax.plot([p[0] * jitter for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                        label=spec, lw=1.2, ms=5, alpha=0.85)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(title + (f", batch {batch}" if len(batches) > 1 else ""), fontsize=10)
            ax.legend(fontsize=7)
        ax.ticklabel_format(axis="x" if len(lengths) == 1 else "y", style="plain", useOffset=False)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} ({task} task)", fontsize=11)
    return _save(plt, fig, path)


def plot_needle(records: list[dict[str, Any]], policy: str, path: Path) -> Path | None:
    """Needle accuracy heat map: depth x length."""
    recs = sorted((r for r in records if r.get("task") == "needle" and r["policy"] == policy
                   and r.get("status") == "ok"), key=lambda r: (r["length"], str(r.get("compress"))))
    if not recs:
        return None
    depths = sorted({float(d) for r in recs for d in r["metrics"]["by_depth"]})
    grid = [[r["metrics"]["by_depth"].get(f"{d:g}", float("nan")) for r in recs] for d in depths]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    modes = len({r.get("compress") for r in recs}) > 1
    ax.set_xticks(range(len(recs)), [f"{r['length']}" + (f"\n{r.get('compress')}" if modes else "") for r in recs])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0 = start, 1 = end)")
    ax.set_title(f"needle: values found (fraction), {policy}")
    fig.colorbar(im, ax=ax, label="fraction found")
    return _save(plt, fig, path)
