"""The ``sketch-overlap`` task's exact scores: with a counter per cell the sketch *is* exact (overlap 1),
and with one shared counter per head it is not, on a tiny model run through the task itself."""

from __future__ import annotations

import kvcompress
import pytest
import torch
from conftest import prompt, tiny_model

from kvcompress_sketch.audit import Audited, OverlapTask


class Ctx:
    """The members of the harness's TaskContext the task reads."""

    def __init__(self, model, spec: str, ids: torch.Tensor, drive: str = "sketch") -> None:
        self.model, self.spec, self.length, self.chunk, self.ids = model, spec, ids.shape[1], 4, ids
        self.params = {"offset": 0, "drive": drive}

    def tokens(self, n: int, offset: int = 0) -> torch.Tensor:
        return self.ids[:, offset:offset + n]

    def make_cache(self):
        return kvcompress.make_cache(self.spec, model=self.model)


pytest.importorskip("kvcompress_harness", reason="the task runs under the harness")


def test_registered_as_a_task():
    from kvcompress.plugins import get_registry

    assert "sketch-overlap" in get_registry().tasks


@pytest.mark.parametrize("spec, exact", [("sketch(budget=16,recent=4,step=4,width=4096,planes=4)", True),
                                         ("sketch(budget=16,recent=4,step=4,planes=6)", False)])
def test_overlap_is_one_exactly_when_no_cells_share_a_counter(spec, exact):
    model = tiny_model("llama")
    out = OverlapTask().run(Ctx(model, spec, prompt(96, seed=3)))
    assert out["evictions"] > 0 and out["ppl"] > 1
    if exact:  # 16 cells, 4096 counters: no collisions (a seeded hash, checked below)
        assert out["kept_overlap"] == pytest.approx(1.0)
    else:  # 64 cells folded into one centroid per head: some chosen slots differ
        assert out["kept_overlap"] < 1.0


def test_exact_drive_and_full():
    model = tiny_model("llama")
    ids = prompt(64, seed=5)
    full = OverlapTask().run(Ctx(model, "full", ids))
    assert full["kept_overlap"] == 1.0 and full["evictions"] == 0
    driven = OverlapTask().run(Ctx(model, "sketch(budget=16,recent=4,step=4,planes=6)", ids, drive="exact"))
    assert driven["evictions"] > 0 and driven["ppl"] != full["ppl"]
    with pytest.raises(ValueError, match="sketch-overlap: policy 'sink"):
        OverlapTask().run(Ctx(model, "sink(budget=16)", ids))
    assert Audited(budget=16, recent=4).drive == "sketch"
