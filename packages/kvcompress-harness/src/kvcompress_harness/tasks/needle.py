"""``needle``: needles in a haystack of real text, over lengths x depths (a heat map in the report).

``needles`` facts ("the special magic number for CITY is N") sit in WikiText; the question asks for the
one at ``depth`` (the others, at evenly spread depths, are distractors). With ``values`` > 1 the asked
city has that many numbers, and a trial scores the share of them the answer names (RULER's multi-key and
multi-value needles).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from ..task import TaskContext
from .common import mean, mean_known
from .prompts import fit_facts, numbers, split_prompt
from .retrieval import COMPRESS_MODES, answer

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Tbilisi", "Dakar", "Perth", "Bergen",
          "Lyon", "Osaka", "Cusco", "Accra", "Riga", "Hobart")
HEAD = "Read the following text and remember the special magic numbers in it.\n\n"
FACT = " The special magic number for {city} is {number}. "
FACTS = " The special magic numbers for {city} are {numbers}. "
TAIL = "\n\nWhat is the special magic number for {city} mentioned in the text above? " \
       "The special magic number for {city} is"
TAIL_MANY = "\n\nWhat are all the special magic numbers for {city} mentioned in the text above? " \
            "The special magic numbers for {city} are"


def sentences(text: str) -> list[str]:
    """The text cut after each sentence end, keeping every character."""
    return [s for s in re.split(r"(?<=[.!?] )", text) if s]


def distractor_depths(count: int) -> list[float]:
    """``count`` depths spread evenly inside 0..1."""
    return [(i + 1) / (count + 1) for i in range(count)]


class NeedleTask:
    """Needles in a haystack of WikiText: accuracy per needle depth at each length."""

    name = "needle"
    primary = "accuracy"
    higher_is_better = True
    default_lengths = (512, 1024, 2048)
    defaults: ClassVar[dict[str, Any]] = {"depths": (0.0, 0.25, 0.5, 0.75, 1.0), "trials": 1, "new_tokens": 10,
                                          "chat": False, "needles": 1, "values": 1}
    limits: ClassVar[dict[str, tuple]] = {"depths": (0.0, 1.0), "trials": (1, None), "new_tokens": (1, None),
                                          "needles": (1, len(CITIES)), "values": (1, 8)}
    compress_modes = COMPRESS_MODES
    labels: ClassVar[dict[str, str]] = {"accuracy": "needle values found (fraction)",
                                        "fact_kept": "share of the fact's value tokens the cache held"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Greedy answer per (depth, trial): the share of the asked city's numbers among the answer's."""
        rng = ctx.rng()
        units = sentences(ctx.text.text)
        n_needles, n_values = int(ctx.params["needles"]), int(ctx.params["values"])
        new = max(int(ctx.params["new_tokens"]), 9 * n_values)
        per_depth: dict[str, float] = {}
        kept_by_depth: dict[str, float | None] = {}
        hits, kv, kept, held = [], [], [], {}
        for depth in ctx.params["depths"]:
            depth_hits = []
            for _ in range(int(ctx.params["trials"])):
                cities = rng.sample(CITIES, n_needles)
                values = [str(rng.randint(1000000, 9999999)) for _ in range(n_values)]
                asked = cities[0]
                fact = FACT.format(city=asked, number=values[0]) if n_values == 1 else \
                    FACTS.format(city=asked, numbers=", ".join(values))
                facts = [(float(depth), fact)] + [
                    (d, FACT.format(city=c, number=rng.randint(1000000, 9999999)))
                    for d, c in zip(distractor_depths(n_needles - 1), cities[1:])]
                tail = (TAIL if n_values == 1 else TAIL_MANY).format(city=asked)
                text = fit_facts(ctx.tokenizer, HEAD, units, facts, tail, ctx.length)
                prompt = split_prompt(ctx.tokenizer, text, tail, ctx.device, chat=bool(ctx.params["chat"]),
                                      mark=values[0])
                tokens, held = answer(ctx, prompt, new)
                said = numbers(ctx.tokenizer.decode(tokens, skip_special_tokens=True))
                said = said[:1] if n_values == 1 else said
                depth_hits.append(sum(v in said for v in values) / n_values)
                kv.append(held["kv_bytes"])
                kept.append(held["fact_kept"])
            per_depth[f"{float(depth):g}"] = mean(depth_hits)
            kept_by_depth[f"{float(depth):g}"] = mean_known(kept[len(kept) - len(depth_hits):])
            hits.extend(depth_hits)
        return {"accuracy": mean(hits), "by_depth": per_depth, "trials": len(hits), **held, "kv_bytes": max(kv),
                "fact_kept": mean_known(kept), "fact_kept_by_depth": kept_by_depth}
