"""Greedy decoding with a static slot layout, replayed as one CUDA graph per step.

A GPU decode step of an 8B model is mostly host time (Python and kernel launches), for every cache. With a
fixed budget a layer's slot table has a fixed capacity (``budget + step``), so a decode step can keep every
shape static: the step's key and value are written at a device-side slot counter, attention runs over the
whole capacity with the per-slot bias masking the empty slots (``-inf``), and the step is captured once and
replayed. Eviction (a plan: scores, top-k, gathers) runs between replays every ``step`` tokens, in place, so
the graph's buffers never move: the policy's plan eagerly, and the rebuild that applies a plan of kept slots to
the slot table and the store captured as a graph of its own the second time a layer meets the same host state
(a store's layout says what that is: :meth:`StaticLayout.host_state`), then replayed (a quantized store's
rebuild is many small operations per layer, host time the GPU would wait for).

Why not transformers' ``generate`` with ``torch.compile``: eviction is data-dependent (top-k, gathers, a
plan) and runs every ``step`` tokens, outside any fixed graph; compiling the whole loop measured slower than
eager even for transformers' own ``StaticCache``. This helper captures only the model's decode step.

Supported: selection policies with a ``budget``, a ``ratio`` (the capacity is then the budget it reaches
by the last token) or none (``dense``: the prompt plus ``max_new_tokens``); observing ones where they declare
``accumulated_attention()`` (a sum or a max, which the fused kernel adds inside the graph, or lru's last use:
the kernel gives each slot's heaviest head, compared with the threshold on the device); ``on_tokens`` inside
the step where the policy declares ``static_on_tokens`` (learned), else between steps on the step's queries
and hidden states, recorded inside it (sketch: host work every step, as eagerly); over the core's dense store
or a representation whose store has a static layout (:meth:`KVStore.static_layout`: quant's, lowrank's).
Refused with the reason: stores without a static layout and observing policies that declare nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cache import CompressedCache
from .context import SlotContext
from .policy import SelectionPolicy
from .store import Accumulate, StaticLayout


def _check(cache: Any, cuda_graph: bool) -> None:
    if not isinstance(cache, CompressedCache):
        raise ValueError(f"static_generate: parameter 'cache' is a {type(cache).__name__}; allowed: a kvcompress "
                         "cache (make_cache(spec, model=model); 'dense' for no compression)")
    sel, rep = cache.selection, cache.representation
    refusal = rep.static_refusal(cuda_graph) if rep is not None else None
    if refusal is not None:
        raise ValueError(f"static_generate: cache {cache.spec!r} stores tokens as {rep.spec()}: {refusal}; "
                         "allowed: the core's dense store, or a representation whose store has a static layout")
    if isinstance(sel, SelectionPolicy):
        acc = sel.accumulated_attention() if sel.needs_attention else None
        if sel.needs_attention and (acc is None or acc[1] not in ("sum", "max", "last")):
            raise ValueError(f"static_generate: policy {sel.name!r} observes attention decode steps cannot fuse "
                             "(accumulated_attention() is None: observe() does more than a sum, a max or a last "
                             "use); allowed: policies that declare their observation")


class _Static:
    """One layer held at a fixed capacity: the slot table (device slot counter, bias ``-inf`` on empty or
    padding slots) here, the keys and values in the store's :class:`StaticLayout`."""

    def __init__(self, layer, capacity: int, cuda_graph: bool, graphs: Any = None) -> None:
        self.layer = layer
        self.graphs = graphs  # captures rebuilds (None: every rebuild runs eagerly)
        self.rebuilds: dict[tuple, Any] = {}  # (slots, plan shape, store state) -> False once met, then the replay
        slots = layer.slots
        n = slots.length
        if capacity < n + 1:
            raise ValueError(f"static_generate: capacity {capacity} does not exceed the {n} stored slots")
        layout = layer.store.static_layout(capacity, cuda_graph)
        if layout is None:
            raise ValueError(f"static_generate: a layer's store ({type(layer.store).__name__}) has no static layout")
        self.layout = layout
        slots._reallocate(capacity)  # exactly: the slot table never moves again
        if "bias" not in slots.tensors:
            slots.add("bias", torch.zeros((), dtype=torch.float32))
        layer._prefill_free_slots(layer.seen)
        self.count = torch.full((1,), n, dtype=torch.long, device=layer.device)
        acc = layer._acc_spec
        # what the decode kernel fills: the policy's state, or for a last use (lru) each slot's heaviest query
        # head of the step, compared with the threshold after the kernel
        self.scratch = None
        if acc is not None and acc[1] == "last":
            self.scratch = torch.zeros_like(slots.tensors[acc[0]])
            self.observation = (self.scratch, "max", True)
        else:
            self.observation = ((slots.tensors[acc[0]], acc[1], len(acc) > 2 and acc[2] == "set")
                                if acc is not None else None)
        self.accumulate = Accumulate(*self.observation) if self.observation is not None else None
        # on_tokens() inside the step (static_on_tokens) writes the step's slot of each state here, copied to
        # its slot after; any other on_tokens() runs between steps on the step's inputs, recorded in the step
        in_step = layer._on_tokens and layer.selection.static_on_tokens
        self.step_state = ({name: slots.tensors[name][:, :, :1].clone() for name in layer.selection.slot_states}
                           if in_step else None)
        self.recorded: dict[str, torch.Tensor] | None = {} if layer._on_tokens and not in_step else None
        self.reset_bias()
        layer.static = self

    def reset_bias(self) -> None:
        """Empty slots and padding masked: written after every eager eviction."""
        layer = self.layer
        bias, valid = layer.slots.tensors["bias"], layer.slots.tensors["valid"]
        n = layer.slots.length
        bias.masked_fill_(~valid, float("-inf"))
        bias[:, :, n:].fill_(float("-inf"))
        self.count.fill_(n)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device-side append (graph-safe): slot ``count`` gets bias 0, the layout the step's key and value."""
        self.layer.slots.tensors["bias"].index_fill_(2, self.count, 0.0)
        return self.layout.append(keys, values, self.count)

    def keep(self, keep: torch.Tensor) -> None:
        """An eviction's plan of kept slots ``[B, H_kv, K]`` applied to the slot table and the store, and the
        store's tensors put back where they are held: eagerly where the layout gives no host state or meets
        this one (with this many slots, this plan's shape) for the first time; the second time captured (run
        once as it is captured), later replayed, then the host state it leaves restored."""
        layer, layout = self.layer, self.layout
        state = layout.host_state() if self.graphs is not None else None
        if state is None:
            layer._rebuild(keep)
            return
        key = (layer.slots.length, tuple(keep.shape), state)
        known = self.rebuilds.get(key)
        if known is None:  # met once: eagerly, so every kernel it launches has run before any capture
            self.rebuilds[key] = False
            layer._rebuild(keep)
            return
        if known is False:
            index = keep.clone()  # the plan's slot in the graph: each replay's plan is copied into it

            def rebuild() -> None:
                layer._rebuild(index)
                layout.rebind()

            replay = self.graphs.capture(rebuild, "rebuild")
            self.rebuilds[key] = (replay, index, layer.slots.length, layout.host_state())
            return
        replay, index, length, after = known
        index.copy_(keep)
        replay()
        layer.slots.length = length
        layout.set_host_state(after)

    def after_attention(self, queries: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Inside the step, after its attention: a last use from the kernel's heaviest heads (observe()'s
        ``max(last, where(used, position, -1))``, the query's position read on the device), the policy's
        ``static_on_tokens`` on the step's slot (then written at its slot), or the step's inputs recorded for
        a host-side on_tokens() in :meth:`advance`."""
        layer = self.layer
        if self.scratch is not None:
            state, threshold = layer.slots.tensors[layer._acc_spec[0]], layer._acc_spec[2]
            when = layer.slots.tensors["positions"][0, 0].index_select(0, self.count).float()
            state.copy_(torch.maximum(state, torch.where(self.scratch > threshold, when, -1.0)))
        if self.step_state is not None:
            layer.selection.on_tokens(SlotContext(layer, queries, 1, hidden, state=self.step_state))
            for name, t in self.step_state.items():
                layer.slots.tensors[name].index_copy_(2, self.count, t)
        if self.recorded is not None:
            self._record(queries, hidden)

    def _record(self, queries: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """The step's queries (and hidden states) into fixed buffers, for :meth:`advance`."""
        rec = self.recorded
        for name, t in (("queries", queries), ("hidden", hidden)):
            if t is not None:
                if name not in rec:  # the first (eager) step sizes them, before any capture
                    rec[name] = torch.empty_like(t)
                rec[name].copy_(t)

    def advance(self) -> None:
        """Host bookkeeping after a replayed (or eager static) step: the policy's host-side on_tokens() on
        the step's recorded inputs, then eviction when due."""
        layer = self.layer
        layer.slots.length += 1
        layer.seen += 1
        self.layout.advance()
        if self.recorded is not None:
            rec = self.recorded
            hidden = rec["hidden"].clone() if "hidden" in rec else None
            layer.selection.on_tokens(SlotContext(layer, rec["queries"].clone(), 1, hidden))
        before = layer.evictions
        layer.maybe_evict(new=1)
        if layer.evictions != before:
            self.layout.rebind()
            self.reset_bias()


def _layers_static(cache: CompressedCache, max_new_tokens: int, cuda_graph: bool, graphs: Any) -> list[_Static]:
    out = []
    for layer in cache.layers:  # a ratio's target grows: the capacity is what it reaches by the last token
        sel = layer.selection
        target = sel.target(layer.seen + (max_new_tokens if sel.ratio_driven else 0))
        if target is None or layer.frozen:  # nothing evicted: room for every new token
            capacity = layer.slots.length + max_new_tokens + 1
        else:
            capacity = max(sel.kept_slots(target) + sel.step, layer.slots.length + 1)
        out.append(_Static(layer, capacity, cuda_graph, graphs))
    return out


def _cache_argument(model: Any) -> str:
    """``cache`` where the model's forward takes it (newer transformers), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


CPU_GRAPHS: Callable[[torch.device], Any] | None = None  # kvcompress.testing.emulated_graphs() sets it


class _CudaGraphs:
    """The regions of a static decode captured as CUDA graphs on ``device``: the decode step (a memory pool of
    its own) and, at evictions, each layer's rebuild (one pool for all of them: they run one after another and
    keep nothing in it; captured on a side stream without ``torch.cuda.graph``'s synchronisation, garbage
    collection and cache release, which would cost more than the rebuild)."""

    decode_steps = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def warm(self, run: Callable[[], None]) -> None:
        """Eager steps on the side stream, before the decode step's capture."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            run()
        current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], None], kind: str) -> Callable[[], None]:
        """``fn`` captured and run once by a replay; returns the replay. ``kind``: ``"step"`` (the decode step,
        a pool of its own) or ``"rebuild"`` (an eviction's rebuild of a layer, in the rebuilds' shared pool)."""
        graph = torch.cuda.CUDAGraph()
        if kind == "rebuild":
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    fn()
                finally:
                    graph.capture_end()
            current.wait_stream(self.stream)
        else:
            with torch.cuda.graph(graph):
                fn()
        graph.replay()
        return graph.replay


def _graphs(device: torch.device, cuda_graph: bool | None) -> Any:
    """What captures a static decode's regions: CUDA graphs on a CUDA device unless ``cuda_graph`` is False;
    elsewhere what :data:`CPU_GRAPHS` makes (:func:`kvcompress.testing.emulated_graphs`), else nothing."""
    if cuda_graph is False:
        return None
    if device.type == "cuda":
        return _CudaGraphs(device)
    if CPU_GRAPHS is not None:
        return CPU_GRAPHS(device)
    if cuda_graph:
        raise ValueError("static_generate: parameter 'cuda_graph' is True but the model is not on a CUDA device")
    return None


@torch.no_grad()
def static_generate(model: Any, cache: Any, input_ids: torch.Tensor, max_new_tokens: int,
                    attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None,
                    timings: dict[str, float] | None = None, prefill_chunk: int | None = None,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding of ``max_new_tokens`` after ``input_ids`` ``[B, n]`` with ``cache``; returns the new
    tokens ``[B, max_new_tokens]``, or fewer with ``eos_token_id`` (one id or several): as in ``generate``, a
    row that emitted one continues with ``pad_token_id`` (default: the first end id), and decoding ends once
    every row has (checked every ``STOP_CHECK`` steps, a host synchronisation each; the tokens end at the
    step where the last row ended). The prompt is prefilled eagerly (and compressed as the policy says); each
    decode step then runs over a static slot layout, captured as a CUDA graph on a GPU (``cuda_graph``:
    default True on CUDA) or run eagerly the same way elsewhere (the tests check both against eager decoding).
    ``attention_mask`` (left padding) works as in ``generate``. ``prefill_chunk`` feeds a long prompt in
    forwards of that many tokens (the policy compresses between them as it would while streaming), so a long
    context at a large batch needs one chunk's activations, not the whole prompt's. A cache that already holds
    the first ``p`` tokens of ``input_ids`` (``cache.get_seq_length()``, as in ``generate``) is continued: only
    ``input_ids[:, p:]`` is fed, at its positions in the whole sequence.

    ``timings``, a dict, is filled with where the time went (seconds, the device synchronised at each
    boundary): ``prefill_s``; ``setup_s`` (the static layout, the warm-up steps and the graph capture);
    ``steady_s`` over ``steady_steps`` decode steps (replays, or eager static steps, each with its eviction
    when due). Without it nothing synchronises."""
    if max_new_tokens < 1:
        raise ValueError(f"static_generate: parameter 'max_new_tokens' is {max_new_tokens}; allowed: >= 1")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"static_generate: parameter 'prefill_chunk' is {prefill_chunk!r}; allowed: None (the "
                         "prompt in one forward) or an integer >= 1")
    stop_ids = _stop_ids(eos_token_id, pad_token_id)
    device = input_ids.device
    graphs = _graphs(device, cuda_graph)
    use_graph = graphs is not None and graphs.decode_steps  # the decode step captured
    _check(cache, use_graph)
    b, n = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_kw = {_cache_argument(model): cache}  # `cache=` where transformers takes it, else `past_key_values=`
    held = cache.get_seq_length()
    if held >= n:
        raise ValueError(f"static_generate: the cache already holds {held} tokens and 'input_ids' has {n}; "
                         "allowed: input_ids longer than what the cache holds (the whole sequence, as in generate)")
    clock = _Clock(timings, device)
    step_n = prefill_chunk or n
    for start in range(held, n, step_n):  # the prompt (what the cache lacks), in one forward or in chunks
        end = min(n, start + step_n)
        out = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                    position_ids=position[:, start:end], use_cache=True, logits_to_keep=1, **cache_kw)
    tokens = torch.empty((b, max_new_tokens), dtype=torch.long, device=device)
    tokens[:, 0] = out.logits[:, -1].argmax(-1)
    stop = _Stop(stop_ids, tokens[:, :1]) if stop_ids is not None else None
    clock.mark("prefill_s")
    if max_new_tokens == 1 or (stop is not None and stop.all_done()):
        clock.steady(0)
        return tokens[:, :1]
    layers = _layers_static(cache, max_new_tokens, use_graph, graphs)
    ids = tokens[:, :1].clone()
    pos = position[:, -1:] + 1
    cpos = torch.full((1,), n, dtype=torch.long, device=device)
    step = torch.ones((1,), dtype=torch.long, device=device)

    def decode_step() -> None:
        logits = model(input_ids=ids, position_ids=pos, cache_position=cpos, use_cache=True,
                       logits_to_keep=1, **cache_kw).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        if stop is not None:
            nxt = stop.apply(nxt)
        tokens.index_copy_(1, step, nxt)
        ids.copy_(nxt)
        pos.add_(1)
        cpos.add_(1)
        step.add_(1)

    preparing = [s.layout for s in layers if type(s.layout).prepare is not StaticLayout.prepare]

    def stepped(run) -> None:  # host work due before a step, the step (replayed or eager), its bookkeeping
        for layout in preparing:
            layout.prepare()
        run()
        for static in layers:
            static.advance()

    remaining = max_new_tokens - 1
    done = 1  # tokens written
    if not use_graph:
        clock.mark("setup_s")
        while done < max_new_tokens:
            stepped(decode_step)
            done += 1
            if stop is not None and stop.due(done) and stop.all_done():
                break
        clock.steady(done - 1)
        _release(layers)
        return stop.trim(tokens[:, :done]) if stop is not None else tokens
    warm = min(2, remaining)  # real steps first (on a GPU on a side stream): kernels compiled, allocator warmed

    def warm_up() -> None:
        nonlocal done
        for _ in range(warm):
            stepped(decode_step)
            done += 1

    graphs.warm(warm_up)
    if done < max_new_tokens and not (stop is not None and stop.all_done()):
        replay: Callable[[], None] | None = None

        def capture() -> None:  # the step captured, and run once as it is
            nonlocal replay
            replay = graphs.capture(decode_step, "step")

        stepped(capture)
        done += 1
        clock.mark("setup_s")
        steady = done
        while done < max_new_tokens:
            stepped(replay)
            done += 1
            if stop is not None and stop.due(done) and stop.all_done():
                break
        clock.steady(done - steady)
    else:
        clock.mark("setup_s")
        clock.steady(0)
    _release(layers)
    return stop.trim(tokens[:, :done]) if stop is not None else tokens


STOP_CHECK = 8  # decode steps between the host's checks that every row has ended (each synchronises)


def _stop_ids(eos_token_id: Any, pad_token_id: Any) -> tuple[list[int], int] | None:
    """``(end ids, pad id)`` from ``static_generate``'s arguments, or None without ``eos_token_id``."""
    if eos_token_id is None:
        if pad_token_id is not None:
            raise ValueError(f"static_generate: parameter 'pad_token_id' is {pad_token_id!r} without "
                             "'eos_token_id'; allowed: None, or an end id given with it")
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"static_generate: parameter 'eos_token_id' is {eos_token_id!r}; allowed: a token id "
                         ">= 0 or a non-empty list of them")
    pad = ids[0] if pad_token_id is None else pad_token_id
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"static_generate: parameter 'pad_token_id' is {pad_token_id!r}; allowed: a token id >= 0")
    return ids, pad


class _Stop:
    """Rows that emitted an end id: each later token is the pad id (graph-safe, on the device)."""

    def __init__(self, stop_ids: tuple[list[int], int], first: torch.Tensor) -> None:
        ids, self.pad = stop_ids
        self.eos = torch.tensor(ids, dtype=torch.long, device=first.device)
        self.done = (first == self.eos).any(-1)  # [B]

    def apply(self, nxt: torch.Tensor) -> torch.Tensor:
        """The step's tokens ``[B, 1]`` with ended rows padded; rows that end now are marked."""
        nxt = torch.where(self.done[:, None], self.pad, nxt)
        self.done.logical_or_((nxt == self.eos).any(-1))
        return nxt

    def due(self, done: int) -> bool:
        return done % STOP_CHECK == 0

    def all_done(self) -> bool:
        return bool(self.done.all())

    def trim(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, T]`` up to the step where the last row ended, if every row has (as ``generate``)."""
        ended = (tokens[..., None] == self.eos).any(-1)  # [B, T]
        if not bool(ended.any(-1).all()):
            return tokens
        last = int(ended.float().argmax(-1).max())  # each row's first end id; the latest of them
        return tokens[:, : last + 1]


class _Clock:
    """``static_generate``'s optional timings: a synchronised wall clock, idle when no dict was given."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        if timings is not None:
            timings.clear()
            self.last = self._now()

    def _now(self) -> float:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.timings is not None:
            now = self._now()
            self.timings[name], self.last = now - self.last, now

    def steady(self, steps: int) -> None:
        if self.timings is not None:
            self.mark("steady_s")
            self.timings.setdefault("setup_s", 0.0)
            self.timings["steady_steps"] = float(steps)


def _release(layers: list[_Static]) -> None:
    """Back to the eager layout: stored slots only (the bias keeps merged slots' terms; padding stays masked by
    validity), no device counter."""
    for static in layers:
        layer = static.layer
        layer.static = None
        static.layout.release()
        n = layer.slots.length
        bias = layer.slots.tensors["bias"]
        bias[:, :, :n].masked_fill_(~layer.slots.tensors["valid"][:, :, :n], 0.0)
        bias[:, :, n:].fill_(0.0)
