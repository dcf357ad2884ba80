"""The age curve: fitted from distance-binned future attention in the units of the scores."""

from __future__ import annotations

import math

import torch

from kvcompress_learned.age import MIN_DISTANCE, fit_age


def synthetic(alpha: float, g: list[float], n: int = 400, seed: int = 0):
    """Scores ``[1, 1, n]`` and exact log binned attention ``z = alpha * s + g_b`` ``[1, 1, n, bins]``."""
    s = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(seed))
    z = alpha * s.unsqueeze(-1) + torch.tensor(g).view(1, 1, 1, -1)
    return s, z, torch.ones(n, len(g), dtype=torch.bool)


def test_attention_that_does_not_fade_gives_a_flat_curve():
    s, z, usable = synthetic(2.0, [0.7] * 8)
    table = fit_age(s, z, usable, horizon=255)
    torch.testing.assert_close(table, torch.full_like(table, 0.35), atol=1e-4, rtol=0)  # 0.7 / alpha


def test_the_curve_is_the_mean_future_attention_after_each_age():
    g = [0.0, -0.3, -0.6, -0.9, -1.2, -1.5, -1.8, -2.1]  # fading with distance; bins below 16 are not used
    s, z, usable = synthetic(0.5, g)
    table = fit_age(s, z, usable, horizon=255)[0, 0]
    assert MIN_DISTANCE == 16 and (table[1:] < table[:-1]).all()
    age = int(2**6 * math.sqrt(2))  # the middle of age bin 6
    total = 0.0
    for d in range(age + 1, age + 256):
        b = d.bit_length() - 1
        total += math.exp(g[min(b, 7)] - 0.3 * max(b - 7, 0))  # past bin 7: along the last slope
    assert abs(float(table[6]) - math.log(total / 255) / 0.5) < 1e-3
