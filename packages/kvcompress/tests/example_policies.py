"""The three worked examples of docs/plugin-authors.md, as the tests use them.

- :class:`MergeNearest`: a merging policy (evicted tokens merged into their nearest kept key);
- :class:`LinearKeyScore`: a scorer with weights loaded from safetensors at setup, sliced per layer at bind;
- :class:`PreRope`: a representation whose store keeps keys before RoPE and rotates them when attending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import kvcompress
from kvcompress import param, rope


@dataclass
class MergeNearest(kvcompress.SelectionPolicy):
    """Keep the most recent tokens; merge each evicted token into the kept token with the nearest key."""

    name: ClassVar[str] = "merge-nearest"

    def score(self, ctx):
        return ctx.positions.float()

    def plan(self, ctx, target):
        keep = ctx.select(self.score(ctx), target)
        d = ctx.keys.shape[-1]
        kept = ctx.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, d))
        sim = F.normalize(ctx.keys.float(), dim=-1) @ F.normalize(kept.float(), dim=-1).transpose(-1, -2)
        return kvcompress.merge_into(ctx, keep, into=sim.argmax(-1))  # [B, H, S] -> index into keep


@dataclass
class LinearKeyScore(kvcompress.SelectionPolicy):
    """Score each token by a per-layer, per-head linear function of its key, trained elsewhere."""

    name: ClassVar[str] = "linear-key"
    weights: str = param("", help="path of a .safetensors file with a [layers, kv_heads, head_dim] 'w'")

    def setup(self, model):
        if model.config is None:
            raise kvcompress.ModelRequiredError("linear-key: pass the model: make_cache(spec, model=model)")
        expect = {"architecture": model.architecture, "num_layers": str(model.num_layers),
                  "head_dim": str(model.head_dim)}
        tensors, _ = kvcompress.load_weights(self.weights, expect=expect, what="linear-key: parameter 'weights'")
        return tensors["w"]  # every layer's weights, loaded once per cache

    def bind(self, layer):
        return layer.shared[layer.index].to(layer.device, torch.float32)  # this layer's [kv_heads, head_dim]

    def score(self, ctx):
        return torch.einsum("bhsd,hd->bhs", ctx.keys.float(), ctx.bound)


class PreRopeStore(kvcompress.DenseStore):
    """Dense storage of keys before RoPE (as a low-rank or quantized store would keep them); keys are rotated
    again, at their stored positions, whenever attention asks for them."""

    def __init__(self, layer):
        super().__init__(layer)
        self.layer = layer

    def append(self, keys, values, step=None):
        cos, sin = step.cos, step.sin  # the RoPE the model applied to these keys: undo it
        raw = rope.unrotate(keys.float(), cos.unsqueeze(1).float(), sin.unsqueeze(1).float()).to(keys.dtype)
        b, h, q, _ = keys.shape
        positions = step.positions(q, keys.device).view(1, 1, q).expand(b, h, q)
        if self.buf.tensors and self.buf.length + q <= self.buf.capacity:
            for name, new in (("keys", raw), ("values", values), ("positions", positions)):
                self.buf.tensors[name].narrow(2, self.buf.length, q).copy_(new)
            self.buf.length += q
        else:
            self.buf.append(cap=step.cap, keys=raw, values=values, positions=positions)

    def apply(self, index, keys=None, values=None, changed=None, positions=None):
        if keys is not None:  # a plan's new contents arrive after RoPE: store them before it
            cos, sin = self.layer.rope(positions.reshape(-1))
            shape = (*positions.shape, -1)
            keys = rope.unrotate(keys.float(), cos.view(shape), sin.view(shape)).to(keys.dtype)
        super().apply(index, keys, values, changed)
        if positions is not None:
            self.buf.view("positions").copy_(positions)

    def keys_values(self):
        raw, values = self.buf.view("keys"), self.buf.view("values")
        positions = self.buf.view("positions")
        cos, sin = self.layer.rope(positions.reshape(-1))
        shape = (*positions.shape, -1)
        return rope.rotate(raw.float(), cos.view(shape), sin.view(shape)).to(raw.dtype), values


@dataclass
class PreRope(kvcompress.Representation):
    """Keys stored before RoPE (an example of a store that sees positions and RoPE)."""

    name: ClassVar[str] = "pre-rope"
    needs_rope: ClassVar[bool] = True

    def make_store(self, layer):
        return PreRopeStore(layer)
