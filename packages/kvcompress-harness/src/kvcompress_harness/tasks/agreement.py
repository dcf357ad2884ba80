"""``agreement``: greedy generations with the policy against the full cache on the same prompts."""

from __future__ import annotations

from typing import Any, ClassVar

from ..metrics import bleu, first_divergence, rouge_l, token_match_rate
from ..task import TaskContext
from .common import kv_bytes, mean


class AgreementTask:
    """Greedy continuations vs full: token match rate, first divergence, ROUGE-L, BLEU."""

    name = "agreement"
    primary = "token_match"
    higher_is_better = True
    default_lengths = (512, 1024)
    defaults: ClassVar[dict[str, Any]] = {"prompts": 2, "new_tokens": 32}
    limits: ClassVar[dict[str, tuple]] = {"prompts": (1, None), "new_tokens": (1, None)}
    labels: ClassVar[dict[str, str]] = {"token_match": "greedy tokens equal to full's (fraction)"}

    def run(self, ctx: TaskContext) -> dict[str, Any]:
        """``prompts`` windows of ``length`` text tokens, each continued greedily by both caches."""
        from ..decoding import greedy

        new = int(ctx.params["new_tokens"])
        total = ctx.text_ids().numel()
        n = int(ctx.params["prompts"])
        stride = max(1, (total - ctx.length) // max(1, n))
        matches, divergences, rouges, refs, hyps, kv = [], [], [], [], [], []
        for i in range(n):
            ids = ctx.tokens(ctx.length, offset=min(i * stride, total - ctx.length))
            ref = ctx.remember(("agreement", ctx.length, i, n, new, ctx.chunk), lambda ids=ids: greedy(
                ctx.model, ids, ctx.make_cache("full"), new, chunk=ctx.chunk).tokens)
            cache = ctx.make_cache()
            hyp = greedy(ctx.model, ids, cache, new, chunk=ctx.chunk).tokens
            kv.append(kv_bytes(cache))
            ref_text = ctx.tokenizer.decode(ref, skip_special_tokens=True)
            hyp_text = ctx.tokenizer.decode(hyp, skip_special_tokens=True)
            matches.append(token_match_rate(ref, hyp))
            div = first_divergence(ref, hyp)
            divergences.append(len(ref) if div is None else div)
            rouges.append(rouge_l(ref_text, hyp_text))
            refs.append(ref_text)
            hyps.append(hyp_text)
        return {
            "token_match": mean(matches),
            "first_divergence": mean(divergences),
            "rouge_l": mean(rouges),
            "bleu": bleu(refs, hyps),
            "prompts": n,
            "new_tokens": new,
            "kv_bytes": max(kv),
        }
