"""Check the engine's Triton kernels against the eager reference path on random inputs.

On a GPU:  PYTHONPATH=src python bench/check_kernels.py
On a CPU:  TRITON_INTERPRET=1 PYTHONPATH=src python bench/check_kernels.py --device cpu [--compile]
(triton's interpreter; fp32 and fp16 there; triton 3.5's interpreter fails on numpy >= 2.4, "only 0-dimensional
arrays can be converted": put a numpy < 2.4 first on PYTHONPATH). `--only NAME`: just the kernel checks named so;
`--engine-only`: just the engine checks (Triton path, prefill graphs, prefix cache, recovery from failed steps).
Exits non-zero on a mismatch. Every output is poisoned (NaN) before the kernel runs, so an
unwritten element fails the check.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from fastlfm.engine.context import paged_decode_attention_ref
from fastlfm.ops import causal_conv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_conv(device, dtype, B=5, D=1200, seed=0) -> float:
    from fastlfm.engine.kernels.conv import gated_conv_decode_step

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    bcx, weight, bias = rnd(B, 3 * D), rnd(D, 1, 3), rnd(D)
    slots_n = 9
    pool = rnd(slots_n, 2, D)
    slots = torch.tensor([3, 0, 7, 8, 5][:B], device=device)
    past = torch.tensor([7, 0, 1, 130, 0][:B], device=device)  # 0: a fresh sequence
    fresh = past == 0
    # reference: the model's eager math on the same state
    b, c, x = bcx.chunk(3, -1)
    state = pool[slots].clone()
    state[fresh] = 0
    ref_y, ref_state = causal_conv((b * x)[:, None], weight, bias, state.transpose(1, 2))
    ref = c * ref_y[:, 0]
    pool_k = pool.clone()
    out = gated_conv_decode_step(bcx, weight, bias, pool_k, slots, past)
    err = max(rel_err(out, ref), rel_err(pool_k[slots], ref_state.transpose(1, 2)))
    others = [i for i in range(slots_n) if i not in slots.tolist()]
    assert torch.equal(pool_k[others], pool[others]), "conv kernel wrote outside its slots"
    return err


def check_attention(device, dtype, Hq=8, Hkv=2, d=64, block=16, seed=0, splits=1) -> float:
    """`splits` > 1: the history split over programs and merged (more splits than blocks leaves some empty)."""
    from fastlfm.engine.kernels.paged_attention import paged_decode_attention

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lens = [1, 17, 16, 40, 3]  # history incl. the new token; 1 = empty history (graph padding row)
    B, nblocks = len(lens), 20
    k_cache, v_cache = rnd(nblocks, block, Hkv, d), rnd(nblocks, block, Hkv, d)
    perm = torch.randperm(nblocks - 1, generator=g).tolist()
    width = max(-(-n // block) for n in lens)
    tables, slot_map = [], []
    for i, n in enumerate(lens):
        need = -(-n // block)
        row = perm[:need]
        perm = perm[need:]
        tables.append(row + [nblocks - 1] * (width - need))
        slot_map.append(row[(n - 1) // block] * block + (n - 1) % block)
    tables = torch.tensor(tables, dtype=torch.int32, device=device)
    slot_map = torch.tensor(slot_map, device=device)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q, k_new = rnd(B, Hq, d), rnd(B, Hkv, d)
    v_all = rnd(B, Hkv + 3, d)  # a strided view, as the fused qkv split gives
    v_new = v_all[:, 1:Hkv + 1]
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kc_ref.view(-1, Hkv, d)[slot_map] = k_new
    vc_ref.view(-1, Hkv, d)[slot_map] = v_new
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, tables, context_lens)
    out = paged_decode_attention(q, k_new, v_new, k_cache, v_cache, tables, (context_lens - 1).long(), splits=splits)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "K/V cache write differs (not at slot_map)"
    return rel_err(out, ref)


# (past, len) of the chunk rows: fresh and continuing rows, past a multiple of 16 and of 64 or of
# neither, lengths not multiples of the 64-query tile, one-token rows, a row over three tiles
PREFILL_ROWS = ((0, 70), (37, 5), (64, 1), (100, 66), (0, 1), (5, 130))


def check_prefill_attention(device, dtype, Hq=8, Hkv=2, d=64, block=16, seed=0) -> float:
    """Packed chunk rows over their paged history against the eager reference: shuffled block ids,
    gaps of tokens in no row between the rows, and the cache poisoned (NaN) wherever the rows must
    not read (past each row's last position, and the padding entries of the block tables). Once with
    max_len = the longest row and once with max_len = N (extra tiles that exit)."""
    from fastlfm.engine.context import paged_prefill_attention_ref
    from fastlfm.engine.kernels.paged_attention import paged_prefill_attention

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    need = [-(-(p + n) // block) for p, n in PREFILL_ROWS]
    nblocks = sum(need) + 3
    poison = nblocks - 1  # the padding entries point here
    k_cache, v_cache = rnd(nblocks, block, Hkv, d), rnd(nblocks, block, Hkv, d)
    k_cache[poison] = v_cache[poison] = float("nan")
    perm = torch.randperm(nblocks - 1, generator=g).tolist()
    width = max(need) + 1
    tables, cu, gap = [], [0], 2
    for (p, n), nb in zip(PREFILL_ROWS, need):
        row, perm = perm[:nb], perm[nb:]
        tail = nb * block - (p + n)  # positions after the row's last one in its last block
        if tail:
            k_cache[row[-1], -tail:] = v_cache[row[-1], -tail:] = float("nan")
        tables.append(row + [poison] * (width - nb))
        cu.append(cu[-1] + n + gap)
    tables = torch.tensor(tables, dtype=torch.int32, device=device)
    N = cu[-1] + 1
    cu_seqlens = torch.tensor(cu, device=device)  # row s: cu[s] .. cu[s] + len - 1, then `gap` unused tokens
    past = torch.tensor([p for p, _ in PREFILL_ROWS], device=device)
    lens = torch.tensor([n for _, n in PREFILL_ROWS], device=device)
    q = rnd(N + 3, Hq + 1, d)[:N, 1:]  # a strided view, as the fused qkv split gives
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, tables, past, lens, cu_seqlens, max(lens.tolist()))
    owned = torch.cat([torch.arange(c, c + n) for c, (_, n) in zip(cu, PREFILL_ROWS)]).to(device)
    errs = []
    for max_len in (max(lens.tolist()), N):
        out = paged_prefill_attention(q, k_cache, v_cache, tables, past, lens, cu_seqlens, max_len)
        assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
        errs.append(rel_err(out[owned], ref[owned]))
    # rows 2.. only, into a given tensor (the engine's decode rows come first): rows 0-1 stay as they were
    out = torch.zeros_like(q)
    paged_prefill_attention(q, k_cache, v_cache, tables, past, lens, cu_seqlens, N, first_row=2, out=out)
    later = torch.cat([torch.arange(c, c + n) for c, (_, n) in list(zip(cu, PREFILL_ROWS))[2:]]).to(device)
    errs.append(rel_err(out[later], ref[later]))
    errs.append(float(out[:cu[2]].abs().max()) * float("inf") if out[:cu[2]].any() else 0.0)
    return max(errs)


# The default config, and split-K with a split that gets no K at all (300 = 128 + 128 + 44 + 0);
# calls follow each other with the same tile counters, so a counter left armed fails a later call.
SPLIT_K_CONFIGS = (None, dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=2),
                   dict(BLOCK_N=8, BLOCK_K=64, SPLIT_K=2, num_warps=1, num_stages=3))


def eager_linear(x, w, norm_weight=None, eps=1e-5, silu_gate=False, residual=None) -> torch.Tensor:
    """What the fused projection kernel replaces, with fused_linear's arguments: the model's default
    `linear` (RMSNorm / SiLU*mul, cuBLAS, + residual as eager ops)."""
    from fastlfm.models.lfm2 import PLAIN_OPS, RMSNorm

    norm = None
    if norm_weight is not None:
        norm = RMSNorm(norm_weight.shape[0], eps)
        norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)
    return PLAIN_OPS.linear(x, w, norm=norm, silu_gate=silu_gate, residual=residual)


def check_fused_linear(device, dtype, seed=0) -> float:
    """The batch-1 projection kernel with each prologue / epilogue, plain and split-K, against the
    eager ops it replaces (odd N and K, so the tile masks are exercised)."""
    from fastlfm.engine.kernels.linear import fused_linear

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    N, K, errs = 100, 300, []
    w, norm_w = rnd(N, K) / K**0.5, 1 + 0.1 * rnd(K)
    for _ in range(2):
        residual = rnd(1, N)
        for prologue, r, cfg in itertools.product(("none", "norm", "silu"), (None, residual), SPLIT_K_CONFIGS):
            x = 3 * rnd(1, 2 * K if prologue == "silu" else K)
            args = dict(norm_weight=norm_w if prologue == "norm" else None, eps=1e-5, silu_gate=prologue == "silu",
                        residual=r)
            errs.append(rel_err(fused_linear(x, w, **args, config=cfg), eager_linear(x, w, **args)))
    return max(errs)


def check_in_proj_gated_conv(device, dtype, D=100, K=300, seed=0) -> float:
    """The conv block's batch-1 step in one kernel (in_proj with the norm, then the gated conv and
    the state shift) against the eager ops: a continuing sequence and a fresh one (zero state)."""
    from fastlfm.engine.kernels.linear import in_proj_gated_conv
    from fastlfm.models.lfm2 import BatchContext, Lfm2Cache

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    w, norm_w, conv_w = rnd(3 * D, K) / K**0.5, 1 + 0.1 * rnd(K), rnd(D, 1, 3)
    slots_n, slot = 4, 2
    errs = []
    for past in (5, 0):
        x, pool = 3 * rnd(1, K), rnd(slots_n, 2, D)
        # reference: the model's own eager path (norm + in_proj, gates, conv over the slot's state)
        cache = Lfm2Cache(None)
        cache.conv_states[0] = (pool[slot] if past else torch.zeros_like(pool[slot])).t()[None].clone()
        ctx = BatchContext(torch.zeros(1, 1, dtype=torch.long, device=device), cache, None, 1)
        bcx = eager_linear(x, w, norm_weight=norm_w, eps=1e-5)
        ref = ctx.gated_short_conv(0, bcx[None], conv_w, None)[0]
        pool_k = pool.clone()
        out = in_proj_gated_conv(x, w, norm_w, 1e-5, conv_w, pool_k,
                                 torch.tensor([slot], device=device), torch.tensor([past], device=device))
        errs += [rel_err(out, ref), rel_err(pool_k[slot], cache.conv_states[0][0].t())]
        others = [i for i in range(slots_n) if i != slot]
        assert torch.equal(pool_k[others], pool[others]), "conv block kernel wrote outside its slot"
    return max(errs)


def check_qk_norm_rope(device, dtype, B=3, Hq=8, Hkv=2, d=64, seed=0) -> float:
    """QK-norm + RoPE in one launch against rms_norm + apply_rope, on strided views of a fused qkv row."""
    from fastlfm.engine.kernels.qk_norm_rope import qk_norm_rope
    from fastlfm.ops import apply_rope, rms_norm, rope_cos_sin

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    qkv = 3 * rnd(B, (Hq + 2 * Hkv) * d)
    q, k = qkv[:, :Hq * d].view(B, Hq, d), qkv[:, Hq * d:(Hq + Hkv) * d].view(B, Hkv, d)
    qw, kw = 1 + 0.2 * rnd(d), 1 + 0.2 * rnd(d)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=device).float() / d))
    cos, sin = rope_cos_sin(torch.tensor([[0, 7, 1000]], device=device)[:, :B], inv_freq, dtype)
    ref_q = apply_rope(rms_norm(q[None], qw, 1e-5), cos, sin)[0]
    ref_k = apply_rope(rms_norm(k[None], kw, 1e-5), cos, sin)[0]
    out_q, out_k = qk_norm_rope(q, k, qw, kw, 1e-5, cos[0], sin[0])
    return max(rel_err(out_q, ref_q), rel_err(out_k, ref_k))


def check_rms_norm_rows(device, dtype, N=300, D=2048, seed=0) -> float:
    """The prefill step's RMSNorm kernel against ops.rms_norm, on strided rows."""
    from fastlfm.engine.kernels.rowwise import rms_norm as rms_norm_rows
    from fastlfm.ops import rms_norm

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (3 * torch.randn(N, D + 64, generator=g)).to(device=device, dtype=dtype)[:, 32:32 + D]
    w = (1 + 0.2 * torch.randn(D, generator=g)).to(device=device, dtype=dtype)
    return rel_err(rms_norm_rows(x, w, 1e-5), rms_norm(x, w, 1e-5))


def check_silu_mul_rows(device, dtype, N=300, I=2816, seed=0) -> float:
    """The prefill step's SiLU(gate) * up kernel against the eager ops."""
    import torch.nn.functional as F

    from fastlfm.engine.kernels.rowwise import silu_mul

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (3 * torch.randn(N, 2 * I, generator=g)).to(device=device, dtype=dtype)
    return rel_err(silu_mul(x), F.silu(x[:, :I]) * x[:, I:])


def check_conv_prefill(device, dtype, D=1200, seed=0) -> float:
    """The prefill step's gated conv (packed chunks: decode rows, fresh and continuing chunks, chunks
    shorter than the state, an empty row) and the state shift, against the eager packed conv."""
    import torch.nn.functional as F

    from fastlfm.engine.kernels.conv import gated_conv_prefill, shift_conv_states
    from fastlfm.ops import packed_causal_conv

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lens, past, slots = [1, 70, 2, 0, 33, 1], [5, 0, 1, 0, 9, 0], [4, 0, 6, 2, 1, 5]
    N = sum(lens)
    bcx, weight, pool = rnd(N, 3 * D), rnd(D, 1, 3), rnd(8, 2, D)
    lens_t, past_t = torch.tensor(lens, device=device), torch.tensor(past, device=device)
    slots_t = torch.tensor(slots, device=device)
    cu = F.pad(lens_t.cumsum(0), (1, 0))
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    pos_in_chunk = torch.arange(N, device=device) - cu[seq_of_token]
    state = pool[slots_t].masked_fill(past_t[:, None, None] == 0, 0)
    b, c, x = bcx.chunk(3, -1)
    ref_y, ref_state = packed_causal_conv(b * x, weight, None, cu, pos_in_chunk, seq_of_token, state.transpose(1, 2))
    pool_k = pool.clone()
    out = gated_conv_prefill(bcx, weight, None, pool_k, slots_t, past_t, seq_of_token, pos_in_chunk)
    shift_conv_states(bcx, pool_k, slots_t, past_t, cu)
    others = [i for i in range(8) if i not in slots]
    assert torch.equal(pool_k[others], pool[others]), "conv prefill kernels wrote outside their slots"
    return max(rel_err(out, c * ref_y), rel_err(pool_k[slots_t], ref_state.transpose(1, 2)))


def moe_loop_reference(x, expert_ids, expert_weights, gate_up, down) -> torch.Tensor:
    """The MoE experts pair by pair (independent of the kernels' sort and block schedule), rounding
    where the model does: each projection, SiLU, * up, * weight. (T, k, D)."""
    I = down.shape[2]
    rows = []
    for t in range(x.shape[0]):
        per_slot = []
        for e, w in zip(expert_ids[t].tolist(), expert_weights[t]):
            h = gate_up[e] @ x[t]
            per_slot.append((down[e] @ (torch.nn.functional.silu(h[:I]) * h[I:])) * w)
        rows.append(torch.stack(per_slot))
    return torch.stack(rows)


def moe_cases(E, k, T, g):
    """Routings for T tokens: random (distinct experts per token), an expert that no token chooses,
    all tokens choosing the same expert (a run longer than a block)."""
    random_ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    scores = torch.rand(T, E, generator=g)
    scores[:, 5] = -1  # expert 5: never chosen
    unused = scores.topk(k, dim=-1).indices
    scores = torch.rand(T, E, generator=g)
    scores[:, 2] = 2  # expert 2: chosen by every token
    same = scores.topk(k, dim=-1).indices
    return {"random": random_ids, "unused expert": unused, "all on one expert": same}


def check_moe(device, dtype, seed=0, E=16, D=96, I=80) -> float:
    """The fused MoE kernels against a pair-by-pair loop, with each tile config of default_config: batch 1
    and a few tokens (narrow tiles), 6 and 10 rows per expert (BLOCK_M 16 / 32), enough for the prefill
    tiles (BLOCK_M 64), each with random routing, an unused expert and all tokens on one expert; then
    more pairs than the align kernel takes (torch's sort). D and I are not multiples of the tiles."""
    from fastlfm.engine.kernels import moe

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    gate_up, down = rnd(E, 2 * I, D) / D**0.5, rnd(E, D, I) / I**0.5
    moe.POISON_BUFFERS = True
    errs = []
    try:
        for T, k in ((1, 4), (7, 3), (24, 4), (40, 4), (300, 4), (moe.ALIGN_KERNEL_MAX_PAIRS // 4 + 5, 4)):
            x = 2 * rnd(T, D)
            cases = moe_cases(E, k, T, g)
            if T * k > moe.ALIGN_KERNEL_MAX_PAIRS:
                cases = {"random": cases["random"]}
            for name, ids in cases.items():
                ids = ids.to(device)
                weights = torch.rand(T, k, generator=g).to(device=device, dtype=dtype)
                out = moe.fused_moe(x, ids, weights, gate_up, down)
                ref = moe_loop_reference(x, ids, weights, gate_up, down)
                errs.append(rel_err(out, ref))
                # every pair's row on its own: a wrong or missing row cannot hide in the norm
                row_errs = ((out.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)).max()
                errs.append(float(row_errs) / 10)
    finally:
        moe.POISON_BUFFERS = False
    return max(errs)


def check_moe_router(device, dtype, seed=0) -> float:
    """The router's kernel against ops.moe_route (the model's path) at LFM2-MoE's shapes (D 2048; 32 experts
    top-4 with the expert bias, 64 experts; 1, 100 and the most tokens it takes): the weights' relative error, or inf if
    the chosen experts differ where the float64 scores leave no near-tie (< 1e-5) at the k-th place."""
    from fastlfm.engine.kernels import moe
    from fastlfm.ops import moe_route

    g = torch.Generator(device="cpu").manual_seed(seed)
    errs = []
    for E, k, T in ((32, 4, 1), (32, 4, 100), (64, 4, 100), (32, 4, moe.ROUTE_KERNEL_MAX_TOKENS)):
        x = torch.randn(T, 2048, generator=g).to(device=device, dtype=dtype)
        gate = (torch.randn(E, 2048, generator=g) / 2048**0.5).to(device=device, dtype=dtype)
        bias = (0.05 * torch.randn(E, generator=g)).to(device)
        ids, weights = moe.route_top_k(x, gate, bias, k, True, 1.0)
        want_ids, want = moe_route(x, gate, bias, k, True, 1.0)
        choice = torch.sigmoid(x.double() @ gate.double().t()) + bias.double()
        ranked = choice.sort(dim=-1, descending=True).values
        clear = (ranked[:, k - 1] - ranked[:, k]) > 1e-5
        # the same k experts (their order, by score, may differ where two of them nearly tie), same weights
        ids, order = ids.sort(dim=-1)
        want_ids, want_order = want_ids.sort(dim=-1)
        if not torch.equal(ids[clear], want_ids[clear]):
            return float("inf")
        errs.append(rel_err(weights.gather(1, order)[clear], want.gather(1, want_order)[clear]))
    return max(errs)


def check_moe_schedule(device) -> bool:
    """The worst-case grid holds every routing (blocks needed <= max_blocks, skewed and spread runs), and
    the align kernel's sort and block table equal torch's sort and table (E not a power of two too)."""
    from fastlfm.engine.kernels import moe
    from fastlfm.ops import sort_by_expert

    ok = True
    g = torch.Generator().manual_seed(0)
    for E, k, T, bm in ((32, 4, 1, 16), (32, 4, 5, 16), (64, 4, 100, 16), (8, 2, 300, 64), (64, 8, 33, 16),
                        (40, 4, 77, 16), (64, 4, 1024, 16)):
        for ids in moe_cases(E, k, T, g).values():
            ids = ids.to(device)
            order, ends = sort_by_expert(ids, E)
            counts = torch.diff(ends.long(), prepend=torch.zeros(1, dtype=torch.long, device=device))
            need = int(((counts + bm - 1) // bm).sum())
            expert, start = moe.block_schedule(ends, T * k, bm)
            ok &= need <= moe.max_blocks(T * k, E, bm) == expert.numel() and int((expert >= 0).sum()) == need
            got = moe.route_blocks(ids, E, bm)
            ok &= all(torch.equal(a.long(), b.long()) for a, b in zip(got, (order, ends, expert, start)))
    return ok


def tiny_engine_case(device, dtype=torch.float32, moe=False):
    """A tiny LFM2 (`moe`: LFM2-MoE, 32 experts, top-4), four prompts, and the eager model's greedy
    tokens for them (the reference)."""
    import tempfile

    from fastlfm.models import load_model
    from fastlfm.testing import tiny_config, tiny_moe_config, write_checkpoint

    config = tiny_moe_config(hidden_size=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64) \
        if moe else tiny_config("LFM2-350M", hidden=128, heads=4, kv_heads=2)
    folder = write_checkpoint(tempfile.mkdtemp(), config, tokenizer=False)
    model = load_model(folder, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 40, 1, 23)]
    refs = []
    with torch.no_grad():
        for p in prompts:
            cache, ids, out = model.make_cache(), torch.tensor([p], device=device), []
            for _ in range(NEW_TOKENS):
                t = int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
                out.append(t)
                ids = torch.tensor([[t]], device=device)
            refs.append(out)
    return model, prompts, refs


NEW_TOKENS = 12


def use_triton_path(runner, model) -> None:
    """The runner's Triton path (on CPU: the interpreter), with the fused projection kernel on
    every projection shape, tuned or not."""
    runner.use_triton = True
    runner.fused_linear_shapes = frozenset(tuple(p.shape) for p in model.parameters() if p.dim() == 2) | frozenset(
        tuple(w.shape) for m in model.modules() for w in (getattr(m, "qkv_weight", None), getattr(m, "w13_weight", None))
        if w is not None)
    if runner.graphs:  # captured with the defaults: capture again
        runner.capture_graphs(runner.graph_sizes[-1])


def run_engine(engine, prompts) -> list[list[int]]:
    from fastlfm.sampling import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    engine.check_no_leaks()
    return [o.token_ids for o in outs]


def check_engine(device, moe=False) -> bool:
    """The engine with its Triton path (fused kernels in decode and mixed steps, the fused
    projections on every shape, chunked prefill, async scheduling; `moe`: the grouped MoE kernels
    in every step) gives the eager model's greedy tokens (fp32: exactly)."""
    from fastlfm.engine import LLMEngine

    model, prompts, refs = tiny_engine_case(device, moe=moe)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                       num_kv_blocks=32, async_scheduling=True, enforce_eager=device == "cpu", compile=False, pack_cpu_weights=False)
    runner = engine.runner
    use_triton_path(runner, model)
    if not runner.prefill_sizes:  # CPU (no CUDA graphs): the decode and prefill graphs as eager replays
        runner.capture_graphs(4)
        runner.enable_prefill_graphs(16)
    prefill_graph_steps = []
    run_prefill = runner._run_prefill_graph
    runner._run_prefill_graph = lambda seqs, *a: (prefill_graph_steps.append(len(seqs)), run_prefill(seqs, *a))[1]
    # the batch, then one prompt alone (batch-1 decode steps: the fused projections; its prefill: a
    # prefill graph), which resumes from the prefix cache: 32 of its 40 tokens, the conv state
    # restored from a snapshot
    same = run_engine(engine, prompts) == refs and run_engine(engine, prompts[1:2]) == refs[1:2]
    hits = engine.scheduler.num_prefix_hits
    print(f"{'MoE ' if moe else ''}engine: {hits} prompt tokens served from the prefix cache (32 expected), "
          f"{len(prefill_graph_steps)} prefill graph steps; greedy tokens {'equal' if same else 'DIFFER'}")
    return same and hits == 32 and bool(prefill_graph_steps)


def check_engine_failures(device) -> bool:
    """Issue 14's recovery on the engine's fastest path (Triton kernels, decode and prefill graphs,
    asynchronous scheduling; on the GPU also the torch.compile'd decode step): an exception inside a
    step (in the forward, or while reading a step's tokens back, with the next step in flight)
    aborts that step's requests and frees their blocks and slots, and the next call gives the eager
    model's greedy tokens. On CPU the graphs are eager replays."""
    from fastlfm.engine import LLMEngine

    model, prompts, refs = tiny_engine_case(device)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                       num_kv_blocks=32, async_scheduling=True, pack_cpu_weights=False,
                       enforce_eager=device == "cpu", compile=None if device == "cuda" else False)
    runner = engine.runner
    use_triton_path(runner, model)
    if not runner.prefill_sizes:
        runner.capture_graphs(4)
        runner.enable_prefill_graphs(16)
    ok = run_engine(engine, prompts) == refs
    errors = (KeyboardInterrupt(), torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"))
    for (owner, name), error in itertools.product(((runner, "execute"), (engine, "_process")), errors):
        original, calls = getattr(owner, name), [0]

        def failing(*args, original=original, calls=calls, error=error, **kwargs):
            calls[0] += 1
            if calls[0] == 4:  # mid-run: prompts prefilled, decodes in flight
                raise error
            return original(*args, **kwargs)

        setattr(owner, name, failing)
        try:
            run_engine(engine, prompts)
            raised = False
        except type(error):
            raised = True
        finally:
            setattr(owner, name, original)
        clean = not engine.requests and not engine.has_unfinished()
        engine.check_no_leaks()
        same = run_engine(engine, prompts) == refs
        print(f"engine failure in {name} ({type(error).__name__}): raised {raised}, its requests aborted and freed "
              f"{clean}, next call's tokens {'equal' if same else 'DIFFER'}")
        ok &= raised and clean and same
    return ok


def check_compiled_decode(device, moe=False) -> bool:
    """torch.compile traces a whole decode step as one graph (the kernels are custom ops, so
    there is no break at the mixing calls), and the compiled step, replayed on the graph
    path's static buffers, gives the eager model's greedy tokens."""
    import torch._dynamo as dynamo

    from fastlfm.engine import LLMEngine
    from fastlfm.engine.kernels import ops  # noqa: F401 (registers the custom ops)

    from fastlfm.engine.context import keep_eager_paths_out_of_compile

    keep_eager_paths_out_of_compile()  # as the model runner does when it compiles
    dynamo.reset()
    model, prompts, refs = tiny_engine_case(device, moe=moe)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                       num_kv_blocks=32, async_scheduling=True, enforce_eager=True, pack_cpu_weights=False)
    runner = engine.runner
    use_triton_path(runner, model)
    B = 4
    step_inputs = (torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device),
                   torch.ones(B, dtype=torch.long, device=device),
                   torch.full((B, runner.max_blocks_per_seq), runner.padding_block, dtype=torch.int32, device=device),
                   torch.full((B,), runner.padding_slot, dtype=torch.long, device=device))
    with torch.inference_mode():
        explained = dynamo.explain(runner._decode_forward)(*step_inputs)
    print(f"{'MoE ' if moe else ''}decode step under torch.compile: {explained.graph_count} graph(s), "
          f"{explained.graph_break_count} "
          f"break(s) {[str(b.reason)[:120] for b in explained.break_reasons][:3]}")
    dynamo.reset()
    runner.decode_forward = torch.compile(runner._decode_forward, dynamic=True)
    runner.capture_graphs(B)  # CUDA graphs on a GPU; eager replays of the same buffers on CPU
    same = run_engine(engine, prompts) == refs and run_engine(engine, prompts[1:2]) == refs[1:2]
    print(f"{'MoE ' if moe else ''}compiled decode graphs: greedy tokens {'equal' if same else 'DIFFER from'} "
          "the eager model's")
    return same and explained.graph_count == 1 and explained.graph_break_count == 0


def time_attention_splits(Hq=32, Hkv=8, d=64, block=64, history=384) -> None:
    """Batch-1 paged decode (LFM2-1.2B heads), one program per KV head vs the split history."""
    import triton.testing

    from fastlfm.engine.kernels.paged_attention import num_history_splits, paged_decode_attention

    dev, dt = "cuda", torch.bfloat16
    for B in (1, 8, 100):
        nb = -(-(history + 1) // block)
        k_cache = torch.randn(B * nb + 1, block, Hkv, d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(B * nb, device=dev, dtype=torch.int32).view(B, nb)
        past = torch.full((B,), history, device=dev, dtype=torch.long)
        q, kn, vn = (torch.randn(B, h, d, device=dev, dtype=dt) for h in (Hq, Hkv, Hkv))
        auto = num_history_splits(B, Hkv, q.device)
        us = [1e3 * triton.testing.do_bench_cudagraph(lambda n=n: paged_decode_attention(q, kn, vn, k_cache, v_cache, tables,
                                                                               past, splits=n))
              for n in (1, auto)]
        print(f"paged attention, batch {B}, history {history}: {us[0]:.1f} us in 1 split, {us[1]:.1f} us in {auto}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also check the torch.compile'd decode step "
                    "(one graph, tokens equal; minutes on CPU)")
    ap.add_argument("--only", metavar="NAME", help="run only the kernel checks whose name contains NAME "
                    "(skips the routing, engine and compile checks)")
    ap.add_argument("--engine-only", action="store_true", help="only the engine checks (Triton path, prefill "
                    "graphs, prefix cache; dense and MoE)")
    args = ap.parse_args()
    # triton's interpreter computes garbage for bf16 (even x * y), so on CPU fp16 stands in
    # for the half-precision rounding paths.
    dtypes = [torch.float32, torch.float16] if args.device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    ok = True
    for dtype in dtypes if not args.engine_only else []:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        checks = [("gated conv decode", check_conv), ("paged attention decode", check_attention),
                  ("fused decode linear", check_fused_linear), ("in_proj + gated conv", check_in_proj_gated_conv),
                  ("qk-norm + rope", check_qk_norm_rope), ("moe experts (grouped)", check_moe),
                  ("moe router", check_moe_router),
                  ("rows: rms norm", check_rms_norm_rows), ("rows: silu * up", check_silu_mul_rows),
                  ("rows: gated conv prefill", check_conv_prefill)]
        checks += [(f"  history in {n} splits", lambda *a, n=n, **k: check_attention(*a, splits=n, **k)) for n in (2, 8)]
        # GQA groups 1, 2, 4; cache blocks of 16 and 64; head dims 64 and 128
        checks += [(f"paged prefill {hq}/{hkv}/{d}/{bs}",
                    lambda *a, hq=hq, hkv=hkv, d=d, bs=bs, **k: check_prefill_attention(*a, Hq=hq, Hkv=hkv, d=d,
                                                                                         block=bs, **k))
                   for hq, hkv, d, bs in ((4, 4, 64, 16), (4, 2, 64, 64), (8, 2, 128, 16), (8, 2, 64, 64))]
        if args.only:
            checks = [c for c in checks if args.only in c[0]]
            ok &= bool(checks)  # a NAME that selects nothing is a failure, not a pass
        for name, fn in checks:
            errs = [fn(args.device, dtype, seed=s) for s in range(3)]
            good = all(e == e and e <= tol for e in errs)  # e == e: NaN fails
            ok &= good
            print(f"{name:24s} {str(dtype):15s} max rel err {max(errs):.2e} (tol {tol:.0e}) {'ok' if good else 'FAIL'}")
    if args.only:
        return 0 if ok else 1
    if not args.engine_only:
        schedule_ok = check_moe_schedule(args.device)
        ok &= schedule_ok
        print(f"moe routing: worst-case grid holds every routing, align kernel = torch sort + table: "
              f"{'ok' if schedule_ok else 'FAIL'}")
        if args.device == "cuda":
            time_attention_splits()
    for moe in (False, True):
        same = check_engine(args.device, moe=moe)
        ok &= same
        print(f"{'LFM2-MoE ' if moe else ''}engine (Triton path, fp32) greedy tokens "
              f"{'equal' if same else 'DIFFER from'} the eager model's")
    recovered = check_engine_failures(args.device)
    ok &= recovered
    print(f"engine after failed steps (Triton path, graphs, async): {'ok' if recovered else 'FAIL'}")
    if args.compile:
        for moe in (False, True):
            ok &= check_compiled_decode(args.device, moe=moe)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
