"""The short-conv decode step in one kernel: read the slot's last K-1 inputs, 3-tap FIR with
the new input, write the shifted state back. (The B*x gate and *C gate stay in the model.)"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv3_decode_kernel(X, W, Bias, S, Slots, Fresh, O, D, s_xb, s_slot, s_tap, s_ob,
                         HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    slot = tl.load(Slots + b).to(tl.int64)
    keep = 1.0 - tl.load(Fresh + b).to(tl.float32)  # a fresh sequence starts from zeros
    x = tl.load(X + b * s_xb + d, mask=dm, other=0.0)
    s0 = tl.load(S + slot * s_slot + d, mask=dm, other=0.0)
    s1 = tl.load(S + slot * s_slot + s_tap + d, mask=dm, other=0.0)
    w0 = tl.load(W + d * 3, mask=dm, other=0.0).to(tl.float32)
    w1 = tl.load(W + d * 3 + 1, mask=dm, other=0.0).to(tl.float32)
    w2 = tl.load(W + d * 3 + 2, mask=dm, other=0.0).to(tl.float32)
    acc = x.to(tl.float32) * w2 + (s1.to(tl.float32) * w1 + s0.to(tl.float32) * w0) * keep
    if HAS_BIAS:
        acc += tl.load(Bias + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(O + b * s_ob + d, acc.to(O.dtype.element_ty), mask=dm)
    tl.store(S + slot * s_slot + d, (s1.to(tl.float32) * keep).to(s1.dtype), mask=dm)
    tl.store(S + slot * s_slot + s_tap + d, x.to(s1.dtype), mask=dm)


def conv_decode_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: torch.Tensor,
                     slots: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """x: (B, D) new conv inputs; weight (D, 1, 3); pool (slots, 2, D) updated in place."""
    B, D = x.shape
    assert weight.shape[-1] == 3 and pool.shape[1] == 2, "the fused conv step is written for L_cache = 3"
    out = torch.empty_like(x)
    BLOCK_D = 1024
    _conv3_decode_kernel[(B, triton.cdiv(D, BLOCK_D))](
        x, weight, bias if bias is not None else x, pool, slots, fresh, out, D,
        x.stride(0), pool.stride(0), pool.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out
