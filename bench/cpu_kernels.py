"""Batch-1 (and prefill-sized) matrix products on CPU: which kernel streams an LFM2
weight fastest? Every candidate runs on every LFM2-350M / LFM2-1.2B decode weight shape
(after the engine's q/k/v and w1/w3 fusion), over enough distinct weights that none stays
in cache, and reports the weight read rate (GB/s) at M=1 and the time at M=128.

    python bench/cpu_kernels.py [--threads 2] [--models LFM2-350M LFM2-1.2B] [--mb 160]

Candidates: fp32 / bf16 `F.linear` (torch's default path), fp32 input-major `F.linear`,
oneDNN pre-packed linear (`torch.ops.mkldnn._reorder_linear_weight` + `_linear_pointwise`),
MKL packed GEMM (fp32, `torch.ops.mkl._mkl_linear`), int8 per-channel
(`aten._weight_int8pack_mm`) and int4 group-wise (`aten._weight_int4pack_mm_for_cpu`,
groups 32 / 64) with bf16 and fp32 activations; and fastlfm's own kernels (fastlfm.cpu_gemv:
`gemv_dense` fp32 / bf16, `gemv_q8`, `gemv_q4` g32 / g64 with int8 inputs) where the CPU runs them.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F


def shapes(model: str) -> dict[str, tuple[int, int]]:
    from fastlfm.models import Lfm2Config
    from fastlfm.testing import real_config

    c = Lfm2Config.from_dict(real_config(model))
    D, Fw, d = c.hidden_size, c.ffn_dim, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    return {"qkv": (qkv, D), "attn/conv out_proj": (D, D), "conv in_proj": (3 * D, D), "w1|w3": (2 * Fw, D),
            "w2": (D, Fw), "lm_head": (c.vocab_size, D)}


def candidates(N: int, K: int):
    """name -> (bytes per weight, make(w_fp32) -> packed, run(x_m, packed), activation dtype)."""
    mk = torch.ops.mkldnn
    out = {
        "fp32 F.linear": (4, lambda w: w, F.linear, torch.float32),
        "fp32 F.linear input-major": (4, lambda w: w.t().contiguous().t(), F.linear, torch.float32),
        "fp32 oneDNN packed": (4, lambda w: mk._reorder_linear_weight(w, 1),
                               lambda x, p: mk._linear_pointwise(x, p, None, "none", [None], ""), torch.float32),
        "fp32 MKL packed": (4, lambda w: (torch.ops.mkl._mkl_reorder_linear_weight(w, 1), w),
                            lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, 1), torch.float32),
        "bf16 F.linear": (2, lambda w: w.bfloat16(), F.linear, torch.bfloat16),
        "bf16 oneDNN packed": (2, lambda w: mk._reorder_linear_weight(w.bfloat16(), 1),
                               lambda x, p: mk._linear_pointwise(x, p, None, "none", [None], ""), torch.bfloat16),
    }
    for act in (torch.bfloat16, torch.float32):
        tag = "bf16" if act == torch.bfloat16 else "fp32"

        def int8(w, act=act):
            scale = w.abs().amax(1).clamp(min=1e-8) / 127
            return (w / scale[:, None]).round().to(torch.int8), scale.to(act)

        out[f"int8 _weight_int8pack_mm, {tag} x"] = (1, int8, lambda x, p: torch.ops.aten._weight_int8pack_mm(x, *p), act)
        for g in (32, 64):
            if K % g:
                continue

            def int4(w, g=g, act=act):
                wg = w.view(N, K // g, g)
                lo, hi = wg.amin(-1), wg.amax(-1)
                scale = ((hi - lo) / 15).clamp(min=1e-8)
                q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(N, K).to(torch.int32)
                zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
                sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(act)  # (K/g, N, 2)
                return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz

            out[f"int4 g{g} _weight_int4pack_mm_for_cpu, {tag} x"] = (
                0.5 + 4 / g, int4, lambda x, p, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], g, p[1]), act)
    out.update(fastlfm_candidates(N, K))
    return out


def fastlfm_candidates(N: int, K: int):
    """fastlfm's own kernels (fastlfm.cpu_gemv) where this CPU runs them: the weight as the engine
    stores it, bf16 inputs (the engine's activations), the output in bf16."""
    from fastlfm import cpu_gemv
    from fastlfm.cpu_linear import quantize_int4, quantize_int8

    if not cpu_gemv.available():
        print(f"(fastlfm's kernels do not run here: {cpu_gemv.unavailable_reason()})")
        return {}
    bf16 = torch.bfloat16
    out = {
        "fp32 fastlfm gemv_dense": (4, lambda w: w.contiguous(), lambda x, w: cpu_gemv.gemv_dense(x, w, torch.float32),
                                    torch.float32),
        "bf16 fastlfm gemv_dense": (2, lambda w: w.bfloat16(), lambda x, w: cpu_gemv.gemv_dense(x, w, bf16), bf16),
        "int8 fastlfm gemv_q8 (int8 x)": (
            1 + 4 / K, lambda w: cpu_gemv.pack_int8(*(lambda q: (q.q, q.scale))(quantize_int8(w))),
            lambda x, p: cpu_gemv.gemv_int8(x, p[0], p[1], N, bf16), bf16),
    }
    for g in (32, 64):
        for sym in (True, False):  # symmetric: an fp16 scale per group (Q4_0); else scale + zero
            if K % g == 0:
                out[f"int4 g{g}{'' if sym else ' +zero'} fastlfm gemv_q4 (int8 x)"] = (
                    0.5 + (2 if sym else 4) / g,
                    lambda w, g=g, sym=sym: (lambda q: cpu_gemv.pack_int4(q.q, q.scale, q.zero, g))(
                        quantize_int4(w, g, symmetric=sym)),
                    lambda x, p, g=g: cpu_gemv.gemv_int4(x, p[0], p[1], g, N, bf16), bf16)
    return out


def time_kernel(run, packs, x, reps: int) -> float:
    """Time per weight: each call timed alone, the fastest of `reps` sweeps kept per weight (a sweep
    touches every other weight in between, so none is in cache), then averaged over the weights.
    Per-call minima make the number robust to other processes taking a core now and then."""
    best = [float("inf")] * len(packs)
    with torch.inference_mode():
        for p in packs:
            run(x, p)
        for _ in range(reps):
            for i, p in enumerate(packs):
                t = time.perf_counter()
                run(x, p)
                best[i] = min(best[i], time.perf_counter() - t)
    return sum(best) / len(best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["LFM2-350M", "LFM2-1.2B"])
    ap.add_argument("--mb", type=float, default=160,
                    help="MB of distinct weights per sweep, in each kernel's own format (> the caches)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of candidate names to keep")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print("| model | weight | N x K | kernel | M=1 ms | M=1 GB/s | M=128 ms |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for model in args.models:
        for label, (N, K) in shapes(model).items():
            ws = [torch.randn(N, K, generator=g) * 0.02 for _ in range(2)]
            x1, x128 = torch.randn(1, K, generator=g), torch.randn(128, K, generator=g)
            for name, (nbytes, make, run, act) in candidates(N, K).items():
                if args.only and not any(s in name for s in args.only):
                    continue
                # as many distinct copies as make args.mb of this format (int4 is 1/8 of fp32: sized by fp32
                # bytes, the copies of a 4-bit kernel fit in a 32 MB L3 and read from it, not from memory)
                copies = max(2, math.ceil(args.mb * 2**20 / (N * K * nbytes)))
                packs = [make(ws[i % len(ws)].clone()) for i in range(copies)]  # (clone: a make may return its input)
                t1 = time_kernel(run, packs, x1.to(act), args.reps)
                t128 = time_kernel(run, packs[:2], x128.to(act), 2)
                print(f"| {model} | {label} | {N}x{K} | {name} | {t1 * 1e3:.3f} | {N * K * nbytes / t1 / 1e9:.1f} "
                      f"| {t128 * 1e3:.2f} |", flush=True)
                del packs
            del ws


if __name__ == "__main__":
    main()
