"""MoE experts in Triton kernels that a CUDA graph can hold (fixed grid, routing read on the device).

The contract is ops.moe_swiglu_experts: for each token and each of its k chosen experts, weight *
down[e] (SiLU(g) * u), [g | u] = gate_up[e] x, as (T, k, D) rows (the caller sums over k, which
torch.compile fuses with the residual add). The (token, expert) pairs are sorted by expert, and each
expert's run of rows is cut into blocks of BLOCK_M rows. How many blocks an expert gets depends on
the routing, which a captured graph cannot know, so the grid is the worst case for T*k pairs
(`max_blocks`) and a table built on the device gives each block its expert and first row; blocks
past the last one exit at once. An expert that no token chose has no block and costs nothing.

  align kernel (decode-sized steps, <= ALIGN_KERNEL_MAX_PAIRS pairs): the sort by expert (a stable
    counting sort) and the block table in one single-program launch. A decode step runs this per
    MoE layer, where torch's sort + searchsorted + table arithmetic would be some 25 small kernels.
    Larger steps (prefill) sort with torch.
  gate_up kernel: one program per (block, BLOCK_N columns of I): the block's rows of x (gathered
    by token) times the expert's gate and up rows, both tiles in one K loop, then SiLU(g) * u
    into `inter`, still in expert order.
  down kernel: the block's rows of `inter` times the expert's down rows, times each pair's routing
    weight, written to the pair's row (token * k + slot).
Values round where the reference rounds (each GEMM's output, SiLU, * up, * weight), so only the
GEMMs' accumulation order differs. fp32 inputs use IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ...ops import moe_route, sort_by_expert


@triton.jit
def _block_rows(BlockExpert, BlockStart, Ends, Order, pid_m, BLOCK_M: tl.constexpr):
    """This block's expert (-1: a spare block of the worst-case grid), its rows in expert order, which
    of them exist, and their pair indices (token * k + slot)."""
    expert = tl.load(BlockExpert + pid_m)
    rows = tl.load(BlockStart + pid_m) + tl.arange(0, BLOCK_M)
    live = rows < tl.load(Ends + tl.maximum(expert, 0))
    pairs = tl.load(Order + rows, mask=live, other=0)
    return expert, rows, live, pairs


@triton.jit
def _gate_up_kernel(X, W, Inter, Order, BlockExpert, BlockStart, Ends, D, I, top_k, s_xt, s_we, s_wn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    expert, rows, live, pairs = _block_rows(BlockExpert, BlockStart, Ends, Order, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    dtype = Inter.dtype.element_ty
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    x_rows = X + (pairs // top_k).to(tl.int64)[:, None] * s_xt
    w_gate = W + expert.to(tl.int64) * s_we + n[None, :] * s_wn  # (k, n) tiles of gate_up[e] transposed
    w_up = w_gate + I * s_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        a = tl.load(x_rows + k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_gate + k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(w_up + k[:, None], mask=w_mask, other=0.0)
        if IEEE:
            gate = tl.dot(a, wg, gate, input_precision="ieee")
            up = tl.dot(a, wu, up, input_precision="ieee")
        else:
            gate = tl.dot(a, wg, gate)
            up = tl.dot(a, wu, up)
    g = gate.to(dtype).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    h = (silu * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(Inter + rows.to(tl.int64)[:, None] * I + n[None, :], h, mask=live[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(Inter, W, PairOut, RouteW, Order, BlockExpert, BlockStart, Ends, D, I, s_we, s_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    expert, rows, live, pairs = _block_rows(BlockExpert, BlockStart, Ends, Order, tl.program_id(0), BLOCK_M)
    if expert < 0:
        return
    dtype = PairOut.dtype.element_ty
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    a_rows = Inter + rows.to(tl.int64)[:, None] * I
    w_down = W + expert.to(tl.int64) * s_we + n[None, :] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < I
        a = tl.load(a_rows + k[None, :], mask=live[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_down + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    route_w = tl.load(RouteW + pairs, mask=live, other=0.0).to(tl.float32)
    y = (acc.to(dtype).to(tl.float32) * route_w[:, None]).to(dtype)
    tl.store(PairOut + pairs.to(tl.int64)[:, None] * D + n[None, :], y, mask=live[:, None] & n_ok[None, :])


@triton.jit
def _route_kernel(X, Wg, Bias, Ids, RouteW, D, E, s_xt, scale, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                  NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, EXPERTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One token: fp32 logits (products summed in fp32), sigmoid scores, top-k of score + bias (k rounds of
    the maximum, the lowest expert id among equals), their unbiased scores normalized and scaled.

    Measured on the H200 inside LFM2-8B-A1B's decode steps (where the experts' stream has pushed the
    router's weights out of L2): a K loop of 16 small tiles waited on each load in turn, 22 us a call;
    tl.dot's IEEE fp32 path (16 tokens a program) 65 us. So the weights come in a few wide tiles."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, EXPERTS)
    e_ok = e < E
    logits = tl.zeros([EXPERTS], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        x = tl.load(X + t * s_xt + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(Wg + e[:, None] * D + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        logits += tl.sum(w.to(tl.float32) * x[None, :], 1)
    scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(Bias + e, mask=e_ok, other=0.0).to(tl.float32)
    # NaN (a token whose hidden state overflowed) counts as -inf, and a round picks among the experts not yet
    # taken: every id is a real expert and a token's k ids differ, whatever the values (an id past the
    # experts would break the sort by expert for every token of the step).
    choice = tl.where(choice == choice, choice, float("-inf"))
    free = e_ok
    slot = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], tl.int32)
    weights = tl.zeros([K_PAD], tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(free, choice, float("-inf")), 0)
        pick = tl.min(tl.where(free & (choice == best), e, EXPERTS), 0)
        ids = tl.where(slot == j, pick, ids)
        weights = tl.where(slot == j, tl.sum(tl.where(e == pick, scores, 0.0), 0), weights)
        free = free & (e != pick)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, 0) + 1e-6)
    weights = weights * scale
    ok = slot < TOP_K
    tl.store(Ids + t * TOP_K + slot, ids.to(tl.int64), mask=ok)
    tl.store(RouteW + t * TOP_K + slot, weights.to(RouteW.dtype.element_ty), mask=ok)


# Tokens a step may route through the kernel; larger steps (prefill) use torch's GEMM and top-k, where
# one program per token re-reading the router's weights would cost more than the kernels it saves.
ROUTE_KERNEL_MAX_TOKENS = 1024


def route_top_k(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                normalize: bool, scale: float, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.moe_route in one kernel launch for decode-sized steps (in a decode step the router was some
    eight small kernels: casts, the fp32 GEMM, sigmoid and bias, top-k, gather, sum, divide, scale). Only
    the order in which the logits' products are summed differs from the reference. `config`: BLOCK_K and
    num_warps (bench/moe_router.py tries others)."""
    T, D = x.shape
    E = gate_weight.shape[0]
    if gate_weight.shape != (E, D) or not 1 <= top_k <= E:
        raise ValueError(f"route_top_k: x {tuple(x.shape)}, gate {tuple(gate_weight.shape)}, top_k {top_k}")
    if T > ROUTE_KERNEL_MAX_TOKENS:
        return moe_route(x, gate_weight, expert_bias, top_k, normalize, scale)
    x = x if x.stride(1) == 1 else x.contiguous()
    gate_weight = gate_weight.contiguous()
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    weights = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    if T == 0:
        return ids, weights
    experts = triton.next_power_of_2(E)
    # a few wide tiles (see the kernel): 32,768 products a tile, over 512 threads
    config = config or dict(BLOCK_K=min(triton.next_power_of_2(D), max(32, 32768 // experts)), num_warps=16)
    bias = expert_bias if expert_bias is not None else weights  # not read without HAS_BIAS
    _route_kernel[(T,)](x, gate_weight, bias, ids, weights, D, E, x.stride(0), float(scale), TOP_K=top_k,
                        K_PAD=triton.next_power_of_2(top_k), NORMALIZE=bool(normalize),
                        HAS_BIAS=expert_bias is not None, EXPERTS=experts, **config)
    return ids, weights


# Checks (bench/check_kernels.py) set this: scratch and output buffers start as NaN, so a row a kernel
# failed to write cannot pass by holding a previous call's values.
POISON_BUFFERS = False


# The pair and block counts change with every step's token count: not specialised (a JIT compile each).
@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
def _align_kernel(ExpertIds, Order, Ends, BlockExpert, BlockStart, num_pairs, num_experts, num_blocks,
                  BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    """One program: the pairs' stable order by expert, each expert's run end, and the block table."""
    e = tl.arange(0, EXPERTS)  # num_experts rounded up to a power of two
    counts = tl.zeros([EXPERTS], tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ExpertIds + p, mask=p < num_pairs, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    ends = tl.cumsum(counts, 0)
    tl.store(Ends + e, ends, mask=e < num_experts)
    # Each pair's place: its expert's start + pairs of that expert before it (earlier chunks: `seen`;
    # this chunk: an exclusive running count).
    seen = ends - counts
    for c0 in range(0, num_pairs, CHUNK):
        p = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ExpertIds + p, mask=p < num_pairs, other=-1)
        hit = (ids[:, None] == e[None, :]).to(tl.int32)
        place = tl.sum(hit * (seen[None, :] + tl.cumsum(hit, 0) - hit), 1)
        tl.store(Order + place, p, mask=p < num_pairs)
        seen += tl.sum(hit, 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    row_of_block0 = (ends - counts) - (block_end - blocks) * BLOCK_M  # first row of block b: this + b * BLOCK_M
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        owner = tl.sum((block_end[None, :] <= b[:, None]).to(tl.int32), 1)  # experts whose blocks end before b
        first = tl.sum(tl.where(e[None, :] == owner[:, None], row_of_block0[None, :], 0), 1) + b * BLOCK_M
        live = owner < num_experts
        tl.store(BlockExpert + b, tl.where(live, owner, -1), mask=b < num_blocks)
        tl.store(BlockStart + b, tl.where(live, first, 0), mask=b < num_blocks)


ALIGN_KERNEL_MAX_PAIRS = 4096  # decode steps up to 1024 sequences at top-4


def route_blocks(expert_ids: torch.Tensor, num_experts: int, block_m: int, config: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, ends, block_expert, block_start): the pairs of expert_ids (T, k) sorted by expert (pair
    indices), each expert's run end, and each block's expert (-1: spare) and first row. `config`: the
    align kernel's CHUNK and num_warps (bench/moe_router.py --align tries others)."""
    num_pairs = expert_ids.numel()
    if num_pairs > ALIGN_KERNEL_MAX_PAIRS:
        order, ends = sort_by_expert(expert_ids, num_experts)
        return (order, ends, *block_schedule(ends, num_pairs, block_m))
    dev = expert_ids.device
    blocks = max_blocks(num_pairs, num_experts, block_m)
    order = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=dev)
    block_start = torch.empty(blocks, dtype=torch.int32, device=dev)
    padded = triton.next_power_of_2(num_experts)
    config = config or dict(CHUNK=max(16, 4096 // padded), num_warps=4)
    _align_kernel[(1,)](expert_ids.reshape(-1), order, ends, block_expert, block_start, num_pairs, num_experts,
                        blocks, BLOCK_M=block_m, EXPERTS=padded, **config)
    return order, ends, block_expert, block_start


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of block_m rows that T*k = num_pairs pairs can need, whatever the routing: each expert with
    c rows takes ceil(c / block_m) <= c // block_m + 1 blocks, and every block holds at least one row."""
    return min(num_pairs, num_pairs // block_m + min(num_experts, num_pairs))


def block_schedule(ends: torch.Tensor, num_pairs: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block of the worst-case grid: its expert (-1 for a spare block) and its first row in
    expert order. Built from the experts' run ends (E,) with device ops only."""
    E = ends.numel()
    ends = ends.long()
    starts = F.pad(ends[:-1], (1, 0))
    blocks = (ends - starts + block_m - 1) // block_m  # per expert; 0 for an expert no token chose
    block_ends = blocks.cumsum(0)
    b = torch.arange(max_blocks(num_pairs, E, block_m), device=ends.device)
    expert = torch.searchsorted(block_ends, b, right=True)  # E past the last block
    e = expert.clamp(max=E - 1)
    first = starts[e] + (b - (block_ends[e] - blocks[e])) * block_m
    live = expert < E
    return torch.where(live, expert, -1).to(torch.int32), torch.where(live, first, 0).to(torch.int32)


def default_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes by the rows an expert gets on average. Decode steps stream each chosen expert's weights
    past a few rows: narrow N tiles (more programs), and BLOCK_M large enough that an expert's rows fit
    one block, so its weights are read once (LFM2-8B-A1B at batch 100: 12.5 rows per expert, 32-row
    blocks). Prefill steps are GEMMs: wider tiles, and 128-row blocks once experts get a few hundred rows.
    Measured by bench/moe_tiles.py (H200, LFM2-8B-A1B's experts): at 100 tokens the decode tiles are
    within 1% of the best of 70 tried (171 us a layer, ~4 TB/s); at 16,384 tokens the 128-row tiles
    below take 3.1 ms a layer against 3.8 for the 64-row ones."""
    rows = num_pairs / num_experts
    if rows <= 2:
        return dict(BLOCK_M=16, gate_up=dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
                    down=dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4))
    if rows <= 32:
        block_m = 16 if rows <= 8 else 32
        return dict(BLOCK_M=block_m, gate_up=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
                    down=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3))
    if rows < 256:
        return dict(BLOCK_M=64, gate_up=dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
                    down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))
    tiles = dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, gate_up=tiles, down=tiles)


def fused_moe(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, gate_up: torch.Tensor,
              down: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """ops.moe_swiglu_experts in Triton. x (T, D); expert_ids, expert_weights
    (T, k); gate_up (E, 2I, D), down (E, D, I), each expert's matrix row-major. `config`: BLOCK_M and
    per-kernel BLOCK_N, BLOCK_K, num_warps, num_stages (default: `default_config`). Returns (T, k, D):
    each pair's weighted expert output."""
    T, D = x.shape
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    k = expert_ids.shape[1]
    if gate_up.shape != (E, 2 * I, D) or down.shape != (E, D, I) or expert_weights.shape != expert_ids.shape:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, experts {tuple(expert_ids.shape)} / "
                         f"{tuple(expert_weights.shape)}, gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)} "
                         "do not fit together")
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("fused_moe: the expert weights need unit stride along their last dim")
    x = x if x.stride(1) == 1 else x.contiguous()
    num_pairs = T * k
    if num_pairs == 0:
        return x.new_zeros((T, k, D))
    cfg = config or default_config(num_pairs, E)
    block_m = cfg["BLOCK_M"]
    order, ends, block_expert, block_start = route_blocks(expert_ids, E, block_m)
    blocks = block_expert.numel()
    inter = x.new_empty((num_pairs, I))
    pair_out = x.new_empty((num_pairs, D))
    if POISON_BUFFERS:
        inter.fill_(float("nan")), pair_out.fill_(float("nan"))
    ieee = x.dtype == torch.float32
    gu, dn = cfg["gate_up"], cfg["down"]
    _gate_up_kernel[(blocks, triton.cdiv(I, gu["BLOCK_N"]))](
        x, gate_up, inter, order, block_expert, block_start, ends, D, I, k, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), BLOCK_M=block_m, IEEE=ieee, **gu)
    _down_kernel[(blocks, triton.cdiv(D, dn["BLOCK_N"]))](
        inter, down, pair_out, expert_weights.reshape(-1).to(x.dtype), order, block_expert, block_start, ends,
        D, I, down.stride(0), down.stride(1), BLOCK_M=block_m, IEEE=ieee, **dn)
    return pair_out.view(T, k, D)
