"""Paged-attention decode: one query token per sequence over its KV blocks.

One program per (sequence, KV head) handles the whole GQA group of query heads, so each
K/V block is read from memory once per group; online softmax in fp32. The same program
first stores the new token's K/V at its slot, and takes the new token's own score from
registers (the history loop stops before it), so there is no read-after-write between
threads and no separate cache-write kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(Q, Kn, Vn, Kc, Vc, BT, CL, SM, O, scale,
                         s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh, s_kb, s_kt, s_kh, s_bt, s_ob, s_oh, block_size,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                         PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.load(CL + b) - 1  # history before the new token
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK)
    heads = kvh * GROUP + g
    hmask = g < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=hmask[:, None], other=0.0)
    k_new = tl.load(Kn + b * s_knb + kvh * s_knh + d)
    v_new = tl.load(Vn + b * s_vnb + kvh * s_vnh + d)
    slot = tl.load(SM + b)
    dst = (slot // block_size) * s_kb + (slot % block_size) * s_kt + kvh * s_kh
    tl.store(Kc + dst + d, k_new)
    tl.store(Vc + dst + d, v_new)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for i in range(0, tl.cdiv(L, BLOCK)):
        blk = tl.load(BT + b * s_bt + i).to(tl.int64)
        base = blk * s_kb + kvh * s_kh
        k = tl.load(Kc + base + t[:, None] * s_kt + d[None, :])
        v = tl.load(Vc + base + t[:, None] * s_kt + d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where((i * BLOCK + t)[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # the new token
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
    m_new = tl.maximum(m, s_new)
    alpha = tl.exp(m - m_new)
    p_new = tl.exp(s_new - m_new)
    l = l * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    out = acc / l[:, None]
    tl.store(O + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(O.dtype.element_ty), mask=hmask[:, None])


def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           slot_mapping: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, d); k_new/v_new: (B, Hkv, d) written at slot_mapping (B,) into the caches
    (num_blocks, block_size, Hkv, d); context_lens (B,) counts the new token. Returns (B, Hq, d)."""
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and k_new.stride(2) == 1 and v_new.stride(2) == 1
    group = Hq // Hkv
    out = torch.empty_like(q)
    _paged_decode_kernel[(B, Hkv)](
        q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, slot_mapping, out, D ** -0.5,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), block_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no tf32 rounding
        num_warps=4,
    )
    return out
