"""Metrics: reference libraries wired right, LongBench F1 as LongBench defines it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress_harness import metrics


def test_token_match_and_divergence():
    assert metrics.token_match_rate([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert metrics.token_match_rate([1, 2, 3], [1]) == 1 / 3
    assert metrics.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert metrics.first_divergence([1, 2, 3], [1, 2]) == 2


def test_rouge_and_bleu():
    assert metrics.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert 0 < metrics.rouge_l("the cat sat on the mat", "the cat lay on a rug") < 1
    assert metrics.bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(100)
    assert metrics.bleu(["the cat sat on the mat today"], ["completely different words here"]) < 10


def test_longbench_f1_normalisation():
    assert metrics.longbench_normalize_answer("The  Cat, an apple!") == "cat apple"
    assert metrics.longbench_qa_f1("The cat.", ["a cat"]) == 1.0
    # precision 1/2, recall 1/1 -> F1 2/3; best of two answers
    assert abs(metrics.longbench_qa_f1("black cat", ["dog", "cat"]) - 2 / 3) < 1e-9
    assert metrics.longbench_qa_f1("", ["cat"]) == 0.0


def test_kl_zero_for_same_and_positive_for_different():
    a = torch.randn(3, 50)
    assert torch.allclose(metrics.next_token_kl(a, a), torch.zeros(3), atol=1e-6)
    assert (metrics.next_token_kl(a, a.flip(-1)) > 0).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=16), st.integers(0, 15))
def test_distribution_distances(weights, drop):
    ref = torch.tensor(weights) + 1e-3
    ref = ref / ref.sum()
    same = metrics.distribution_distances(ref[None], ref[None])
    assert abs(same["kl"]) < 1e-5 and abs(same["cosine"] - 1) < 1e-5 and same["l1"] < 1e-6
    cand = ref.clone()
    cand[drop % len(weights)] = 0
    cand = cand / cand.sum()
    d = metrics.distribution_distances(ref[None], cand[None])
    assert d["kl"] > 0 and d["l1"] > 0 and d["l2"] > 0 and d["cosine"] <= 1 + 1e-6
