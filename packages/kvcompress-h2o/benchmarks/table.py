"""Markdown tables from the JSON lines the benchmark scripts append.

    python benchmarks/table.py benchmarks/results/ppl_main.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text(encoding="utf-8").splitlines() if line]
    ppl = [r for r in rows if r["task"] == "streaming_ppl"]
    if ppl:
        full = {r["tokens"]: r["ppl"] for r in ppl if r["spec"] == "full"}
        print("| spec | tokens | chunk | ppl | full ppl | ratio to full | KV bytes |\n| --- | --- | --- | --- | --- | --- | --- |")
        for r in ppl:
            ref = full.get(r["tokens"])
            ratio = f"{r['ppl'] / ref:.3f}" if ref else "-"
            print(f"| `{r['spec']}` | {r['tokens']} | {r['chunk']} | {r['ppl']:.2f} | {ref or '-'} | {ratio} "
                  f"| {r['kv_bytes']:,} |")
    keys = [r for r in rows if r["task"] == "passkey"]
    if keys:
        table = defaultdict(lambda: defaultdict(list))
        for r in keys:
            table[r["spec"].split("(")[0]][r["prompt_tokens"]].append(r["found"])
        lengths = sorted({r["prompt_tokens"] for r in keys})
        print("| policy | " + " | ".join(f"{n} tok" for n in lengths) + " |")
        print("| --- |" + " --- |" * len(lengths))
        for policy, by_len in table.items():
            cells = [f"{sum(by_len[n])}/{len(by_len[n])}" for n in lengths]
            print(f"| {policy} | " + " | ".join(cells) + " |")
    speed = [r for r in rows if r["task"] == "decode_speed"]
    if speed:
        print("| spec | context | ms/token (median) | ratio to full | KV bytes | device |\n| --- | --- | --- | --- | --- | --- |")
        for r in speed:
            print(f"| `{r['spec']}` | {r['context']} | {r['ms_per_token']:.1f} | {r['ratio_to_full']:.3f} "
                  f"| {r['kv_bytes']:,} | {r['device']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
