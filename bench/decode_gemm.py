"""Decode GEMMs at batch ~100: cuBLAS (what the compiled decode step calls) against a plain Triton
tensor-core GEMM with split-K, at the LFM2 projection shapes. A measurement of the headroom, not an
engine path: at 100 rows a step's GEMMs read ~2.3 GB of weights (LFM2-1.2B) and cuBLAS reaches
~60% of the copy bandwidth there (BENCHMARKS.md, session 9).

  GPU:  PYTHONPATH=src python bench/decode_gemm.py [--rows 100] [--model LFM2-1.2B]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from fastlfm.models.config import Lfm2Config
from fastlfm.testing import real_config
from gpu import copy_bandwidth  # bench/, the script's folder, is on sys.path


@triton.jit
def _gemm_split_k(X, W, Y, M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """Y (M, N) fp32 (+)= X (M, K) @ W (N, K)^T over this program's K range (atomic when split)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k_start = tl.program_id(1) * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + m[:, None] * K + k[None, :], mask=m[:, None] < M, other=0.0)
        b = tl.load(W + n[None, :] * K + k[:, None])
        acc = tl.dot(a, b, acc)
    if SPLIT == 1:
        tl.store(Y + m[:, None] * N + n[None, :], acc, mask=m[:, None] < M)
    else:
        tl.atomic_add(Y + m[:, None] * N + n[None, :], acc, mask=m[:, None] < M, sem="relaxed")


def triton_gemm(x, w, y32, cfg):
    M, K = x.shape
    N = w.shape[0]
    split = cfg["SPLIT"]
    if split > 1:
        y32.zero_()
    _gemm_split_k[(N // cfg["BLOCK_N"], split)](x, w, y32, M, N, K, K // split, BLOCK_M=cfg["BLOCK_M"],
                                               BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT=split,
                                               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y32.to(x.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100])
    ap.add_argument("--model", default="LFM2-1.2B")
    args = ap.parse_args(argv)
    c = Lfm2Config.from_dict(real_config(args.model))
    D, I, hd = c.hidden_size, c.ffn_dim, c.head_dim
    H, KV = c.num_attention_heads, c.num_key_value_heads
    shapes = {"conv in_proj": (3 * D, D), "out/o_proj": (D, D), "qkv": ((H + 2 * KV) * hd, D),
              "gate_up": (2 * I, D), "down": (D, I), "lm_head": (c.vocab_size, D)}
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    print(f"{args.model}: copy bandwidth {bw / 1e12:.2f} TB/s")
    grid = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=s, num_warps=w, num_stages=st)
            for bm, bn, bk, s, w, st in itertools.product((128,), (64, 128), (64, 128), (1, 2, 4), (4,), (3, 4))]
    for M in args.rows:
        print(f"\n{M} rows | shape | weight MB | floor us | cuBLAS us (% of bw) | Triton best us (% of bw) | config")
        for name, (N, K) in shapes.items():
            copies = max(1, (512 << 20) // (N * K * 2))  # sweep more than L2, as a step does through its layers
            ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(min(copies, 8))]
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y32 = torch.empty(M, N, device=dev, dtype=torch.float32)
            floor = 1e6 * N * K * 2 / bw
            cub = 1e3 * triton.testing.do_bench_cudagraph(lambda: [F.linear(x, w) for w in ws]) / len(ws)
            ref = F.linear(x, ws[0]).float()
            best = None
            for g in grid:
                if K % (g["SPLIT"] * g["BLOCK_K"]) or N % g["BLOCK_N"]:
                    continue
                try:
                    out = triton_gemm(x, ws[0], y32, g).float()
                    if (out - ref).abs().max().item() > 0.05 * ref.abs().max().item():
                        print(f"  {name} {g}: WRONG", file=sys.stderr)
                        continue
                    us = 1e3 * triton.testing.do_bench_cudagraph(lambda: [triton_gemm(x, w, y32, g) for w in ws]) / len(ws)
                except Exception as e:
                    print(f"  {name} {g}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or us < best[0]:
                    best = (us, g)
            print(f"| {name} | {N}x{K} | {N * K * 2 / 1e6:.1f} | {floor:.1f} | {cub:.1f} ({100 * floor / cub:.0f}%) | "
                  f"{best[0]:.1f} ({100 * floor / best[0]:.0f}%) | {best[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
