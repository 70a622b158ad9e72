"""The short-conv block's decode step in one kernel: from the in_proj output [B | C | x] of
one new token per sequence, y = C * FIR3(state ++ B*x), and the slot's state shifts by one.
Rounding follows the eager path (B*x, the conv output and C*y each rounded to the dtype)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def gated_fir3_step(bx, c_gate, state, s_tap, W, Bias, d, dm, keep, HAS_BIAS: tl.constexpr):
    """For channels d: C * (3-tap FIR over the state ++ B*x) (+ bias), rounded as the eager path
    rounds (bx is B*x, already in the dtype); the state (two taps, s_tap apart) shifts by one in
    place. keep: 0.0 for a fresh sequence, whose state reads as zeros."""
    dtype = bx.dtype
    s0 = tl.load(state + d, mask=dm, other=0.0)
    s1 = tl.load(state + s_tap + d, mask=dm, other=0.0)
    w0 = tl.load(W + d * 3, mask=dm, other=0.0).to(tl.float32)
    w1 = tl.load(W + d * 3 + 1, mask=dm, other=0.0).to(tl.float32)
    w2 = tl.load(W + d * 3 + 2, mask=dm, other=0.0).to(tl.float32)
    acc = bx.to(tl.float32) * w2 + (s1.to(tl.float32) * w1 + s0.to(tl.float32) * w0) * keep
    if HAS_BIAS:
        acc += tl.load(Bias + d, mask=dm, other=0.0).to(tl.float32)
    y = acc.to(dtype)
    tl.store(state + d, (s1.to(tl.float32) * keep).to(s1.dtype), mask=dm)
    tl.store(state + s_tap + d, bx.to(s1.dtype), mask=dm)
    return (c_gate.to(tl.float32) * y.to(tl.float32)).to(dtype)


@triton.jit
def _gated_conv3_decode_kernel(BCX, W, Bias, S, Slots, Past, O, D, s_bcx, s_slot, s_tap, s_ob,
                               HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    slot = tl.load(Slots + b).to(tl.int64)
    keep = (tl.load(Past + b) != 0).to(tl.float32)  # a fresh sequence (nothing cached) starts from zeros
    row = BCX + b * s_bcx
    b_gate = tl.load(row + d, mask=dm, other=0.0)
    c_gate = tl.load(row + D + d, mask=dm, other=0.0)
    x = tl.load(row + 2 * D + d, mask=dm, other=0.0)
    bx = (b_gate * x).to(O.dtype.element_ty)
    out = gated_fir3_step(bx, c_gate, S + slot * s_slot, s_tap, W, Bias, d, dm, keep, HAS_BIAS)
    tl.store(O + b * s_ob + d, out, mask=dm)


def gated_conv_decode_step(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: torch.Tensor,
                           slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """bcx: (B, 3D) in_proj outputs; weight (D, 1, 3); pool (slots, 2, D) updated in place;
    slots (B,) int64; past (B,) tokens already cached (0: a fresh sequence, zero state; read in the
    kernel, so a compiled graph needs no mask kernel per layer). Returns C * conv(B * x), (B, D)."""
    B, D3 = bcx.shape
    D = D3 // 3
    assert weight.shape[-1] == 3 and pool.shape[1] == 2, "the fused conv step is written for L_cache = 3"
    assert bcx.stride(1) == 1 and pool.stride(2) == 1 and weight.is_contiguous()
    out = torch.empty((B, D), dtype=bcx.dtype, device=bcx.device)
    BLOCK_D = 512
    _gated_conv3_decode_kernel[(B, triton.cdiv(D, BLOCK_D))](
        bcx, weight, bias if bias is not None else bcx, pool, slots, past, out, D,
        bcx.stride(0), pool.stride(0), pool.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out
