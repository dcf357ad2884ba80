"""Metrics the tasks report, registered through ``register_metrics`` for other plugins to reuse.

Text metrics come from their reference libraries (``rouge-score``, ``sacrebleu``); the
LongBench F1 follows LongBench's ``metrics.py`` (its normalisation and whitespace tokens).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def token_match_rate(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Fraction of reference positions where the candidate has the same token."""
    if not reference:
        return 1.0
    same = sum(1 for i, tok in enumerate(reference) if i < len(candidate) and candidate[i] == tok)
    return same / len(reference)


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """Index of the first differing token, or None when the candidate matches the whole reference."""
    for i, tok in enumerate(reference):
        if i >= len(candidate) or candidate[i] != tok:
            return i
    return None


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure (``rouge-score``, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(scorer.score(reference, candidate)["rougeL"].fmeasure)


def bleu(references: Sequence[str], candidates: Sequence[str]) -> float:
    """Corpus BLEU (``sacrebleu``, 0-100) of candidates against one reference each."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(candidates), [list(references)]).score)


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats)."""
    return math.exp(mean_nll)


def next_token_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) of next-token distributions over the last dim (nats, per row)."""
    import torch.nn.functional as F

    ref = F.log_softmax(reference_logits.float(), dim=-1)
    cand = F.log_softmax(candidate_logits.float(), dim=-1)
    return F.kl_div(cand, ref, reduction="none", log_target=True).sum(-1)


def distribution_distances(reference: torch.Tensor, candidate: torch.Tensor, eps: float = 1e-8) -> dict:
    """KL (eps-smoothed), cosine, L1, L2 and |argmax shift| between distributions over the last dim.

    Both are [..., S] over the same key positions; returns means over the leading dims.
    """
    import torch
    import torch.nn.functional as F

    ref = reference.float()
    cand = candidate.float()
    ref_s = (ref + eps) / (ref + eps).sum(-1, keepdim=True)
    cand_s = (cand + eps) / (cand + eps).sum(-1, keepdim=True)
    kl = F.kl_div(cand_s.log(), ref_s, reduction="none").sum(-1)
    return {
        "kl": float(kl.mean()),
        "cosine": float(F.cosine_similarity(ref, cand, dim=-1).mean()),
        "l1": float(torch.linalg.vector_norm(ref - cand, ord=1, dim=-1).mean()),
        "l2": float(torch.linalg.vector_norm(ref - cand, ord=2, dim=-1).mean()),
        "peak_shift": float((ref.argmax(-1) - cand.argmax(-1)).abs().float().mean()),
    }


def longbench_normalize_answer(text: str) -> str:
    """LongBench's ``normalize_answer``: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: list[str], ground_truth: list[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def longbench_qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """LongBench ``qa_f1_score`` of one prediction: best F1 over the answers (0-1)."""
    pred = longbench_normalize_answer(prediction).split()
    return max((_f1(pred, longbench_normalize_answer(a).split()) for a in answers), default=0.0)


ALL = (token_match_rate, first_divergence, rouge_l, bleu, perplexity, next_token_kl,
       distribution_distances, longbench_qa_f1)
