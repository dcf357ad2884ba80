"""Markdown tables from harness results files (``kvcompress run --out ...``): one row per policy spec with its
budget taken out, one column per budget, the primary metric (ratio to ``full`` in brackets for perplexity).

    python benchmarks/tables.py ../../benchmarks/results/cluster/ppl_reference.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict


def _split(spec: str) -> tuple[str, str]:
    """``cluster(budget=256,mode=evict)`` -> (``cluster(mode=evict)``, ``256``)."""
    m = re.search(r"(budget|ratio)=([0-9.]+)", spec)
    if not m:
        return spec, "-"
    rest = (spec[: m.start()] + spec[m.end():]).replace("(,", "(").replace(",)", ")").replace(",,", ",")
    return rest.replace("()", ""), m.group(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--metric", default=None, help="metric to show (default: each task's primary)")
    args = p.parse_args()
    groups: dict[tuple, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for path in args.results:
        for line in open(path):
            r = json.loads(line)
            if r["status"] != "ok":
                continue
            metric = args.metric or r["primary"]
            value = r["metrics"].get(metric)
            if value is None:
                continue
            name, budget = _split(r["policy"])
            ratio = r.get("ratio_to_full", {}).get(metric)
            text = f"{value:.2f}" if isinstance(value, float) else str(value)
            if r["task"] == "perplexity" and ratio and name != "full":
                text += f" ({ratio:.2f}x)"
            if r["task"] == "speed" and ratio:
                text = f"{value:.1f} ms ({ratio:.3f}x)"
            key = (r["task"], r["length"], json.dumps(r["params"], sort_keys=True), metric)
            groups[key][name][budget] = text
    for (task, length, params, metric), rows in groups.items():
        budgets = sorted({b for row in rows.values() for b in row if b != "-"}, key=float)
        print(f"\n{task}, length {length}, params {params}, {metric}\n")
        print("| policy | " + " | ".join(budgets or ["-"]) + " |")
        print("| --- |" + " --- |" * max(1, len(budgets)))
        for name, row in rows.items():
            cells = [row.get(b, row.get("-", "")) for b in budgets] if budgets else [row.get("-", "")]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
