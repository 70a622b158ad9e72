"""Tile sizes for the MoE experts' Triton kernels (fastlfm.engine.kernels.moe) at the LFM2-MoE shapes.

Why: `moe.default_config` was picked by reasoning, not measured, and the 100 x 1k/1k throughput of
LFM2-8B-A1B (issue 17) waits on these two kernels at ~12.5 rows per expert. For each token count this
times the gate_up kernel and the down kernel on their own (CUDA-graph replay, as in a decode step;
one layer's experts are 700 MB, far past L2) over a grid of tiles, and prints the default's time,
the best tiles and the weight-read floor (every chosen expert's bytes at the measured copy bandwidth).
Routing is uniform random top-k (random-weight routers route nearly uniformly).

  GPU:  PYTHONPATH=src python bench/moe_tiles.py [--model LFM2-8B-A1B] [--tokens 100 1 16384]
  CPU:  PYTHONPATH=src python bench/moe_tiles.py --device cpu   (a smoke run on triton's interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from fastlfm.engine.kernels import moe  # noqa: E402
from fastlfm.testing import real_moe_config  # noqa: E402
from gpu import copy_bandwidth  # noqa: E402  (bench/, the script's folder, is on sys.path)


def tile_grid(tokens_per_expert: float, smoke: bool) -> tuple[list[int], list[dict]]:
    """BLOCK_M values and per-kernel tiles to try."""
    if smoke:
        return [16], [dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)]
    if tokens_per_expert <= 64:
        block_ms = [16, 32] if tokens_per_expert > 2 else [16]
        ns, ks, warps, stages = (32, 64, 128), (64, 128, 256), (4, 8), (3, 4)
    else:
        block_ms = [64, 128]
        ns, ks, warps, stages = (64, 128), (64,), (4, 8), (3, 4)
    tiles = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
             for n, k, w, s in itertools.product(ns, ks, warps, stages) if w == 4 or n >= 128]
    return block_ms, tiles


def time_graph(fn) -> float:
    """Microseconds a replay of fn's CUDA graph takes (the CPU smoke run: one call, wall time)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="LFM2-8B-A1B", help="an LFM2-MoE shape (testing.real_moe_config)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[100, 16384])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    cfg = real_moe_config(args.model)
    E, k, D, I = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    if smoke:
        E, D, I, args.tokens = 8, 64, 48, [5]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(E, 2 * I, D, device=device, dtype=dtype, generator=g) * 0.02
    down = torch.randn(E, D, I, device=device, dtype=dtype, generator=g) * 0.02
    bw = copy_bandwidth() if device.type == "cuda" else float("nan")
    per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    print(f"{args.model}: E={E} top-{k} D={D} I={I}; copy bandwidth {bw / 1e12:.2f} TB/s; {per_expert / 2**20:.1f} MiB an expert")
    for T in args.tokens:
        x = torch.randn(T, D, device=device, dtype=dtype, generator=g)
        ids = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices.to(torch.int32)
        w = torch.rand(T, k, device=device, generator=g).to(dtype)
        hit = int(ids.unique().numel())
        pairs = T * k
        block_ms, tiles = tile_grid(pairs / E, smoke)
        default = moe.default_config(pairs, E)
        if default["BLOCK_M"] not in block_ms:
            block_ms.append(default["BLOCK_M"])
        floor_us = 1e6 * hit * per_expert / bw
        print(f"\n{T} tokens ({pairs / E:.1f} rows an expert, {hit} experts hit): weight-read floor {floor_us:.1f} us "
              f"(gate_up {floor_us * 2 / 3:.1f}, down {floor_us / 3:.1f})")
        for block_m in block_ms:
            order, ends, block_expert, block_start = moe.route_blocks(ids, E, block_m)
            blocks = block_expert.numel()
            inter = x.new_empty((pairs, I))
            out = x.new_empty((pairs, D))
            ieee = dtype == torch.float32

            def gate_up_call(t):
                return lambda: moe._gate_up_kernel[(blocks, triton.cdiv(I, t["BLOCK_N"]))](
                    x, gate_up, inter, order, block_expert, block_start, ends, D, I, k, x.stride(0), gate_up.stride(0),
                    gate_up.stride(1), BLOCK_M=block_m, IEEE=ieee, **t)

            def down_call(t):
                return lambda: moe._down_kernel[(blocks, triton.cdiv(D, t["BLOCK_N"]))](
                    inter, down, out, w.reshape(-1), order, block_expert, block_start, ends, D, I, down.stride(0),
                    down.stride(1), BLOCK_M=block_m, IEEE=ieee, **t)

            for name, call in (("gate_up", gate_up_call), ("down", down_call)):
                results = []
                for t in tiles + ([default[name]] if block_m == default["BLOCK_M"] else []):
                    try:
                        results.append((time_graph(call(t)), t))
                    except Exception as e:  # out of shared memory / registers for this tile
                        print(f"  M{block_m} {name} {t}: {type(e).__name__}", file=sys.stderr)
                if not results:
                    continue
                results.sort(key=lambda r: r[0])
                line = f"  BLOCK_M {block_m} {name:7s} best " + "; ".join(
                    f"{us:.1f} us {t}" for us, t in results[:3])
                if block_m == default["BLOCK_M"]:
                    dus = next(us for us, t in results if t is default[name])
                    line += f" | default {dus:.1f} us {default[name]}"
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
