"""Host time of the pieces of one layer's decode step, in a hot micro-loop (GPU, 1k context).

    python benchmarks/gpu_host_parts.py

The GPU work of each piece is tiny at 1k tokens, so what is timed (``perf_counter`` around each call,
no sync) is the host: Python, dispatch and launch. Pieces are interleaved, 500 rounds, median shown.
Compare with gpu_host_inplace.py, which times the same layer work inside the 32-layer model.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaAttention

import kvcompress
from kvcompress import kernels
from kvcompress.attention import kvcompress_attention
from kvcompress_quant import kernels as quant_kernels

N, SCALING = 1024, 128**-0.5


def main() -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    dev, bf16 = "cuda", torch.bfloat16
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    module = LlamaAttention(config, 0).to(dev, bf16)

    def make(spec: str):
        cache = kvcompress.make_cache(spec)
        k = torch.randn(1, 8, N, 128, device=dev, dtype=bf16)
        keys, values = cache.update(k, k.clone(), 0)
        if spec != "full":
            q = torch.randn(1, 32, N, 128, device=dev, dtype=bf16)
            kvcompress_attention(module, q, keys, values, None, scaling=SCALING)
        return cache

    q1 = torch.randn(1, 32, 1, 128, device=dev, dtype=bf16)
    k1 = torch.randn(1, 1, 8, 128, device=dev, dtype=bf16).transpose(1, 2)  # as a model hands it over
    full, sink, quant = make("full"), make("sink(budget=8192,step=32)"), make("quant(bits=4)")
    buf = torch.randn(1, 8, 4096, 128, device=dev, dtype=bf16)
    bufv = buf.clone()
    contig = buf[:, :, :N].contiguous()
    view = buf.narrow(2, 0, N)
    qstore = quant.layers[0].store

    def full_step():
        keys, values = full.update(k1, k1, 0)
        return sdpa_attention_forward(module, q1, keys, values, None, scaling=SCALING)

    def kvc_step(cache):
        keys, values = cache.update(k1, k1, 0)
        return kvcompress_attention(module, q1, keys, values, None, scaling=SCALING)

    parts = {
        "full: DynamicCache update + sdpa_attention_forward": full_step,
        "sink: update + kvcompress_attention": lambda: kvc_step(sink),
        "quant(bits=4): update + kvcompress_attention": lambda: kvc_step(quant),
        "append_pair": lambda: kernels.append_pair(buf, bufv, 2000, k1, k1),
        "2x narrow + copy_": lambda: (buf.narrow(2, 2000, 1).copy_(k1), bufv.narrow(2, 2000, 1).copy_(k1)),
        "2x torch.cat (DynamicLayer)": lambda: (torch.cat((contig, k1), 2), torch.cat((contig, k1), 2)),
        "sdpa_attention_forward, contiguous K/V": lambda: sdpa_attention_forward(module, q1, contig, contig, None,
                                                                                 scaling=SCALING),
        "sdpa_attention_forward, narrowed K/V": lambda: sdpa_attention_forward(module, q1, view, view, None,
                                                                               scaling=SCALING),
        "quant decode_attention": lambda: quant_kernels.decode_attention(qstore, q1, None, SCALING),
        "torch.empty": lambda: torch.empty((1, 1, 32, 128), dtype=bf16, device=dev),
        "2x narrow (views)": lambda: (buf.narrow(2, 0, N), bufv.narrow(2, 0, N)),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    for i in range(500):
        for name, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if i % 25 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}, context {N}: host time per call")
    for name, ts in times.items():
        print(f"{name:50s} median {statistics.median(ts[50:]) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
