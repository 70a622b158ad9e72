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


# ----------------------------------------------------------------------------- prefill
# Chunks of several tokens per sequence, packed back to back (PagedContext's layout): eagerly the
# gated conv is ~20 passes over the step's (N, D) activations (gates, a shifted copy, a mask and a
# state gather per tap, the state's new rows); here one pass computes the outputs and a second,
# one program per sequence, shifts the states once every output has read them.
@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every step's token count
def _gated_conv_prefill_kernel(BCX, W, Bias, S, Slots, Past, SeqOf, PosIn, O, N, D, s_bcx, s_slot, s_tap, s_o,
                               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm, dm = t < N, d < D
    m = tm[:, None] & dm[None, :]
    seq = tl.load(SeqOf + t, mask=tm, other=0)
    pos = tl.load(PosIn + t, mask=tm, other=0)  # each token's offset in its chunk
    state = S + tl.load(Slots + seq, mask=tm, other=0).to(tl.int64) * s_slot
    keep = (tl.load(Past + seq, mask=tm, other=0) != 0).to(tl.float32)  # a fresh sequence's state reads as zeros
    dtype = O.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for tap in tl.static_range(K):
        lag = K - 1 - tap  # this tap looks `lag` tokens back
        w = tl.load(W + d * K + tap, mask=dm, other=0.0).to(tl.float32)
        in_chunk = (pos >= lag)[:, None]
        row = BCX + (t - lag)[:, None] * s_bcx + d[None, :]
        b_gate = tl.load(row, mask=m & in_chunk, other=0.0)
        x = tl.load(row + 2 * D, mask=m & in_chunk, other=0.0)
        bx = (b_gate * x).to(dtype).to(tl.float32)  # the conv input B*x, rounded as eagerly
        # before the chunk: state row K-1 + pos - lag (the rows are oldest first)
        prev = tl.load(state[:, None] + (K - 1 + pos - lag)[:, None] * s_tap + d[None, :],
                       mask=m & (pos < lag)[:, None], other=0.0)
        acc += tl.where(in_chunk, bx, prev.to(tl.float32) * keep[:, None]) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c_gate = tl.load(BCX + t[:, None] * s_bcx + D + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(O + t[:, None] * s_o + d[None, :], (c_gate * acc.to(dtype).to(tl.float32)).to(dtype), mask=m)


@triton.jit
def _conv_state_shift_kernel(BCX, S, Slots, Past, Cu, D, s_bcx, s_slot, s_tap, K: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    start = tl.load(Cu + seq).to(tl.int64)
    n = tl.load(Cu + seq + 1).to(tl.int64) - start + 0 * d  # a vector: masks are vectors
    state = S + tl.load(Slots + seq).to(tl.int64) * s_slot
    keep = (tl.load(Past + seq) != 0).to(tl.float32)
    # New row j is input n - (K-1) + j of (old state ++ chunk): from the chunk, or old row n + j. Rows in
    # ascending order: row j reads old row n + j >= j before any row after j is written.
    for j in tl.static_range(K - 1):
        rel = n - (K - 1) + j
        row = BCX + (start + rel) * s_bcx
        b_gate = tl.load(row + d, mask=dm & (rel >= 0), other=0.0)
        x = tl.load(row + 2 * D + d, mask=dm & (rel >= 0), other=0.0)
        old = tl.load(state + (n + j) * s_tap + d, mask=dm & (rel < 0), other=0.0)
        value = tl.where(rel >= 0, (b_gate * x).to(S.dtype.element_ty).to(tl.float32), old.to(tl.float32) * keep)
        tl.store(state + j * s_tap + d, value.to(S.dtype.element_ty), mask=dm)


def gated_conv_prefill(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: torch.Tensor,
                       slots: torch.Tensor, past: torch.Tensor, seq_of_token: torch.Tensor,
                       pos_in_chunk: torch.Tensor) -> torch.Tensor:
    """C * conv(B * x) for packed chunks: bcx (N, 3D) in_proj outputs [B | C | x], token t of sequence
    seq_of_token[t] at offset pos_in_chunk[t] in its chunk; weight (D, 1, K); taps before a chunk read
    the sequence's state pool[slots[s]] (K-1, D), oldest first, zeros where past[s] == 0. The states are
    not changed: `shift_conv_states` does that, after anything else that reads them."""
    N, D3 = bcx.shape
    D, K = D3 // 3, weight.shape[-1]
    assert pool.shape[1:] == (K - 1, D) and bcx.stride(1) == 1 and pool.stride(2) == 1 and weight.is_contiguous()
    out = torch.empty((N, D), dtype=bcx.dtype, device=bcx.device)
    if N:
        BLOCK_T, BLOCK_D = 16, 256
        _gated_conv_prefill_kernel[(triton.cdiv(N, BLOCK_T), triton.cdiv(D, BLOCK_D))](
            bcx, weight, bias if bias is not None else bcx, pool, slots, past, seq_of_token, pos_in_chunk, out,
            N, D, bcx.stride(0), pool.stride(0), pool.stride(1), out.stride(0),
            K=K, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4,
        )
    return out


def shift_conv_states(bcx: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, past: torch.Tensor,
                      cu_seqlens: torch.Tensor) -> None:
    """Each sequence's state after its chunk, in place: the last K-1 conv inputs B*x of
    (state ++ chunk), the chunk of sequence s being bcx[cu_seqlens[s]:cu_seqlens[s+1]]."""
    S = slots.shape[0]
    D = bcx.shape[1] // 3
    K = pool.shape[1] + 1
    assert bcx.stride(1) == 1 and pool.stride(2) == 1
    if S:
        BLOCK_D = 512
        _conv_state_shift_kernel[(S, triton.cdiv(D, BLOCK_D))](
            bcx, pool, slots, past, cu_seqlens, D, bcx.stride(0), pool.stride(0), pool.stride(1),
            K=K, BLOCK_D=BLOCK_D, num_warps=4,
        )
