"""The paged decode-attention kernel at batch ~100 (issue 16's c=100 load: 100 sequences of 1-2k
tokens, LFM2-1.2B's 32 query / 8 KV heads of 64): launch settings and history splits against the
bytes it must read. At c=100 this kernel is ~0.45 ms of a 1.55 ms decode step at 1k tokens of
context and twice that at 2k (BENCHMARKS.md, session 9).

Blocks are dealt to the sequences in a shuffled order (a serving cache's blocks are not contiguous
per sequence). Timing is CUDA-graph replay.

  GPU:  PYTHONPATH=src python bench/decode_attention.py [--batch 100] [--history 1024 2048]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton.testing

from fastlfm.engine.kernels.paged_attention import DECODE_LAUNCH, num_history_splits, paged_decode_attention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[100])
    ap.add_argument("--history", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 64], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--splits-only", action="store_true", help="the default launch settings, 1 / 2 / 4 splits")
    args = ap.parse_args(argv)
    (Hq, Hkv, d), block = args.heads, args.block
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    launches = [dict(num_warps=w, num_stages=st) for w, st in itertools.product((2, 4, 8), (1, 2, 3, 4))]
    if args.splits_only:
        launches = [{**DECODE_LAUNCH, "num_stages": 3}]
    for B, history in itertools.product(args.batch, args.history):
        nb = -(-(history + 1) // block)
        k_cache = torch.randn(B * nb + 1, block, Hkv, d, device=dev, dtype=dt, generator=g)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(B * nb, device=dev, generator=g).to(torch.int32).view(B, nb)
        past = torch.full((B,), history, device=dev, dtype=torch.long)
        q, kn, vn = (torch.randn(B, h, d, device=dev, dtype=dt, generator=g) for h in (Hq, Hkv, Hkv))
        kv_bytes = 2 * B * history * Hkv * d * dt.itemsize
        ref = paged_decode_attention(q, kn, vn, k_cache, v_cache, tables, past).float()
        auto = num_history_splits(B, Hkv, dev)
        results = []
        for splits, launch in itertools.product((1, 2, 4), launches):
            try:
                out = paged_decode_attention(q, kn, vn, k_cache, v_cache, tables, past, splits=splits, launch=launch)
                err = (out.float() - ref).abs().max().item()
                us = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: paged_decode_attention(q, kn, vn, k_cache, v_cache, tables, past, splits=splits, launch=launch))
            except Exception as e:  # e.g. out of resources
                print(f"  splits {splits} {launch}: {type(e).__name__}", file=sys.stderr)
                continue
            results.append((us, splits, launch, err))
        default = next(r for r in results if r[1] == auto and r[2] == {**DECODE_LAUNCH, "num_stages": 3})
        results.sort(key=lambda r: r[0])
        print(f"\nbatch {B}, history {history} ({kv_bytes / 1e6:.0f} MB of K/V): default (splits {auto}, {DECODE_LAUNCH}) "
              f"{default[0]:.1f} us = {kv_bytes / default[0] / 1e6:.2f} TB/s")
        for us, splits, launch, err in results[:6 if not args.splits_only else 3]:
            print(f"  {us:7.1f} us  {kv_bytes / us / 1e6:.2f} TB/s  splits {splits} {launch}  max diff vs default {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
