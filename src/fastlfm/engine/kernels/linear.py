"""Batch-1 decode projections in one kernel each (a GEMV with its neighbours folded in).

At batch 1 a decode step's projections are weight-streaming GEMVs, and the eager ops around
them (the RMSNorm before in_proj / qkv / gate-up, SiLU(gate) * up before the down-projection,
the residual add after out_proj / down) are each one more small kernel. Here one program
streams BLOCK_N weight rows through a K loop (or 1/SPLIT_K of it: split-K, where the last split
to arrive at a tile reduces, so there is no second kernel) and folds those ops in:
  prologue: RMSNorm of the input row, or SiLU(gate) * up of a [gate | up] row;
  epilogue: + residual.
Plain FMA, no tensor-core dot: a dot pads the row to 16, and the prologue's elementwise work
(SiLU's exp and divide above all) would then run on 16 rows to use one; the first version did,
and its down-projection took 130 us instead of 17 (H200 profile, 2026-12-01).
The norm is one pass: the products take x * g and the sum of squares accumulates alongside, and
1/rms scales the fp32 result (a first pass over x would put its latency before the first
weight load). So the norm's rounding differs from ops.rms_norm by one bf16 rounding of x * g
instead of two (x / rms, then * g); SiLU * up and the residual add round as the eager ops do.

The short-conv block's in_proj has a kernel of its own (`in_proj_gated_conv`): each program takes
the three weight rows [B | C | x] of its channels and finishes with the conv decode step, so the
block's in_proj and conv are one launch instead of two (10 fewer per LFM2 decode step).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from .conv import gated_fir3_step

PROLOGUE_NONE, PROLOGUE_RMS_NORM, PROLOGUE_SILU_GATE = 0, 1, 2


@triton.jit
def _input(a, b, PROLOGUE: tl.constexpr, dtype: tl.constexpr):
    """The GEMV's input slice from what was loaded: x (none), x and g (norm: x * g, rounded), gate
    and up (SiLU(gate) * up, rounded as the eager ops round)."""
    if PROLOGUE == 2:
        gate = a.to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype)
        return (silu.to(tl.float32) * b.to(tl.float32)).to(dtype).to(tl.float32)
    elif PROLOGUE == 1:
        return (a.to(tl.float32) * b.to(tl.float32)).to(dtype).to(tl.float32)
    else:
        return a.to(tl.float32)


@triton.jit
def _dot_rows(X, B, W, n, N, k_start, k_end, s_wn, PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """sum over k in [k_start, k_end) of W[n, k] * input[k] for the rows n (BLOCK_N,), in fp32, and
    the sum of squares of x over that range (the norm's statistic). B: the second input stream."""
    # Products accumulate per (row, k lane) and are summed over k once, after the loop.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    sumsq = tl.zeros([BLOCK_K], tl.float32)
    # Loads run one slice ahead of the math (no cp.async pipelining for a GEMV's loads): slice
    # i + 1 is in flight while slice i is multiplied.
    k = k_start + tl.arange(0, BLOCK_K)
    a = tl.load(X + k, mask=k < k_end, other=0.0)
    b = tl.load(B + k, mask=k < k_end, other=0.0) if PROLOGUE != 0 else a
    w = tl.load(W + n[:, None] * s_wn + k[None, :], mask=(n[:, None] < N) & (k[None, :] < k_end), other=0.0)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_next = k0 + BLOCK_K + tl.arange(0, BLOCK_K)
        more = k_next < k_end
        a_next = tl.load(X + k_next, mask=more, other=0.0)
        b_next = tl.load(B + k_next, mask=more, other=0.0) if PROLOGUE != 0 else a_next
        w_next = tl.load(W + n[:, None] * s_wn + k_next[None, :], mask=(n[:, None] < N) & more[None, :], other=0.0)
        if PROLOGUE == 1:  # (x * g) now, the row's 1/rms once all of x has been seen
            sumsq += a.to(tl.float32) * a.to(tl.float32)
        acc += w.to(tl.float32) * _input(a, b, PROLOGUE, dtype)[None, :]
        a, b, w = a_next, b_next, w_next
    return tl.sum(acc, 1), tl.sum(sumsq, 0)


@triton.jit
def _fused_gemv_kernel(X, W, Y, G, R, Partial, PartialSumsq, Arrivals, N, K, k_per_split, s_wn, eps,
                       PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = Y.dtype.element_ty
    # second input stream: up (SiLU), the norm weight (norm), none
    B = X + K if PROLOGUE == 2 else G
    k_start = split * k_per_split
    out, total_sumsq = _dot_rows(X, B, W, n, N, k_start, tl.minimum(K, k_start + k_per_split), s_wn,
                                 PROLOGUE, BLOCK_N, BLOCK_K, dtype)
    finish = True
    if SPLIT_K > 1:
        # Each split leaves its partial sums; the split that arrives last at this tile adds them
        # up and finishes, then re-arms the tile's counter (so a replayed graph finds it at zero).
        part = tile * SPLIT_K + split
        tl.store(Partial + part * BLOCK_N + tl.arange(0, BLOCK_N), out)
        tl.store(PartialSumsq + part, total_sumsq)
        finish = tl.atomic_add(Arrivals + tile, 1) == SPLIT_K - 1  # acq_rel: the others' stores are visible
        if finish:
            out = tl.zeros([BLOCK_N], tl.float32)
            total_sumsq = 0.0
            for s in range(SPLIT_K):
                out += tl.load(Partial + (tile * SPLIT_K + s) * BLOCK_N + tl.arange(0, BLOCK_N), cache_modifier=".cg")
                total_sumsq += tl.load(PartialSumsq + tile * SPLIT_K + s, cache_modifier=".cg")
            tl.atomic_xchg(Arrivals + tile, 0)
    if finish:
        if PROLOGUE == 1:
            out = out * tl.rsqrt(total_sumsq / K + eps)
        y = out.to(dtype)
        if RESIDUAL:
            y = (y.to(tl.float32) + tl.load(R + n, mask=n < N, other=0.0).to(tl.float32)).to(dtype)
        tl.store(Y + n, y, mask=n < N)


@triton.jit
def _in_proj_gated_conv_kernel(X, W, G, ConvW, State, Slot, Past, Y, D, K, s_wn, s_slot, s_tap, eps,
                               PROLOGUE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The short-conv block's batch-1 decode step up to out_proj: [B | C | x] = in_proj(norm(x)) for
    BLOCK_N channels (their three weight rows), then the conv decode kernel's step (conv.py)."""
    d = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dm = d < D
    dtype = Y.dtype.element_ty
    b, sumsq = _dot_rows(X, G, W, d, D, 0, K, s_wn, PROLOGUE, BLOCK_N, BLOCK_K, dtype)
    c, _ = _dot_rows(X, G, W + D * s_wn, d, D, 0, K, s_wn, PROLOGUE, BLOCK_N, BLOCK_K, dtype)
    x, _ = _dot_rows(X, G, W + 2 * D * s_wn, d, D, 0, K, s_wn, PROLOGUE, BLOCK_N, BLOCK_K, dtype)
    if PROLOGUE == 1:
        inv_rms = tl.rsqrt(sumsq / K + eps)
        b, c, x = b * inv_rms, c * inv_rms, x * inv_rms
    b, c, x = b.to(dtype).to(tl.float32), c.to(dtype).to(tl.float32), x.to(dtype).to(tl.float32)
    bx = (b * x).to(dtype)
    slot = tl.load(Slot).to(tl.int64)
    keep = (tl.load(Past) != 0).to(tl.float32)  # a fresh sequence (nothing cached) starts from zeros
    out = gated_fir3_step(bx, c.to(dtype), State + slot * s_slot, s_tap, ConvW, ConvW, d, dm, keep, False)
    tl.store(Y + d, out, mask=dm)


# Per GPU model, what bench/skinny_gemm.py --write-configs measured for each weight shape:
# {device name: {"N,K": {"config": {...}, "fused_us": t, "peer_us": t, "use": bool}}}, where the
# peer is cuBLAS plus the small kernels the fused one replaces.
TUNED_CONFIGS = Path(__file__).with_name("linear_configs.json")
_arrivals: dict[torch.device, torch.Tensor] = {}


@functools.cache
def tuned_shapes(device_name: str) -> dict[tuple[int, int], dict]:
    """{(N, K): entry} measured on this GPU model ({} if it was never tuned)."""
    if not TUNED_CONFIGS.exists():
        return {}
    problem = None
    try:
        table = {}
        for key, entry in json.loads(TUNED_CONFIGS.read_text()).get(device_name, {}).items():
            n, k = (int(v) for v in key.split(","))
            if not (isinstance(entry, dict) and isinstance(entry.get("use"), bool)
                    and isinstance(entry.get("config"), dict)):
                problem = f"entry {key!r} of {device_name!r} lacks 'use' / 'config'"
                break
            table[n, k] = entry
    except (ValueError, AttributeError) as e:  # bad JSON, a key that is not "N,K", a non-dict level
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ValueError(f"{TUNED_CONFIGS}: not a table of tuned configs ({problem}); "
                         "regenerate it with bench/skinny_gemm.py --write-configs")
    return table


def faster_shapes(device: torch.device) -> frozenset[tuple[int, int]]:
    """Weight shapes (N, K) for which the fused kernel measured faster than its peer on this GPU model
    (none on a GPU that has not been tuned: the engine then keeps cuBLAS)."""
    if device.type != "cuda":
        return frozenset()
    return frozenset(s for s, e in tuned_shapes(torch.cuda.get_device_name(device)).items() if e["use"])


def launch_config(N: int, K: int, device: torch.device) -> dict:
    """The tuned config of this weight shape on this GPU model, else a plain default."""
    if device.type == "cuda":
        entry = tuned_shapes(torch.cuda.get_device_name(device)).get((N, K))
        if entry is not None:
            return entry["config"]
    return dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=4)


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """Split-K tile counters, zero between launches (the last split re-arms its tile). One set per
    device serves every call: kernels of one stream do not overlap."""
    if device not in _arrivals:
        _arrivals[device] = torch.zeros(1 << 14, dtype=torch.int32, device=device)
    return _arrivals[device]


def fused_linear(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 silu_gate: bool = False, residual: torch.Tensor | None = None, config: dict | None = None
                 ) -> torch.Tensor:
    """residual + act(x) @ weight.T for one row x (1, K_in); act is rms_norm(x, norm_weight, eps)
    when `norm_weight` is given, SiLU(gate) * up of x = [gate | up] when `silu_gate`, else nothing.
    weight (N, K) row-major; residual (1, N). `config`: BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
    num_stages (default: launch_config)."""
    N, K = weight.shape
    if x.shape[0] != 1:
        raise ValueError(f"fused_linear takes one row, got {x.shape[0]}")
    if norm_weight is not None and silu_gate:
        raise ValueError("fused_linear: choose one prologue (norm_weight or silu_gate)")
    if x.shape[1] != (2 * K if silu_gate else K) or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"fused_linear: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != (1, N) or residual.stride(1) != 1):
        raise ValueError(f"fused_linear: residual {tuple(residual.shape)} does not fit output (1, {N})")
    y = x.new_empty((1, N))
    prologue = PROLOGUE_RMS_NORM if norm_weight is not None else PROLOGUE_SILU_GATE if silu_gate else PROLOGUE_NONE
    cfg = dict(config or launch_config(N, K, x.device))
    split_k, block_n, block_k = cfg.pop("SPLIT_K", 1), cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(N, block_n)
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    if split_k > 1:
        partial = torch.empty((tiles * split_k, block_n), dtype=torch.float32, device=x.device)
        partial_sumsq = torch.empty((tiles * split_k,), dtype=torch.float32, device=x.device)
        arrivals = _arrival_counters(x.device)
        assert tiles <= arrivals.numel()
    else:
        partial = partial_sumsq = arrivals = y  # unused
    _fused_gemv_kernel[(tiles, split_k)](
        x, weight, y, norm_weight if norm_weight is not None else x, residual if residual is not None else y,
        partial, partial_sumsq, arrivals, N, K, k_per_split, weight.stride(0), eps,
        PROLOGUE=prologue, RESIDUAL=residual is not None, SPLIT_K=split_k, **cfg)
    return y


def in_proj_gated_conv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                       conv_weight: torch.Tensor, pool: torch.Tensor, slot: torch.Tensor, past: torch.Tensor,
                       config: dict | None = None) -> torch.Tensor:
    """The short-conv block of one decode row before out_proj, in one kernel: [B | C | x] =
    in_proj(rms_norm(x)) (no norm without `norm_weight`), then C * conv(B * x) over the slot's
    state, which shifts by one in place. x (1, K); weight (3D, K); conv_weight (D, 1, 3) (L_cache 3,
    no bias); pool (slots, 2, D); slot, past (1,): the row's conv slot and cached tokens (0: a
    fresh sequence, zero state). `config`: as fused_linear's, run without split-K (default:
    launch_config of the in_proj shape). Returns (1, D)."""
    N, K = weight.shape
    D = N // 3
    if x.shape != (1, K) or x.stride(1) != 1 or weight.stride(1) != 1 or N != 3 * D:
        raise ValueError(f"in_proj_gated_conv: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if conv_weight.shape != (D, 1, 3) or not conv_weight.is_contiguous() or pool.shape[1:] != (2, D) \
            or pool.stride(2) != 1:
        raise ValueError(f"in_proj_gated_conv: conv weight {tuple(conv_weight.shape)} / state {tuple(pool.shape)} "
                         f"do not fit {D} channels of a 3-tap conv")
    y = x.new_empty((1, D))
    cfg = dict(config or launch_config(N, K, x.device))
    cfg.pop("SPLIT_K", None)
    _in_proj_gated_conv_kernel[(triton.cdiv(D, cfg["BLOCK_N"]),)](
        x, weight, norm_weight if norm_weight is not None else x, conv_weight, pool, slot, past, y, D, K,
        weight.stride(0), pool.stride(0), pool.stride(1), eps,
        PROLOGUE=PROLOGUE_RMS_NORM if norm_weight is not None else PROLOGUE_NONE, **cfg)
    return y
