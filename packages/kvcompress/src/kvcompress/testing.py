"""Tiny random-init decoder models for tests, ours and plugin authors': real architectures built from configs
(seeded, no download); the references static decoding is checked against, and CUDA graph semantics emulated on
a CPU (:func:`emulated_graphs`). ``import kvcompress.testing`` imports torch and transformers; ``import
kvcompress`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .policy import SelectionPolicy

VOCAB = 97


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2")


def tiny_model(arch: str = "llama", heads: int = 4, kv_heads: int | None = None, layers: int = 2, vocab: int = VOCAB,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
               **config: Any):
    """A seeded decoder (hidden 64, head_dim ``64 / heads``) with GQA ``heads / kv_heads`` (``kv_heads``:
    ``heads // 2`` by default; gpt2 has no grouped heads), sdpa attention unless ``attn_implementation`` says
    otherwise, in eval mode. ``arch``: one of :data:`ARCHITECTURES`; ``config`` overrides any config field."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny_model: parameter 'arch' is {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    attn = config.pop("attn_implementation", "sdpa")
    if arch == "gpt2":
        if kv_heads not in (None, heads):
            raise ValueError(f"tiny_model: parameter 'kv_heads' is {kv_heads} for gpt2; allowed: {heads} (= heads: "
                             "gpt2 has no grouped kv heads)")
        fields = dict(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=heads, n_positions=16384,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
        made = transformers.GPT2Config(**{**fields, **config})
    else:
        fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2 if kv_heads is None else kv_heads,
                      max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                      tie_word_embeddings=False)
        if arch == "qwen3":
            fields["head_dim"] = 64 // heads
        if arch == "mistral":
            fields["sliding_window"] = None
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
               "phi3": transformers.Phi3Config}[arch]
        made = cls(**{**fields, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(made, attn_implementation=attn, dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval().to(device)


def random_ids(n: int, seed: int = 0, batch: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """``[batch, n]`` seeded token ids in ``2 .. vocab-1`` (no pad or bos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, n), generator=g)


def greedy_logits(model: Any, ids: torch.Tensor, cache: Any, steps: int = 32,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``ids`` then ``steps`` greedy decode steps through ``cache``; the last-position logits of every
    forward, ``[steps + 1, B, V]`` (compare a policy whose budget covers the sequence with ``full``'s)."""
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
            out = model(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def eager_generate(model: Any, spec: str, ids: torch.Tensor, new: int,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The reference :func:`kvcompress.static_generate` is checked against: ``model.generate`` greedy through a
    fresh ``spec`` cache, exactly ``new`` tokens (``min_new_tokens``: the end id is suppressed until then).
    Returns the new tokens ``[B, new]``, the cache and each step's logits ``[new, B, V]``."""
    from .cache import make_cache

    cache = make_cache(spec, model=model)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], cache, torch.stack(out.logits)


def static_generate_logits(model: Any, cache: Any, ids: torch.Tensor, new: int, **kwargs: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvcompress.static_generate` with the last-position logits of every forward it runs
    ``[forwards, B, V]`` (on the CPU one per new token; on a GPU a replayed step runs no forward to read)."""
    from .static import static_generate

    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].clone()))
    try:
        tokens = static_generate(model, cache, ids, new, **kwargs)
    finally:
        handle.remove()
    return tokens, torch.stack(seen)


# aten operations a CUDA graph cannot hold: each reads a device value on the host, or sizes its output by one
_HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
               "unique_consecutive", "unique_dim"}
_FROM_HOST = {"lift_fresh", "lift_fresh_copy"}  # a tensor of host data (torch.tensor, torch.as_tensor)
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}


class _Recording(TorchDispatchMode):
    """The aten operations a region runs, kept to run again on the same tensors with the same arguments: what a
    CUDA graph keeps of a region (Python runs once, at capture; every value it computed there is baked in)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, list[torch.Tensor] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        sized_by_data = (name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor")
                         and kwargs.get("output_size") is None)  # repeats as a tensor: the output size is read
        if name in _HOST_READS or sized_by_data:
            raise RuntimeError(f"emulated CUDA graph: {func} inside a captured region reads a device value on the "
                               "host (a CUDA graph cannot hold it)")
        if name in _FROM_HOST and args[0].dim() > 0:  # torch.tensor(list, device=...): a copy from host memory
            raise RuntimeError(f"emulated CUDA graph: {func} inside a captured region makes a tensor of host data "
                               "(on a GPU a copy from pageable host memory, which a capture refuses)")
        out = func(*args, **kwargs)
        if func.is_view or name in _ALLOCATIONS:
            return out  # metadata, or memory whose contents the region writes before it reads them
        if func._schema.is_mutable:
            self.ops.append((func, args, kwargs, None))  # in place: run again as it is
            return out
        fresh = _tensors(out)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        if fresh and all(t.untyped_storage().data_ptr() not in inputs for t in fresh):
            self.ops.append((func, args, kwargs, fresh))  # computed anew, written where the capture's output is
        return out

    def replay(self) -> None:
        for func, args, kwargs, fresh in self.ops:
            result = func(*args, **kwargs)
            if fresh is not None:
                for held, new in zip(fresh, _tensors(result), strict=True):
                    held.copy_(new)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


class EmulatedGraphs:
    """What :func:`emulated_graphs` puts in place of :func:`kvcompress.static_generate`'s CUDA graphs on a CPU:
    a captured region's aten operations recorded while it runs (Python runs once, as at a CUDA capture), then
    run again on the same tensors at each replay, fresh results written where the capture's were. What it
    shares with a CUDA graph: host values baked in at capture, tensors that never move, host reads of device
    values and tensors made of host data (``torch.tensor(list)``) refused (``RuntimeError``). What it does not
    see: Triton launches (not aten operations), ``.to()`` copies of host tensors made outside the region (on a
    CPU they are no copies), memory pools. ``captures`` and ``replays`` count them by kind (``"step"``: the
    decode step, ``"rebuild"``: an eviction's rebuild of a layer); ``decode_steps``: whether the decode step
    is captured (False: only the rebuilds, for stores whose decode steps need a GPU kernel to be captured)."""

    def __init__(self, decode_steps: bool = True) -> None:
        self.decode_steps = decode_steps
        self.captures = {"step": 0, "rebuild": 0}
        self.replays = {"step": 0, "rebuild": 0}

    def warm(self, run: Callable[[], None]) -> None:
        run()

    def capture(self, fn: Callable[[], None], kind: str) -> Callable[[], None]:
        """Record ``fn`` while it runs once (``kind``: ``"step"`` or ``"rebuild"``); return its replay."""
        recording = _Recording()
        with recording:
            fn()
        self.captures[kind] += 1

        def replay() -> None:
            self.replays[kind] += 1
            recording.replay()

        return replay


@contextmanager
def emulated_graphs(decode_steps: bool = True) -> Iterator[EmulatedGraphs]:
    """Within the block, :func:`kvcompress.static_generate` on a CPU captures what it would capture as CUDA graphs
    on a GPU (the decode step unless ``decode_steps`` is False, and each eviction's rebuild where the store's
    layout allows it) with :class:`EmulatedGraphs`, which it yields: graph semantics checked on a CPU."""
    from . import static

    graphs = EmulatedGraphs(decode_steps)
    before = static.CPU_GRAPHS
    static.CPU_GRAPHS = lambda device: graphs
    try:
        yield graphs
    finally:
        static.CPU_GRAPHS = before


def static_devices() -> list[str]:
    """Where a test checks :func:`kvcompress.static_generate`: ``"cpu"`` (static steps run eagerly),
    ``"emulated"`` (on the CPU, what a GPU captures captured as :class:`EmulatedGraphs`) and ``"cuda"`` when a
    GPU is there. :func:`torch_device` gives the device to put the model on."""
    return ["cpu", "emulated"] + (["cuda"] if torch.cuda.is_available() else [])


def torch_device(device: str) -> str:
    """The torch device of one of :func:`static_devices` (``"emulated"`` runs on the CPU)."""
    return "cpu" if device == "emulated" else device


def static_generate_on(device: str, model: Any, cache: Any, ids: torch.Tensor, new: int, decode_steps: bool = True,
                       **kwargs: Any) -> tuple[torch.Tensor, EmulatedGraphs | None]:
    """:func:`kvcompress.static_generate` as on ``device`` (one of :func:`static_devices`): under
    :func:`emulated_graphs` (``decode_steps`` passed on) for ``"emulated"``, which it returns beside the tokens
    (``None`` elsewhere)."""
    from .static import static_generate

    if device != "emulated":
        return static_generate(model, cache, ids, new, **kwargs), None
    with emulated_graphs(decode_steps) as graphs:
        return static_generate(model, cache, ids, new, **kwargs), graphs


def reachable_tensors(obj: Any, skip: tuple[str, ...] = ("selection", "representation", "cache")
                      ) -> dict[int, torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples, by storage pointer: what
    a layer really holds, found independently of its ``tensors()`` lists, to check ``kvcompress.kv_bytes``
    against. Attributes named in ``skip`` (the policies, the layer's cache) are not followed."""
    seen: dict[int, torch.Tensor] = {}
    stack, visited = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            seen[item.untyped_storage().data_ptr()] = item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and not callable(item):
            stack.extend(v for k, v in vars(item).items() if k not in skip)
    return seen



@dataclass
class ObserveAll(SelectionPolicy):
    """``observe-all``: each slot's attention summed over every query through ``observe()`` only, the highest
    sums kept. It declares nothing a fused kernel could compute (no ``accumulated_attention()``): what a decode
    path that needs one (``static_generate``) refuses. Register it under ``name`` to use it by spec."""

    name: ClassVar[str] = "observe-all"
    needs_attention: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {"mass": "float32"}

    def observe(self, ctx, weights, query_positions):
        ctx.state["mass"].add_(weights.float().sum((2, 3)))

    def score(self, ctx):
        return ctx.state["mass"]
