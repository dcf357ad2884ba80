"""How the quantized middle is split across programs (pure Python: runs anywhere)."""

from __future__ import annotations

import pytest

from kvcompress_quant import kernels


@pytest.mark.parametrize("m", [64, 1000, 5000, 32768, 100_000])
@pytest.mark.parametrize("batch_heads", [1, 8, 64, 300])
@pytest.mark.parametrize("slots", [16, 264, 396])
def test_splits_cover_the_middle_in_whole_tiles(m, batch_heads, slots):
    n, per = kernels._splits(m, batch_heads, slots)
    assert per % kernels.BLOCK_N == 0
    assert (n - 1) * per < m <= n * per  # every token once, no empty split
    assert n == 1 or per >= kernels.SPLIT_MIN


@pytest.mark.parametrize("batch_heads,slots,fill", [(8, 264, 0.95), (64, 264, 0.95), (300, 264, 0.9),
                                                     (8, 396, 0.94)])
def test_splits_fill_whole_waves(batch_heads, slots, fill):
    n, _ = kernels._splits(32768, batch_heads, slots)
    programs = batch_heads * n
    waves = -(-programs // slots)
    assert waves <= kernels.MAX_WAVES
    assert programs / (waves * slots) >= fill


def test_no_middle_no_splits():
    assert kernels._splits(0, 8, 264) == (0, kernels.BLOCK_N)
