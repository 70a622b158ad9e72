"""Paged-attention decode: one query token per sequence over its KV blocks.

One program per (sequence, KV head) handles the whole GQA group of query heads, so each
K/V block is read from memory once per group; online softmax in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(Q, Kc, Vc, BT, CL, O, scale,
                         s_qb, s_qh, s_kb, s_kt, s_kh, s_bt, s_ob, s_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.load(CL + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK)
    heads = kvh * GROUP + g
    hmask = g < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=hmask[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for i in range(0, tl.cdiv(L, BLOCK)):
        blk = tl.load(BT + b * s_bt + i).to(tl.int64)
        base = blk * s_kb + kvh * s_kh
        k = tl.load(Kc + base + t[:, None] * s_kt + d[None, :])
        v = tl.load(Vc + base + t[:, None] * s_kt + d[None, :])
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((i * BLOCK + t)[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(O + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(O.dtype.element_ty), mask=hmask[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, d); caches (num_blocks, block_size, Hkv, d); returns (B, Hq, d)."""
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    _paged_decode_kernel[(B, Hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out, D ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, BLOCK=block_size,
        num_warps=4,
    )
    return out
