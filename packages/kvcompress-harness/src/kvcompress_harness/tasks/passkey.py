"""``passkey``: the classic synthetic pass-key retrieval (Mohtashami & Jaggi, 2023)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..task import TaskContext
from .common import mean, mean_known
from .prompts import first_number, fit_units, split_prompt
from .retrieval import COMPRESS_MODES, answer

HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FACT = "The pass key is {key}. Remember it. {key} is the pass key. "
TAIL = "\nWhat is the pass key? The pass key is"


class PasskeyTask:
    """Pass-key retrieval in repeated filler text: accuracy over key depths 0..1."""

    name = "passkey"
    primary = "accuracy"
    higher_is_better = True
    default_lengths = (512, 1024, 2048)
    defaults: ClassVar[dict[str, Any]] = {"depths": (0.0, 0.25, 0.5, 0.75, 1.0), "trials": 1, "new_tokens": 8,
                                          "chat": False}
    limits: ClassVar[dict[str, tuple]] = {"depths": (0.0, 1.0), "trials": (1, None), "new_tokens": (1, None)}
    compress_modes = COMPRESS_MODES
    labels: ClassVar[dict[str, str]] = {"accuracy": "pass keys found (fraction)",
                                        "fact_kept": "share of the fact's value tokens the cache held"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """Greedy answer per (depth, trial); correct when its first number is the key."""
        rng = ctx.rng()
        per_depth: dict[str, float] = {}
        kept_by_depth: dict[str, float | None] = {}
        hits, prompt_tokens, kv, kept, held = [], [], [], [], {}
        for depth in ctx.params["depths"]:
            depth_hits = []
            for _ in range(int(ctx.params["trials"])):
                key = str(rng.randint(10000, 99999))
                units = [FILLER] * (ctx.length // 4 + 8)
                text = fit_units(ctx.tokenizer, HEAD, units, FACT.format(key=key), TAIL, ctx.length, depth)
                prompt = split_prompt(ctx.tokenizer, text, TAIL, ctx.device, chat=bool(ctx.params["chat"]),
                                      mark=key)
                tokens, held = answer(ctx, prompt, int(ctx.params["new_tokens"]))
                reply = ctx.tokenizer.decode(tokens, skip_special_tokens=True)
                depth_hits.append(float(first_number(reply) == key))
                prompt_tokens.append(prompt.length)
                kv.append(held["kv_bytes"])
                kept.append(held["fact_kept"])
            per_depth[f"{float(depth):g}"] = mean(depth_hits)
            kept_by_depth[f"{float(depth):g}"] = mean_known(kept[len(kept) - len(depth_hits):])
            hits.extend(depth_hits)
        return {"accuracy": mean(hits), "by_depth": per_depth, "trials": len(hits),
                "prompt_tokens": mean(prompt_tokens), **held, "kv_bytes": max(kv),
                "fact_kept": mean_known(kept), "fact_kept_by_depth": kept_by_depth}
