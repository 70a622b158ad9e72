"""Attention's per-head QK-norm and RoPE, q and k of a token in one program: the rows of a decode
step or of a prefill step.

Eagerly (and as inductor fuses it) this is a few kernels per attention layer, each a pass over q
and k; here one program per token normalises every head, rotates it and writes it out
contiguous. Rounding follows ops.rms_norm and ops.apply_rope step by step. The rotated half
is read from memory at the shifted offsets rather than permuted in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_heads(src, s_h, weight, cos, sin, dst, H, eps, HP: tl.constexpr, D: tl.constexpr):
    """Heads 0..H-1 of one token (s_h apart from src): rms_norm with `weight` (D,), then RoPE with
    this token's cos / sin (D,), written contiguous at dst."""
    h = tl.arange(0, HP)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D  # rotate_half: out[d] = -x[d + D/2] (first half), x[d - D/2] (second)
    hm = (h < H)[:, None]
    dtype = dst.dtype.element_ty
    x = tl.load(src + h[:, None] * s_h + d[None, :], mask=hm, other=0.0).to(tl.float32)
    x_partner = tl.load(src + h[:, None] * s_h + partner[None, :], mask=hm, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    w = tl.load(weight + d).to(tl.float32)[None, :]
    w_partner = tl.load(weight + partner).to(tl.float32)[None, :]
    normed = (w * (x * inv_rms).to(dtype).to(tl.float32)).to(dtype)
    normed_partner = (w_partner * (x_partner * inv_rms).to(dtype).to(tl.float32)).to(tl.float32)
    rotated = tl.where((d < D // 2)[None, :], -normed_partner, normed_partner).to(dtype)
    out = (normed.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32) \
        + (rotated.to(tl.float32) * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(dst + h[:, None] * D + d[None, :], out.to(dtype), mask=hm)


@triton.jit
def _qk_norm_rope_kernel(Q, K, QW, KW, Cos, Sin, QO, KO, Hq, Hkv, s_qb, s_qh, s_kb, s_kh, s_cb, eps,
                         HQP: tl.constexpr, HKP: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)
    cos = tl.load(Cos + b * s_cb + d).to(tl.float32)
    sin = tl.load(Sin + b * s_cb + d).to(tl.float32)
    _norm_rope_heads(Q + b * s_qb, s_qh, QW, cos, sin, QO + b * Hq * D, Hq, eps, HQP, D)
    _norm_rope_heads(K + b * s_kb, s_kh, KW, cos, sin, KO + b * Hkv * D, Hkv, eps, HKP, D)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, d), k (B, Hkv, d) (views of the fused qkv output are fine); norm weights (d,);
    cos/sin (B, d). Returns rope(rms_norm(q)), rope(rms_norm(k)), contiguous."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    if B:
        _qk_norm_rope_kernel[(B,)](q, k, q_weight, k_weight, cos, sin, q_out, k_out, Hq, Hkv, q.stride(0),
                                   q.stride(1), k.stride(0), k.stride(1), cos.stride(0), eps,
                                   HQP=triton.next_power_of_2(Hq), HKP=triton.next_power_of_2(Hkv), D=D,
                                   num_warps=4)
    return q_out, k_out
