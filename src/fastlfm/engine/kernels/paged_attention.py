"""Paged attention: decode (one query token per sequence over its KV blocks) and, at the end,
prefill / continuation chunks (paged_prefill_attention).

Decode: one program per (sequence, KV head) handles the whole GQA group of query heads, so each
K/V block is read from memory once per group; online softmax in fp32. The program with
split 0 first stores the new token's K/V at its place in the sequence's blocks (found from
the block table and the cached length, so the caller computes no slot mapping: inside a
compiled decode step that was one more small kernel per attention layer); the new token's own score is taken
from registers (the history loops stop before it), so there is no read-after-write between
threads and no separate cache-write kernel.

Small batches (B x KV heads well below the SM count, e.g. batch-1 decode) split each
history over several programs ("flash decoding"): each writes its partial softmax state
(max, sum, weighted values) and a second kernel merges them with the new token. The split
count depends only on the batch size, so a captured CUDA graph keeps it fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(m, l, acc, s, v, PRECISION: tl.constexpr, BASE2: tl.constexpr):
    """One key tile of an online softmax: running max m, sum l and weighted values acc of a block
    of queries, updated with the tile's scores s (base 2 if BASE2: scores scaled by log2(e))."""
    m_new = tl.maximum(m, tl.max(s, 1))
    if BASE2:
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
    else:
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _attend_history(q, Kc, Vc, BT, b, kvh, first, last, L, scale, s_kb, s_kt, s_kh, s_bt,
                    GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the group's queries over history blocks [first, last) (tokens < L)."""
    d = tl.arange(0, D)
    t = tl.arange(0, BLOCK)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for i in range(first, last):
        blk = tl.load(BT + b * s_bt + i).to(tl.int64)
        base = blk * s_kb + kvh * s_kh
        k = tl.load(Kc + base + t[:, None] * s_kt + d[None, :])
        v = tl.load(Vc + base + t[:, None] * s_kt + d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where((i * BLOCK + t)[None, :] < L, s, float("-inf"))
        m, l, acc = _online_softmax_step(m, l, acc, s, v, PRECISION, False)
    return m, l, acc


# Not specialised on the block table's width: eager steps pass tables as wide as their longest row,
# and every new specialisation is a JIT compile (a stall of ~0.3 s for every request) mid-serving.
@triton.jit(do_not_specialize=["s_bt"])
def _paged_decode_kernel(Q, Kn, Vn, Kc, Vc, BT, Past, O, PM, PL, PA, scale,
                         s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh, s_kb, s_kt, s_kh, s_bt, s_ob, s_oh, block_size,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                         SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(Past + b)  # history before the new token, which goes at position L
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    hmask = g < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=hmask[:, None], other=0.0)
    k_new = tl.load(Kn + b * s_knb + kvh * s_knh + d)
    v_new = tl.load(Vn + b * s_vnb + kvh * s_vnh + d)
    if split == 0:
        blk = tl.load(BT + b * s_bt + L // block_size).to(tl.int64)
        dst = blk * s_kb + (L % block_size) * s_kt + kvh * s_kh
        tl.store(Kc + dst + d, k_new)
        tl.store(Vc + dst + d, v_new)
    num_blocks = tl.cdiv(L, BLOCK)
    per_split = tl.cdiv(num_blocks, SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)
    m, l, acc = _attend_history(q, Kc, Vc, BT, b, kvh, first, last, L, scale, s_kb, s_kt, s_kh, s_bt,
                                GROUP_PAD, D, BLOCK, PRECISION)
    if SPLITS == 1:  # the whole history is here: add the new token and finish
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp(m - m_new)
        p_new = tl.exp(s_new - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        out = acc / l[:, None]
        tl.store(O + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(O.dtype.element_ty), mask=hmask[:, None])
    else:  # partial state of this split, merged by _merge_splits_kernel: [b, kvh, split, g(, d)]
        row = ((b * tl.num_programs(1) + kvh) * SPLITS + split) * GROUP_PAD + g
        tl.store(PM + row, m)
        tl.store(PL + row, l)
        tl.store(PA + row[:, None] * D + d[None, :], acc)


@triton.jit
def _merge_splits_kernel(Q, Kn, Vn, O, PM, PL, PA, scale, s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh, s_ob, s_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr):
    """One program per (sequence, query head): all splits' partials at once, plus the new token."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    g = h % GROUP
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLITS)
    q = tl.load(Q + b * s_qb + h * s_qh + d).to(tl.float32)
    k_new = tl.load(Kn + b * s_knb + kvh * s_knh + d).to(tl.float32)
    v_new = tl.load(Vn + b * s_vnb + kvh * s_vnh + d).to(tl.float32)
    s_new = tl.sum(q * k_new, 0) * scale
    rows = ((b * tl.num_programs(1) // GROUP + kvh) * SPLITS + sp) * GROUP_PAD + g  # (SPLITS,)
    pm = tl.load(PM + rows)
    pl = tl.load(PL + rows)
    pa = tl.load(PA + rows[:, None] * D + d[None, :])  # (SPLITS, D)
    m = tl.maximum(tl.max(pm, 0), s_new)  # finite: the new token is always there
    w = tl.exp(pm - m)  # empty splits: exp(-inf) = 0
    p_new = tl.exp(s_new - m)
    l = tl.sum(pl * w, 0) + p_new
    out = (tl.sum(pa * w[:, None], 0) + p_new * v_new) / l
    tl.store(O + b * s_ob + h * s_oh + d, out.to(O.dtype.element_ty))


DECODE_LAUNCH = dict(num_warps=4)


def num_history_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Programs per (sequence, KV head) history. Small batches: enough for about two programs per
    SM, at most 32. Larger ones: 1 or 2, whichever leaves the least idle in the last wave of
    programs (ties: 1), a wave being 5 programs per SM: fitted to bench/decode_attention.py on the
    H200 (132 SMs, 8 KV heads, 1k and 2k tokens of history), where it picks the faster count at
    batch 32 (2), 64 (1) and 100 (2: 62 / 110 us against 70 / 137) and one within 3% at 128 (1).
    Two splits at every batch size cost batch 64 a quarter more time."""
    # (CPU: triton's interpreter, where every program is slow: as if 16 SMs)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    programs = max(batch * kv_heads, 1)
    want = -(-2 * sms // programs)
    if want > 2:
        return min(32, triton.next_power_of_2(want) // 2)
    wave = 5 * sms
    return min((1, 2), key=lambda splits: -(-programs * splits // wave) / splits)


def paged_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor, past: torch.Tensor,
                           splits: int | None = None, launch: dict | None = None) -> torch.Tensor:
    """q: (B, Hq, d); k_new/v_new: (B, Hkv, d), written into the caches (num_blocks, block_size, Hkv,
    d) at position past[b] of each sequence's blocks (block_tables (B, W)); past (B,): the tokens
    cached before the new one, which attends to them and itself. Returns (B, Hq, d), contiguous.
    `splits`: programs per history (default: from the batch size); `launch`: the history kernel's
    num_warps / num_stages (bench/decode_attention.py tries them)."""
    B, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and k_new.stride(2) == 1 and v_new.stride(2) == 1
    group = Hq // Hkv
    group_pad = max(16, triton.next_power_of_2(group))
    splits = num_history_splits(B, Hkv, q.device) if splits is None else splits
    out = q.new_empty(q.shape)
    if splits > 1:
        part_m = torch.empty((B * Hkv * splits * group_pad,), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * Hkv * splits * group_pad, D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_new, v_new, k_cache, v_cache, block_tables, past, out, part_m, part_l, part_acc,
        D ** -0.5, q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), block_size,
        GROUP=group, GROUP_PAD=group_pad, D=D, BLOCK=block_size, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no tf32 rounding
        **(launch or DECODE_LAUNCH),
    )
    if splits > 1:
        _merge_splits_kernel[(B, Hq)](
            q, k_new, v_new, out, part_m, part_l, part_acc, D ** -0.5, q.stride(0), q.stride(1),
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), out.stride(0), out.stride(1),
            GROUP=group, GROUP_PAD=group_pad, D=D, SPLITS=splits, num_warps=2,
        )
    return out


# -- prefill / continuation chunks ---------------------------------------------------------
#
# Every chunk row of a step in one launch, FlashAttention-style: a program owns BLOCK_M queries of
# one row and one query head, and streams that row's keys from the paged cache in BLOCK_N tiles,
# each key's block found through the block table (a tile may span several cache blocks). The
# grid is fixed by Python ints (rows, an upper bound on the chunk length, heads), so no host
# reads the lengths and a captured CUDA graph can replay it; tiles past a row's end exit at once.


@triton.jit
def _prefill_tiles(q, qpos, acc, m, l, Kc, Vc, bt_row, kv_head, lo, hi, kv_len, qk_scale, s_kb, s_kt, s_kh,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Online softmax (base 2: qk_scale = d**-0.5 * log2(e)) over key positions [lo, hi).
    CAUSAL: tiles that reach the diagonal (or the row's end), masked per query; otherwise every
    key of the tile is visible to every query of the program."""
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + n
        inside = kpos < kv_len
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=inside, other=0).to(tl.int64)
        offs = blk[:, None] * s_kb + (kpos % BLOCK_SIZE)[:, None] * s_kt + kv_head * s_kh + d[None, :]
        k = tl.load(Kc + offs, mask=inside[:, None], other=0.0)
        v = tl.load(Vc + offs, mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if CAUSAL:
            s = tl.where((kpos[None, :] <= qpos[:, None]) & inside[None, :], s, float("-inf"))
        # key 0 lies in the first tile and is visible to every query, so m is finite from there on
        m, l, acc = _online_softmax_step(m, l, acc, s, v, PRECISION, True)
    return acc, m, l


# Not specialised on the first row or the block table's width: both change from step to step,
# and every specialisation is a JIT compile (seconds) in the middle of serving.
@triton.jit(do_not_specialize=["first_row", "s_bt"])
def _paged_prefill_kernel(Q, Kc, Vc, BT, Past, Lens, Cu, O, qk_scale, first_row,
                          s_qn, s_qh, s_kb, s_kt, s_kh, s_bt, s_on, s_oh,
                          GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    row = first_row + tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    head = tl.program_id(2)
    n_q = tl.load(Lens + row)
    if m_start >= n_q:  # the grid covers max_len, this row is shorter
        return
    past = tl.load(Past + row)
    first_token = tl.load(Cu + row)
    kv_len = past + n_q
    kv_head = head // GROUP
    i = m_start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    valid = i < n_q
    tok = (first_token + i).to(tl.int64)
    q = tl.load(Q + tok[:, None] * s_qn + head * s_qh + d[None, :], mask=valid[:, None], other=0.0)
    qpos = past + i
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    bt_row = BT + row * s_bt
    # keys before the tile's first query are visible to all its queries: no mask there
    full_end = (past + m_start) // BLOCK_N * BLOCK_N
    hi = tl.minimum(past + m_start + BLOCK_M, kv_len)  # one past the tile's last key
    acc, m, l = _prefill_tiles(q, qpos, acc, m, l, Kc, Vc, bt_row, kv_head, 0, full_end, kv_len, qk_scale,
                               s_kb, s_kt, s_kh, False, BLOCK_N, BLOCK_SIZE, D, PRECISION)
    acc, m, l = _prefill_tiles(q, qpos, acc, m, l, Kc, Vc, bt_row, kv_head, full_end, hi, kv_len, qk_scale,
                               s_kb, s_kt, s_kh, True, BLOCK_N, BLOCK_SIZE, D, PRECISION)
    out = acc / l[:, None]
    tl.store(O + tok[:, None] * s_on + head * s_oh + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None])


def prefill_kernel_supports(head_dim: int, block_size: int) -> bool:
    """Head dims and cache blocks the prefill kernel takes: powers of two (tl.arange), head dims
    16..256 (tl.dot needs 16)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and block_size & (block_size - 1) == 0


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, past: torch.Tensor, lens: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_len: int, first_row: int = 0,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (N, Hq, d) packed queries of S rows (row s owns q[cu_seqlens[s] : cu_seqlens[s] + lens[s]];
    its i-th query sits at position past[s] + i); k_cache / v_cache: (num_blocks, block_size, Hkv, d),
    already holding the K/V of positions 0 .. past[s] + lens[s] - 1 of every row in the blocks listed
    by block_tables[s] (S, W) int32; past, lens: (S,) int64 and cu_seqlens: (S+1,) int64, on the
    device. Causal: the query at position p attends to keys 0..p of its own row. max_len: an upper
    bound (Python int) on max(lens), used only for the grid (q.shape[0] always is one). Rows
    `first_row`.. only (the engine's decode rows come first and go elsewhere). Writes their tokens of
    `out` (default: a new tensor, contiguous, q's dtype) and returns it; other tokens are left as they are."""
    N, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    S = block_tables.shape[0]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    assert Hq % Hkv == 0 and prefill_kernel_supports(D, block_size), (Hq, Hkv, D, block_size)
    out = q.new_empty(q.shape) if out is None else out
    assert out.shape == q.shape and out.stride(2) == 1
    BLOCK_M, BLOCK_N = 64, 64
    if S <= first_row or max_len <= 0:
        return out
    grid = (S - first_row, triton.cdiv(max_len, BLOCK_M), Hq)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, past, lens, cu_seqlens, out,
        D ** -0.5 * 1.4426950408889634,  # log2(e): the softmax runs on exp2
        first_row, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_SIZE=block_size,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 caches: no tf32 rounding
        num_warps=4 if D <= 64 else 8, num_stages=2,
    )
    return out
