"""Candidate kernel for batch-1..16 decode: a Triton skinny GEMM (M <= 16 rows) against cuBLAS
(torch's F.linear, the engine's GEMMs today) at the LFM2 decode shapes.

Why: at batch 1 the decode step waits on GEMMs that read their weights at 50-65% of copy
bandwidth (the small in/out projections and the split-K down-projection, BENCHMARKS.md).
This probe measures whether a plain weight-streaming kernel does better, before the engine
uses one. Each program streams BLOCK_N weight rows through a K loop into a 16-row tensor-core
dot (the M rows padded with zeros); a small config search per shape picks the best. Timing is
CUDA-graph replay (triton.testing.do_bench_cudagraph), so launch overhead counts as it does
inside the engine's graphs.

  GPU:  PYTHONPATH=src python bench/skinny_gemm.py
  CPU:  TRITON_INTERPRET=1 PYTHONPATH=src python bench/skinny_gemm.py --device cpu   (correctness only)
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastlfm.models.config import Lfm2Config
from fastlfm.testing import real_config


@triton.jit
def _skinny_gemm_kernel(X, W, Y, M, N, K, s_xm, s_wn, s_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[M, N] = X[M, K] @ W[N, K]^T for M <= BLOCK_M; one program per BLOCK_N output columns."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * s_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(W + n[:, None] * s_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + m[:, None] * s_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < N))


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, block_n: int = 32, block_k: int = 128, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """x (M, K), w (N, K) -> x @ w.T, fp32 accumulation; M <= 16."""
    M, K = x.shape
    N = w.shape[0]
    assert M <= 16 and w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1
    y = x.new_empty((M, N))
    _skinny_gemm_kernel[(triton.cdiv(N, block_n),)](
        x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
           for bn, bk, nw, ns in itertools.product((16, 32, 64), (128, 256), (4,), (3, 4))]


def decode_shapes(name: str) -> list[tuple[str, int, int]]:
    """(what, N, K) of every GEMM of one decode step (fused q/k/v and gate/up, as the engine runs them)."""
    c = Lfm2Config.from_dict(real_config(name))
    D, d = c.hidden_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    return [("qkv", qkv, D), ("conv in_proj", 3 * D, D), ("out_proj", D, D), ("gate/up", 2 * c.ffn_dim, D),
            ("down", D, c.ffn_dim), ("lm_head", c.vocab_size, D)]


def check_correctness(device: str) -> bool:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # the interpreter's bf16 is broken
    g = torch.Generator().manual_seed(0)
    ok = True
    for M, N, K, cfg in ((1, 48, 96, CONFIGS[0]), (3, 100, 300, CONFIGS[3]), (16, 64, 256, CONFIGS[-1])):
        x = torch.randn(M, K, generator=g).to(device, dtype)
        w = torch.randn(N, K, generator=g).to(device, dtype)
        got = skinny_gemm(x, w, **cfg).double()
        ref = x.double() @ w.double().T
        err = float((got - ref).norm() / ref.norm())
        good = err < (1e-5 if dtype == torch.float32 else 1e-2)
        ok &= good
        print(f"skinny gemm M={M} N={N} K={K} {cfg}: rel err {err:.1e} {'ok' if good else 'FAIL'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["LFM2-1.2B", "LFM2-350M"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    ok = check_correctness(args.device)
    if args.device == "cpu":
        return 0 if ok else 1
    from triton.testing import do_bench_cudagraph

    from gpu import copy_bandwidth  # bench/gpu.py: the same ceiling as the engine benchmark

    bw = copy_bandwidth()
    print(f"\n{torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| model | GEMM (N x K) | rows | cuBLAS us | Triton us (best config) | weight-read floor us "
          "| cuBLAS: fraction of bandwidth | Triton: fraction | Triton speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for what, N, K in decode_shapes(name):
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            for M in args.rows:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x, w)
                cublas = 1e3 * do_bench_cudagraph(lambda: F.linear(x, w))
                best = None
                for cfg in CONFIGS:
                    if (skinny_gemm(x, w, **cfg) - ref).abs().max() > 0.05 * ref.abs().max():
                        print(f"{what} M={M} {cfg}: WRONG RESULT")
                        ok = False
                        continue
                    us = 1e3 * do_bench_cudagraph(lambda cfg=cfg: skinny_gemm(x, w, **cfg))
                    best = min(best or (us, cfg), (us, cfg), key=lambda b: b[0])
                floor = 1e6 * N * K * 2 / bw
                print(f"| {name} | {what} ({N} x {K}) | {M} | {cublas:.1f} | {best[0]:.1f} ({best[1]}) | {floor:.1f} | "
                      f"{floor / cublas:.2f} | {floor / best[0]:.2f} | {cublas / best[0]:.2f}x |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
