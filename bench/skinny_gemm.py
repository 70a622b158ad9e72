"""The engine's batch-1 decode projection kernel (fastlfm.engine.kernels.linear.fused_linear:
a Triton skinny GEMM, optionally split-K, with the RMSNorm / SiLU*mul prologue and the residual
epilogue folded in) against its peer at the LFM2 decode shapes, and its tuner.

Why: at batch 1 the decode step waits on GEMMs that read their weights at 30-60% of copy
bandwidth and on the small kernels around them (BENCHMARKS.md). Each shape runs as the engine
would run it (with its fusion). The peer is what the engine runs otherwise: cuBLAS (timed here)
plus the norm / SiLU*mul kernels the fused kernel replaces (their cost as profiled in the engine,
PEER_EXTRA_US) and, for the conv block's in_proj, the conv step kernel (timed here). A config search picks the best config per shape; `--write-configs` stores it for
this GPU model, with whether it beats the peer, where the engine looks it up; the engine uses the
fused kernel only for the shapes where it does. Timing is CUDA-graph replay
(triton.testing.do_bench_cudagraph), so launch overhead counts as it does inside the engine's
graphs. Each timed call streams through enough copies of the weight to exceed L2 (256 MB), as a
decode step does through its layers; a single 8 MB weight would otherwise come from L2 on every
replay.

  GPU:  PYTHONPATH=src python bench/skinny_gemm.py [--write-configs]   (correctness: bench/check_kernels.py)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F

from fastlfm.engine.kernels.conv import gated_conv_decode_step
from fastlfm.engine.kernels.linear import TUNED_CONFIGS, fused_linear, in_proj_gated_conv
from fastlfm.models.config import Lfm2Config
from fastlfm.testing import real_config


L2_SWEEP_BYTES = 256 << 20

# Tiles of BLOCK_N x BLOCK_K fp32 products: at most 64 registers a thread for the products. Wide rows
# (BLOCK_K 1024: a 1024-wide K in one slice, nothing left to loop over) and tall tiles (BLOCK_N 64 x
# BLOCK_K 128, which did best for gate/up in the first kernel's search) as well as the middle.
TILES = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 4), (8, 1024, 8), (16, 1024, 8),
         (32, 128, 4), (64, 128, 4), (64, 128, 8)]
CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw, num_stages=4)
           for (bn, bk, nw), sk in itertools.product(TILES, (1, 2, 4))]


def configs_for(K: int, fusion: str) -> list[dict]:
    """The configs worth timing at this K: every split gets K to work on; the conv block kernel has no split-K."""
    return [c for c in CONFIGS if c["SPLIT_K"] * c["BLOCK_K"] <= K and (c["SPLIT_K"] == 1 or fusion != "norm+conv")]


# What the peer runs besides cuBLAS for each fusion, from the engine's compiled decode graph on the H200
# (2026-12-01 profile): inductor's RMSNorm kernel 1.5 us, its SiLU*mul kernel 1.1 us; the residual add
# rides in the next norm kernel there, so it costs the peer nothing.
PEER_EXTRA_US = {"norm": 1.5, "norm+conv": 1.5, "residual": 0.0, "silu+residual": 1.1}


def decode_shapes(name: str) -> list[tuple[str, int, int, str]]:
    """(what, N, K, fusion) of the decode step's projections, as the engine runs them (fused q/k/v and
    gate/up; `fusion`: the prologue / epilogue folded in; the conv block's in_proj runs with the conv step,
    kernels/linear.in_proj_gated_conv). lm_head stays on cuBLAS, which reads it at
    bandwidth (0.93-0.98 on the H200, 2026-12-01)."""
    c = Lfm2Config.from_dict(real_config(name))
    D, d = c.hidden_size, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    return [("qkv", qkv, D, "norm"), ("conv in_proj", 3 * D, D, "norm+conv"), ("out_proj", D, D, "residual"),
            ("gate/up", 2 * c.ffn_dim, D, "norm"), ("down", D, c.ffn_dim, "silu+residual")]


def fusion_args(fusion: str, g, r) -> dict:
    """fused_linear's arguments for one shape's fusion (x is [gate | up], 2K wide, for "silu+residual")."""
    return dict(norm_weight=g if fusion.startswith("norm") else None, eps=1e-5, silu_gate=fusion.startswith("silu"),
                residual=r if "residual" in fusion else None)


class ConvStep:
    """The conv step that rides with the conv block's in_proj (fusion "norm+conv"): its weights, a slot
    of state, and the eager path's conv kernel (the peer's)."""

    def __init__(self, D: int):
        self.weight = torch.randn(D, 1, 3, device="cuda", dtype=torch.bfloat16)
        self.pool = torch.randn(4, 2, D, device="cuda", dtype=torch.bfloat16)
        self.slot, self.past = torch.tensor([1], device="cuda"), torch.tensor([7], device="cuda")

    def eager(self, bcx, pool):
        return gated_conv_decode_step(bcx, self.weight, None, pool, self.slot, self.past)

    def fused(self, x, w, g, pool, cfg):
        return in_proj_gated_conv(x, w, g, 1e-5, self.weight, pool, self.slot, self.past, config=cfg)


def write_configs(device: str, tuned: dict) -> None:
    table = json.loads(TUNED_CONFIGS.read_text()) if TUNED_CONFIGS.exists() else {}
    table[device] = {**table.get(device, {}), **tuned}
    TUNED_CONFIGS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(tuned)} configs for {device} to {TUNED_CONFIGS}:", flush=True)
    print(json.dumps({device: tuned}, sort_keys=True))  # in the log too, should the file not come back
    if os.environ.get("OUT"):
        shutil.copy(TUNED_CONFIGS, os.environ["OUT"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["LFM2-1.2B", "LFM2-350M"])
    ap.add_argument("--write-configs", action="store_true",
                    help=f"store each shape's best config for this GPU in {TUNED_CONFIGS}, and whether it beats the "
                    "peer (the engine uses the fused kernel only where it does)")
    args = ap.parse_args()
    from triton.testing import do_bench_cudagraph

    from check_kernels import eager_linear  # bench/: the fused kernel's reference
    from gpu import copy_bandwidth  # bench/gpu.py: the same ceiling as the engine benchmark

    def bench(fn, copies):
        return 1e3 * do_bench_cudagraph(fn) / copies

    ok, tuned = True, {}
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name(0)
    print(f"\n{device}: copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| model | GEMM (N x K) | fusion | weight-read floor us | cuBLAS alone us (fraction) | peer us (cuBLAS + "
          "replaced kernels) | fused kernel us (fraction) | speed-up over the peer | config |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for what, N, K, fusion in decode_shapes(name):
            copies = max(1, min(64, -(-L2_SWEEP_BYTES // (N * K * 2))))
            ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies)]
            w, g = ws[0], 1 + 0.1 * torch.randn(K, device="cuda", dtype=torch.bfloat16)
            floor = 1e6 * N * K * 2 / bw
            x = torch.randn(1, 2 * K if fusion.startswith("silu") else K, device="cuda", dtype=torch.bfloat16)
            x_plain = x[:, :K].contiguous()
            r = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
            fargs = fusion_args(fusion, g, r)
            ref = eager_linear(x, w, **fargs)  # what the engine runs without the fused kernel
            cublas = bench(lambda: [F.linear(x_plain, w_) for w_ in ws], copies)
            extra_us = PEER_EXTRA_US[fusion]
            if fusion == "norm+conv":  # the peer runs the conv kernel after cuBLAS + norm: timed here
                conv, bcx = ConvStep(N // 3), ref
                state = conv.pool.clone()  # what the checks start from (timed calls shift conv.pool)
                ref = conv.eager(bcx, state.clone())
                extra_us += bench(lambda: conv.eager(bcx, conv.pool), 1)
                run = lambda cfg, w_, fresh=False: conv.fused(  # noqa: E731
                    x, w_, g, state.clone() if fresh else conv.pool, cfg)
            else:
                run = lambda cfg, w_, fresh=False: fused_linear(x, w_, **fargs, config=cfg)  # noqa: E731
            timings = []
            for cfg in configs_for(K, fusion):
                out = run(cfg, w, fresh=True)  # (the conv step from the state the reference saw)
                err = (out - ref).abs().max() / ref.abs().max()
                if err > 0.02:
                    print(f"{what} {cfg}: WRONG RESULT (max error {float(err):.3f} of max |y|)")
                    ok = False
                    continue
                timings.append((bench(lambda cfg=cfg: [run(cfg, w_) for w_ in ws], copies), cfg))
            if not timings:
                continue
            us, best = min(timings, key=lambda t: t[0])
            peer = cublas + extra_us
            print(f"| {name} | {what} ({N} x {K}) | {fusion} | {floor:.1f} | {cublas:.1f} ({floor / cublas:.2f}) | "
                  f"{peer:.1f} | {us:.1f} ({floor / us:.2f}) | {peer / us:.2f}x | {best} |", flush=True)
            tuned[f"{N},{K}"] = dict(config=best, fused_us=round(us, 2), peer_us=round(peer, 2), use=us < peer)
        if args.write_configs:  # after each model, so that a run cut short keeps what it measured
            write_configs(device, tuned)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
