"""The quant decode kernel's main loop as an H100 runs it: compiled for sm_90 without a GPU.

    python sass_loop.py --conv 0 2        (needs Triton; no GPU)

Compiles ``_split_kernel`` for the int4 folded path (Llama-3-8B heads: 8 kv heads, GQA 4, head_dim
128, keys per channel / values per token, groups of 64), disassembles it with the ``nvdisasm`` that
ships with Triton, and prints, for the largest loop, the SASS instructions per thread and tile and the
most frequent opcodes; also registers per thread. A static count, not a timing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvcompress_quant import kernels

POINTERS = dict(Q="*bf16", FK="*bf16", FV="*bf16", CK="*u8", CV="*u8", KS="*fp16", KZ="*fp16", VS="*fp16",
                VZ="*fp16", M="*bf16", PM="*fp32", PL="*fp32", PA="*fp32", Out="*bf16", LOCK="*i32",
                HM="*fp32")
OPCODE = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")


def compile_split_kernel(conv: int, merge_chunk: int, bits: int = 4):
    fn = kernels._split_kernel
    consts = dict(HKV=8, GQA=4, BLOCK_H=16, D=128, BITS=bits, GT=64, GC=64, K_TOKEN=False, V_TOKEN=True,
                  CAPF=256, SINK=4, MASK_KIND=0, BLOCK_N=kernels.BLOCK_N, DOT_F32=False, PIECES=True,
                  W=min(128 * bits // 8, 64), CONV=conv, MERGE_CHUNK=merge_chunk, GQA_P2=4,
                  ROTATE=False)
    signature = {n: POINTERS.get(n, "constexpr" if n in consts else "fp32" if n == "qk_scale" else "i32")
                 for n in fn.arg_names}
    # pointers 16-byte aligned as the launches see them (the query and mask may not be)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in POINTERS
             and n not in ("Q", "M")}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=kernels.NUM_WARPS, num_stages=kernels.NUM_STAGES))


def largest_loop(sass: str) -> collections.Counter:
    lines = sass.splitlines()
    best = (0, 0)
    for end, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        start = next((i for i, x in enumerate(lines) if x.startswith(m.group(1) + ":")), end)
        if start < end and end - start > best[1] - best[0]:
            best = (start, end)
    loop = lines[best[0] : best[1] + 1]
    return collections.Counter(m.group(1) for line in loop if (m := OPCODE.match(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv", type=int, nargs="+", default=[0, 2], help="code decodes (kernels.CONV)")
    parser.add_argument("--merge-chunk", type=int, default=kernels.MERGE_CHUNK)
    args = parser.parse_args()
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for conv in args.conv:
        compiled = compile_split_kernel(conv, args.merge_chunk)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True,
                                  text=True, check=True).stdout
            usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        ops = largest_loop(sass)
        regs = re.search(r"REG:(\d+)", usage)
        print(f"CONV={conv}: main loop {sum(ops.values())} instructions per thread and tile, "
              f"{regs.group(1) if regs else '?'} registers per thread")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
