"""``needle``: needle in a haystack of real text, over lengths x depths (a heat map in the report)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from ..decoding import greedy
from ..task import TaskContext
from .common import kv_bytes, mean
from .prompts import encode, first_number, fit_units

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Tbilisi", "Dakar", "Perth", "Bergen")
HEAD = "Read the following text and remember the special magic number in it.\n\n"
FACT = " The special magic number for {city} is {number}. "
TAIL = "\n\nWhat is the special magic number for {city} mentioned in the text above? " \
       "The special magic number for {city} is"


def sentences(text: str) -> list[str]:
    """The text cut after each sentence end, keeping every character."""
    return [s for s in re.split(r"(?<=[.!?] )", text) if s]


class NeedleTask:
    """Needle in a haystack of WikiText: accuracy per needle depth at each length."""

    name = "needle"
    primary = "accuracy"
    higher_is_better = True
    default_lengths = (512, 1024, 2048)
    defaults: ClassVar[dict[str, Any]] = {"depths": (0.0, 0.25, 0.5, 0.75, 1.0), "trials": 1, "new_tokens": 10,
                                "chat": False}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Greedy answer per (depth, trial); correct when its first number is the needle's."""
        rng = ctx.rng()
        units = sentences(ctx.text.text)
        per_depth: dict[str, float] = {}
        hits, kv = [], []
        for depth in ctx.params["depths"]:
            depth_hits = []
            for _ in range(int(ctx.params["trials"])):
                city, number = rng.choice(CITIES), str(rng.randint(1000000, 9999999))
                prompt = fit_units(ctx.tokenizer, HEAD, units, FACT.format(city=city, number=number),
                                   TAIL.format(city=city), ctx.length, float(depth))
                ids = encode(ctx.tokenizer, prompt, ctx.device, chat=bool(ctx.params["chat"]))
                cache = ctx.make_cache()
                gen = greedy(ctx.model, ids, cache, int(ctx.params["new_tokens"]), chunk=ctx.chunk)
                answer = ctx.tokenizer.decode(gen.tokens, skip_special_tokens=True)
                depth_hits.append(float(first_number(answer) == number))
                kv.append(kv_bytes(cache))
            per_depth[f"{float(depth):g}"] = mean(depth_hits)
            hits.extend(depth_hits)
        return {"accuracy": mean(hits), "by_depth": per_depth, "trials": len(hits), "kv_bytes": max(kv)}
