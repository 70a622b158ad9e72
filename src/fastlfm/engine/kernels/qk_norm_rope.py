"""Attention's per-head QK-norm and RoPE for a decode step, q and k in one launch.

Eagerly (and as inductor fuses it) this is a few kernels per attention layer, each over a few
KB; here one program per (row, head) normalises the head, rotates it and writes it out
contiguous. Rounding follows ops.rms_norm and ops.apply_rope step by step. The rotated half
is read from memory at the shifted offsets rather than permuted in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(Q, K, QW, KW, Cos, Sin, QO, KO, Hq, s_qb, s_qh, s_kb, s_kh, s_cb, eps,
                         D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D  # rotate_half: out[d] = -x[d + D/2] (first half), x[d - D/2] (second)
    if h < Hq:
        src = Q + b * s_qb + h * s_qh
        weight = QW
        dst = QO + (b * Hq + h) * D
    else:
        src = K + b * s_kb + (h - Hq) * s_kh
        weight = KW
        dst = KO + (b * (tl.num_programs(1) - Hq) + h - Hq) * D
    dtype = QO.dtype.element_ty
    x = tl.load(src + d).to(tl.float32)
    x_partner = tl.load(src + partner).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    normed = (tl.load(weight + d).to(tl.float32) * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    normed_partner = (tl.load(weight + partner).to(tl.float32)
                      * (x_partner * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    rotated = tl.where(d < D // 2, -normed_partner.to(tl.float32), normed_partner.to(tl.float32))
    cos = tl.load(Cos + b * s_cb + d).to(tl.float32)
    sin = tl.load(Sin + b * s_cb + d).to(tl.float32)
    out = (normed.to(tl.float32) * cos).to(dtype).to(tl.float32) + (rotated * sin).to(dtype).to(tl.float32)
    tl.store(dst + d, out.to(dtype))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, d), k (B, Hkv, d) (views of the fused qkv output are fine); norm weights (d,);
    cos/sin (B, d). Returns rope(rms_norm(q)), rope(rms_norm(k)), contiguous."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    _qk_norm_rope_kernel[(B, Hq + Hkv)](q, k, q_weight, k_weight, cos, sin, q_out, k_out, Hq, q.stride(0),
                                        q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps, D=D, num_warps=1)
    return q_out, k_out
