"""RMSNorm and SwiGLU's SiLU(gate) * up over the rows of a prefill step, one kernel each.

Eagerly each is several passes over the step's activations (the norm: upcast, square, mean, rsqrt,
scale, cast, weight: ~6 kernels over (N, D) in fp32), which in a 16k-token prefill step of LFM2-1.2B
cost about as much GPU time as half of its GEMMs. Decode steps do not need these: torch.compile fuses
the same chains there. Rounding follows ops.rms_norm and F.silu(gate) * up step by step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows_per_program(width: int) -> int:
    """Rows a program takes: ~4k elements per program (a 16k-token step: thousands of programs)."""
    return max(1, 4096 // triton.next_power_of_2(width))


# do_not_specialize: one compiled kernel for every step's token count (no JIT compile mid-serving)
@triton.jit(do_not_specialize=["N"])
def _rms_norm_kernel(X, W, Y, N, D, s_x, s_y, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    m = (r < N)[:, None] & (d < D)[None, :]
    x = tl.load(X + r[:, None] * s_x + d[None, :], mask=m, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    normed = (x * inv_rms[:, None]).to(X.dtype.element_ty)  # cast back to x's dtype, then * weight (ops.rms_norm)
    w = tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)
    tl.store(Y + r[:, None] * s_y + d[None, :], (w[None, :] * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ops.rms_norm over the last axis of x (..., D) (rows may be strided, the last axis contiguous);
    the result has torch's promoted dtype of weight and x, like `weight * normed`."""
    D = x.shape[-1]
    assert weight.shape == (D,) and weight.is_contiguous() and x.stride(-1) == 1
    rows = x.reshape(-1, D)  # a view wherever the rows are evenly strided
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    N, per = rows.shape[0], _rows_per_program(D)
    if N:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(triton.cdiv(N, per),)](rows, weight, out, N, D, rows.stride(0), out.stride(0), eps,
                                                 ROWS=per, BLOCK_D=block, num_warps=min(8, max(1, block // 256)))
    return out.view(*x.shape[:-1], D)


@triton.jit(do_not_specialize=["N"])
def _silu_mul_kernel(X, Y, N, I, s_x, s_y, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = (r < N)[:, None] & (i < I)[None, :]
    at = r[:, None] * s_x + i[None, :]
    gate = tl.load(X + at, mask=m, other=0.0).to(tl.float32)
    up = tl.load(X + at + I, mask=m, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty)  # F.silu rounds to the dtype, then * up
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + r[:, None] * s_y + i[None, :], out, mask=m)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of x = [gate | up] (..., 2I) -> (..., I)."""
    I = x.shape[-1] // 2
    assert x.shape[-1] == 2 * I and x.stride(-1) == 1
    rows = x.reshape(-1, 2 * I)
    out = torch.empty((rows.shape[0], I), dtype=x.dtype, device=x.device)
    N = rows.shape[0]
    if N:
        block = min(1024, triton.next_power_of_2(I))
        per = _rows_per_program(block)
        _silu_mul_kernel[(triton.cdiv(N, per), triton.cdiv(I, block))](
            rows, out, N, I, rows.stride(0), out.stride(0), ROWS=per, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], I)
