"""The MoE router's Triton kernel (fastlfm.engine.kernels.moe.route_top_k) against the torch ops it
replaces (ops.moe_route: casts, fp32 GEMM, sigmoid + bias, top-k, gather, normalize), eager and under
torch.compile as the engine's decode graphs ran them, at LFM2-MoE's router shapes. Each is timed with L2
flushed first (in a decode step the experts' weights stream through it); the table gives microseconds per
layer and per decode step (x the model's MoE layers).

  GPU:  PYTHONPATH=src python bench/moe_router.py [--tokens 1 100 256 1024] [--configs] [--align]
  CPU:  PYTHONPATH=src python bench/moe_router.py --device cpu   (a smoke run on triton's interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlfm.engine.kernels import moe  # noqa: E402
from fastlfm.models.lfm2_moe import Lfm2MoeConfig  # noqa: E402
from fastlfm.ops import moe_route  # noqa: E402
from fastlfm.testing import MOE_SHAPES, real_moe_config  # noqa: E402
from moe_tiles import time_graph  # noqa: E402  (bench/, the script's folder, is on sys.path)


def time_us(fn, device: str) -> float:
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    import triton.testing
    return 1e3 * triton.testing.do_bench(fn)  # L2 flushed before each call, as in a decode step (the experts
    # stream through it), and launched: a graph replay with L2 warm hid how long the router's loads wait


def router_tiles(route, E: int, device: str) -> str:
    """The router kernel's time over K tile widths and warps (`route(config)` runs it), best first."""
    tried = []
    for block_k in (128, 256, 512, 1024, 2048):
        for warps in (4, 8, 16):
            if block_k * E // (32 * warps) > 256:  # products a thread holds
                continue
            config = dict(BLOCK_K=block_k, num_warps=warps)
            route(config)  # JIT outside the timing
            tried.append((time_us(lambda: route(config), device), f"{block_k}/{warps}"))
    return ", ".join(f"{us:.1f}/{name}" for us, name in sorted(tried)[:8])


def align_chunks(ids: torch.Tensor, E: int) -> str:
    """The align kernel's time (default, then chunk sizes x warps) on the routing `ids`, best first."""
    block_m = moe.default_config(ids.numel(), E)["BLOCK_M"]
    configs = [None] + [dict(CHUNK=c, num_warps=w) for c in (128, 256, 512, 1024) for w in (4, 8, 16)]
    tried = []
    for config in configs:
        moe.route_blocks(ids, E, block_m, config=config)  # JIT outside the timing
        us = time_graph(lambda: moe.route_blocks(ids, E, block_m, config=config))  # tiny data: L2 is no matter
        tried.append((us, "default" if config is None else f"{config['CHUNK']}/{config['num_warps']}"))
    return ", ".join(f"{us:.1f}/{name}" for us, name in sorted(tried))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=list(MOE_SHAPES), choices=MOE_SHAPES)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 100, 256, 1024])
    ap.add_argument("--configs", action="store_true", help="also time other tiles of the kernel at 1 and 100 tokens")
    ap.add_argument("--align", action="store_true", help="also time the align kernel (sort by expert, block table) "
                    "over chunk sizes and warps at 1, 100 and 256 tokens (CUDA-graph replays)")
    args = ap.parse_args()
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float16)
    compiled = torch.compile(moe_route, dynamic=False) if dev == "cuda" else moe_route
    print("| model | tokens | Triton kernel us | torch ops us (eager) | torch ops us (compiled) | kernel / compiled "
          "| step saving us (x MoE layers) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        cfg = Lfm2MoeConfig.from_dict(real_moe_config(name))
        E, k, D = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
        layers = cfg.num_hidden_layers - cfg.num_dense_layers
        g = torch.Generator().manual_seed(0)
        gate = (torch.randn(E, D, generator=g) / D**0.5).to(dev, dtype)
        bias = (0.05 * torch.randn(E, generator=g)).to(dev)
        for T in args.tokens if dev == "cuda" else [1, 8]:
            x = torch.randn(T, D, generator=g).to(dev, dtype)
            route_args = (x, gate, bias, k, cfg.norm_topk_prob, cfg.routed_scaling_factor)
            run = {"kernel": lambda: moe.route_top_k(*route_args), "eager": lambda: moe_route(*route_args),
                   "compiled": lambda: compiled(*route_args)}
            for fn in run.values():
                fn()  # compile / JIT outside the timing
            us = {n: time_us(fn, dev) for n, fn in run.items()}
            print(f"| {name} | {T} | {us['kernel']:.1f} | {us['eager']:.1f} | {us['compiled']:.1f} | "
                  f"{us['kernel'] / us['compiled']:.2f} | {(us['compiled'] - us['kernel']) * layers:.0f} ({layers}) |")
            if args.configs and T in (1, 100):
                tiles = router_tiles(lambda c: moe.route_top_k(*route_args, config=c), E, dev)
                print(f"{name}, {T} tokens, kernel configs (us, BLOCK_K/warps), best first: {tiles}")
            if args.align and T in (1, 100, 256):
                chunks = align_chunks(run["kernel"]()[0], E)
                print(f"{name}, {T} tokens, align kernel (us, CHUNK/warps), best first: {chunks}")


if __name__ == "__main__":
    main()
