"""PagedContext: the engine's forward context over a paged KV cache and conv-state slots.

One forward runs S sequences packed into a single row of N tokens (no padding inside or between chunks): each
sequence contributes a chunk of `lens[i]` tokens that continues from `past[i]` tokens
already in the cache. Rows of one token (decodes) come first; on CUDA they use the
Triton paged-decode kernel and the other rows the paged-prefill kernel (the eager reference
on CPU). A step that prefills may end in padding rows (prefill graphs). The layout of every
tensor is fixed by the model runner; this class only mixes tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import cpu_gemv
from ..cpu_linear import CpuLinear
from ..models.lfm2 import MixingContext, RMSNorm, can_fuse
from ..ops import packed_causal_conv


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """One query token per sequence over its paged history (eager reference).

    q: (B, Hq, d); caches: (num_blocks, block_size, Hkv, d); block_tables: (B, max_blocks);
    context_lens: (B,) tokens of history including the new one (already written).
    """
    B = q.shape[0]
    k = k_cache[block_tables.long()].flatten(1, 2)  # (B, L, Hkv, d)
    v = v_cache[block_tables.long()].flatten(1, 2)
    visible = torch.arange(k.shape[1], device=q.device)[None] < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible[:, None, None], enable_gqa=True
    )
    return out.view(B, q.shape[1], q.shape[2])


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, past: torch.Tensor, lens: torch.Tensor,
                                cu_seqlens: torch.Tensor, max_len: int | None = None, first_row: int = 0,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunks of queries over their rows' paged history (eager reference of
    kernels.paged_attention.paged_prefill_attention; reads the lengths on the host).

    q: (N, Hq, d), row s owning q[cu_seqlens[s]:][:lens[s]] at positions past[s] + i; the caches already
    hold every row's keys 0 .. past[s] + lens[s] - 1. Causal: position p sees keys 0..p. Rows
    `first_row`.. only, written into `out` (default: a new tensor). `max_len` is the Triton kernel's
    grid bound, unused here."""
    out = torch.empty_like(q) if out is None else out
    block_size = k_cache.shape[1]
    for s, (start, n, p) in enumerate(zip(cu_seqlens.tolist(), lens.tolist(), past.tolist())):
        if n == 0 or s < first_row:
            continue
        blocks = block_tables[s, :-(-(p + n) // block_size)].long()
        # 4-D (1, H, T, d) inputs: with 3-D ones SDPA silently takes its fp32 math path.
        k = k_cache[blocks].flatten(0, 1)[:p + n].transpose(0, 1)[None]
        v = v_cache[blocks].flatten(0, 1)[:p + n].transpose(0, 1)[None]
        qs = q[start:start + n].transpose(0, 1)[None]
        if p == 0:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, enable_gqa=True)
        else:  # queries sit at the end of the key range (bottom-right causal)
            mask = torch.arange(p + n, device=q.device)[None] <= torch.arange(p, p + n, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
    return out


def _plain_weight(proj: torch.nn.Module | torch.Tensor) -> torch.Tensor | None:
    """The weight of a bare weight or a plain bias-free nn.Linear, which a kernel may multiply by
    itself; None for a module with more to its forward (a LoRA wrapper, a bias)."""
    return proj if isinstance(proj, torch.Tensor) else proj.weight if can_fuse(proj) else None


def _norm_args(norm: RMSNorm | None) -> tuple[torch.Tensor | None, float]:
    """(weight, eps) of the RMSNorm a fused kernel folds in; (None, 0.0) for none."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


class PagedContext(MixingContext):
    """Forward context for one engine step.

    Device tensors (all built without a host sync, so a decode step can be graph-captured):
      past (S,), lens (S,): cached tokens before this chunk, tokens in this chunk
      block_tables (S, W) int32, conv_slots (S,) int64
    Host data: `num_decode` leading rows of one token each; `max_chunk_len`, a bound on the other
    rows' chunk lengths (None: `num_tokens`; a captured prefill graph cannot read the lengths). The
    rows after the decode rows attend in one call (`paged_prefill_attention`: a Triton kernel on
    CUDA, sync-free, so a step that prefills can be graph-captured). On CUDA such a step (eager, not
    compiled) also runs its norms, SiLU*mul, gated convs and QK-norm + RoPE as Triton kernels and adds
    residuals in the GEMM (`_linear_rows`, `_gated_short_conv_rows`). A decode step of one
    row runs the projections whose weight shape is in `fused_linear_shapes` through the fused
    Triton kernels (a conv block's in_proj together with its conv step). `moe_kernel` (default:
    `use_triton`): MoE routing and experts through the fused Triton kernels, in every step.
    `conv_snapshots` (prefix caching, eager steps): (snapshot pool (conv layers, snapshots, K-1, D),
    snapshot ids (M,), rows (M*(K-1),) of the step's conv inputs, None or (those of the rows that lie
    before their chunk, their rows in the (S*(K-1)) row states)): conv states at block ends inside
    prefill chunks, copied out as the conv layers run.
    """

    def __init__(self, *, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], conv_states: torch.Tensor,
                 attn_index: dict[int, int], conv_index: dict[int, int], past: torch.Tensor,
                 lens: torch.Tensor, block_tables: torch.Tensor, conv_slots: torch.Tensor, num_tokens: int,
                 num_decode: int, max_chunk_len: int | None = None, use_triton: bool = False,
                 fused_linear_shapes: frozenset[tuple[int, int]] = frozenset(), moe_kernel: bool | None = None,
                 conv_snapshots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.kv_caches, self.conv_states = kv_caches, conv_states
        self.attn_index, self.conv_index = attn_index, conv_index
        self.block_tables, self.conv_slots = block_tables, conv_slots
        self.num_decode, self.use_triton = num_decode, use_triton
        self.max_chunk_len = num_tokens if max_chunk_len is None else max_chunk_len
        self.fused_linear_shapes = fused_linear_shapes
        self.moe_kernel = use_triton if moe_kernel is None else moe_kernel
        self.conv_snapshots = conv_snapshots
        self.decode_only = num_decode == num_tokens
        self.block_size = kv_caches[0][0].shape[1] if kv_caches else 1
        device = past.device
        S = past.shape[0]
        if self.decode_only:  # one token per row: the common, graph-captured case
            positions = past
        else:
            self.cu_seqlens = F.pad(lens.cumsum(0), (1, 0))
            self.seq_of_token = torch.repeat_interleave(torch.arange(S, device=device), lens, output_size=num_tokens)
            self.pos_in_chunk = torch.arange(num_tokens, device=device) - self.cu_seqlens[self.seq_of_token]
            positions = past[self.seq_of_token] + self.pos_in_chunk
        self.positions = positions
        self.position_ids = positions[None]
        self.past, self.lens = past, lens
        self._slot_mapping = self._context_lens = None
        # A batch-1 decode step on the CPU, where fastlfm's CPU kernels run (`cpu_gemv`): its small ops
        # (QK-norm + RoPE, attention, the conv step) run as one call each, the final norm in the head's.
        self.cpu_batch1 = self.decode_only and num_decode == 1 and device.type == "cpu" and cpu_gemv.available()
        self.head_takes_final_norm = self.cpu_batch1

    # The per-token cache slots and per-row context lengths, computed when a path first reads them: a
    # CPU batch-1 decode step reads neither (its kernels take `past` and the block table), and each op
    # saved there is 10-15 us (the caches cold after the products' weights).
    @property
    def slot_mapping(self) -> torch.Tensor:
        if self._slot_mapping is None:
            bs, positions = self.block_size, self.positions
            rows = torch.arange(self.past.shape[0], device=positions.device) if self.decode_only else self.seq_of_token
            self._slot_mapping = self.block_tables[rows, positions // bs].long() * bs + positions % bs
        return self._slot_mapping

    @property
    def context_lens(self) -> torch.Tensor:
        if self._context_lens is None:
            self._context_lens = (self.past + self.lens).to(torch.int32)
        return self._context_lens

    # -- attention --------------------------------------------------------------------
    def attention(self, layer_idx, q, k, v):
        if self.decode_only and self.use_triton:  # one custom op: torch.compile traces straight through
            return self._decode(q[0], k[0], v[0], *self.kv_caches[self.attn_index[layer_idx]], self.num_decode)[None]
        return self._attention_eager(layer_idx, q, k, v)

    # Cache writes stay outside torch.compile (opaque, in-place): see keep_eager_paths_out_of_compile.
    def _attention_eager(self, layer_idx, q, k, v):
        k_cache, v_cache = self.kv_caches[self.attn_index[layer_idx]]
        q, k, v = q[0], k[0], v[0]
        if self.decode_only:
            return self._decode(q, k, v, k_cache, v_cache, self.num_decode)[None]
        Hkv, d = k.shape[1:]
        nd = self.num_decode  # the leading single-token rows: _decode writes their K/V
        k_cache.view(-1, Hkv, d)[self.slot_mapping[nd:]] = k[nd:]
        v_cache.view(-1, Hkv, d)[self.slot_mapping[nd:]] = v[nd:]
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k[:nd], v[:nd], k_cache, v_cache, nd)
        prefill_attention = paged_prefill_attention_ref
        if self.use_triton:
            from .kernels import paged_attention

            if paged_attention.prefill_kernel_supports(d, self.block_size):
                prefill_attention = paged_attention.paged_prefill_attention
        prefill_attention(q, k_cache, v_cache, self.block_tables, self.past, self.lens, self.cu_seqlens,
                          self.max_chunk_len, first_row=nd, out=out)
        return out[None]

    def _decode(self, q, k, v, k_cache, v_cache, nd):
        """Rows 0..nd-1, one new token each: write its K/V, attend over its whole history.
        On CUDA one Triton kernel does both."""
        if self.use_triton:  # (the model runner imported the ops before any compile)
            from .kernels import ops as kernel_ops
            return kernel_ops.paged_decode_attention_op(q, k, v, k_cache, v_cache, self.block_tables[:nd],
                                                        self.past[:nd])
        if nd == 1 and self._cpu_decode_one(q) and k_cache.dtype == q.dtype:
            # Batch-1 decode on the CPU: the K/V write and the attention over the sequence's blocks, one call
            return cpu_gemv.paged_decode_attention(q[0], k[0], v[0], k_cache, v_cache, self.block_tables[0],
                                                   self.past[:1])[None]
        tables, lens, slots = self.block_tables[:nd], self.context_lens[:nd], self.slot_mapping[:nd]
        Hkv, d = k.shape[1:]
        k_cache.view(-1, Hkv, d)[slots] = k
        v_cache.view(-1, Hkv, d)[slots] = v
        if nd == 1 and q.device.type == "cpu":
            # Batch-1 decode on the CPU: gather only the sequence's own blocks and attend over its
            # whole history, no mask (reading the length is free on the host).
            n = int(lens[0])
            blocks = tables[0, :-(-n // self.block_size)].long()
            kh = k_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]  # (1, Hkv, n, d)
            vh = v_cache[blocks].flatten(0, 1)[:n].transpose(0, 1)[None]
            return F.scaled_dot_product_attention(q.view(1, q.shape[1], 1, d), kh, vh, enable_gqa=True).view(q.shape)
        return paged_decode_attention_ref(q, k_cache, v_cache, tables, lens)

    def _cpu_decode_one(self, x: torch.Tensor) -> bool:
        """`cpu_batch1`, with activations `x` in a dtype of the kernels."""
        return self.cpu_batch1 and x.dtype in (torch.float32, torch.bfloat16)

    def qk_norm_rope_attention(self, layer_idx, q, k, v, q_norm, k_norm, cos, sin):
        k_cache, v_cache = self.kv_caches[self.attn_index[layer_idx]]
        if self._cpu_decode_one(q) and type(q_norm) is RMSNorm and type(k_norm) is RMSNorm \
                and q_norm.eps == k_norm.eps and q_norm.weight.dtype == q.dtype == k_norm.weight.dtype == cos.dtype \
                and k_cache.dtype == q.dtype:
            # Batch-1 decode on the CPU: QK-norm + RoPE, the K/V write and the attention, one call
            norms = (q_norm.weight, k_norm.weight, q_norm.eps, cos[0, 0], sin[0, 0])
            return cpu_gemv.paged_decode_attention(q[0, 0], k[0, 0], v[0, 0], k_cache, v_cache, self.block_tables[0],
                                                   self.past[:1], norms)[None, None]
        return super().qk_norm_rope_attention(layer_idx, q, k, v, q_norm, k_norm, cos, sin)

    def qk_norm_rope(self, q, k, q_norm, k_norm, cos, sin):
        if self.use_triton and type(q_norm) is RMSNorm and type(k_norm) is RMSNorm and q_norm.eps == k_norm.eps:
            from .kernels import ops as kernel_ops
            q, k = kernel_ops.qk_norm_rope_op(q[0], k[0], q_norm.weight, k_norm.weight, q_norm.eps, cos[0], sin[0])
            return q[None], k[None]
        return super().qk_norm_rope(q, k, q_norm, k_norm, cos, sin)

    # -- projections ---------------------------------------------------------------------
    def linear(self, x, proj, *, norm=None, silu_gate=False, residual=None):
        if isinstance(proj, CpuLinear):  # CPU: fastlfm's kernels fold LFM2's RMSNorm, the gate and the residual in
            if norm is not None and type(norm) is not RMSNorm:
                x, norm = norm(x), None
            return proj.fused(x, norm=norm, silu_gate=silu_gate, residual=residual)
        weight = self._fused_linear_weight(proj, norm)
        if weight is not None:
            from .kernels import ops as kernel_ops
            return kernel_ops.fused_linear_op(x[0], weight, *_norm_args(norm), silu_gate,
                                              residual[0] if residual is not None else None)[None]
        if self.use_triton and not self.decode_only:
            return self._linear_rows(x, proj, norm, silu_gate, residual)
        return super().linear(x, proj, norm=norm, silu_gate=silu_gate, residual=residual)

    def _linear_rows(self, x, proj, norm, silu_gate, residual):
        """A step that prefills, on CUDA (eager, not compiled): the norm and SiLU*mul as one Triton kernel
        each, the residual added in the GEMM's epilogue (one rounding, not two)."""
        from .kernels import rowwise

        if type(norm) is RMSNorm:
            x = rowwise.rms_norm(x, norm.weight, norm.eps)
        elif norm is not None:
            x = norm(x)
        if silu_gate:
            x = rowwise.silu_mul(x)
        weight = _plain_weight(proj)
        if weight is not None and residual is not None and residual.dtype == x.dtype:
            rows = x.reshape(-1, x.shape[-1])
            return torch.addmm(residual.reshape(-1, weight.shape[0]), rows, weight.t()).view(*x.shape[:-1], -1)
        y = F.linear(x, weight) if weight is not None else proj(x)  # else: a LoRA wrapper or a biased projection
        return y if residual is None else residual + y

    def _fused_linear_weight(self, proj, norm) -> torch.Tensor | None:
        """The weight to run through the fused Triton kernel (norm / SiLU*mul / residual folded in),
        or None for cuBLAS + ops: only in a batch-1 decode step, for a plain weight (a LoRA wrapper
        has none) of a shape measured faster (`fused_linear_shapes`), with an RMSNorm or no norm."""
        if not (self.fused_linear_shapes and self.decode_only and self.num_decode == 1):
            return None
        if norm is not None and type(norm) is not RMSNorm:
            return None
        weight = _plain_weight(proj)
        return weight if weight is not None and tuple(weight.shape) in self.fused_linear_shapes else None

    # -- MoE routing and experts ------------------------------------------------------
    def moe_route(self, x, gate_weight, expert_bias, top_k, normalize, scale):
        if self.moe_kernel:  # one launch per layer instead of the router's eight small kernels
            from .kernels import ops as kernel_ops
            return kernel_ops.moe_route_op(x, gate_weight, expert_bias, top_k, normalize, scale)
        return super().moe_route(x, gate_weight, expert_bias, top_k, normalize, scale)

    def moe_experts(self, x, expert_ids, expert_weights, gate_up, down):
        if self.moe_kernel:
            # Every step, decode (in the CUDA graph: a fixed grid, routing read on the device), prefill
            # and mixed: the grouped kernels sort the tokens by expert on the device.
            from .kernels import ops as kernel_ops
            return kernel_ops.moe_experts_op(x, expert_ids, expert_weights, gate_up, down)
        return super().moe_experts(x, expert_ids, expert_weights, gate_up, down)

    # -- short conv ---------------------------------------------------------------------
    def gated_short_conv(self, layer_idx, bcx, weight, bias):
        if self._cpu_decode_one(bcx) and weight.dtype == bcx.dtype and (bias is None or bias.dtype == bcx.dtype):
            # B*x -> K-tap FIR over the slot's state -> *C, and the state shift, in one call
            y = cpu_gemv.conv_step(bcx.reshape(-1), weight, bias, self.conv_states[self.conv_index[layer_idx]],
                                   self.conv_slots[:1], self.past[:1])
            return y.view(1, 1, -1)
        if self.decode_only and self.use_triton and weight.shape[-1] == 3:
            # B*x -> 3-tap FIR over the slot's state -> *C, and the state shift, in one kernel.
            from .kernels import ops as kernel_ops
            pool = self.conv_states[self.conv_index[layer_idx]]
            return kernel_ops.gated_conv_decode_step_op(bcx[0], weight, bias, pool, self.conv_slots, self.past)[None]
        if self.use_triton and not self.decode_only:
            return self._gated_short_conv_rows(layer_idx, bcx[0], weight, bias)[None]
        return self._gated_short_conv_eager(layer_idx, bcx, weight, bias)

    def _gated_short_conv_rows(self, layer_idx, bcx, weight, bias):
        """A step that prefills, on CUDA: the gated conv of every packed chunk in one Triton kernel, the
        conv-state snapshots (prefix caching) taken, then the states shifted."""
        from .kernels import conv

        pool = self.conv_states[self.conv_index[layer_idx]]
        out = conv.gated_conv_prefill(bcx, weight, bias, pool, self.conv_slots, self.past, self.seq_of_token,
                                      self.pos_in_chunk)
        if self.conv_snapshots is not None:
            def conv_inputs(rows):
                b_gate, _, h = bcx.index_select(0, rows).chunk(3, dim=-1)
                return b_gate * h

            self._save_conv_snapshots(layer_idx, conv_inputs, lambda: self._states_before(pool))
        conv.shift_conv_states(bcx, pool, self.conv_slots, self.past, self.cu_seqlens)
        return out

    def _states_before(self, pool):
        """(S, K-1, D): each row's conv state before this step (zeros for a fresh sequence)."""
        return pool[self.conv_slots].masked_fill_((self.past == 0)[:, None, None], 0)  # a new row starts from zeros

    def _save_conv_snapshots(self, layer_idx, conv_inputs, states_before):
        """Conv states at the block ends inside this step's chunks into their snapshots (prefix caching):
        the K-1 conv inputs before each block end, `conv_inputs(rows)` of the step's packed rows, or
        from the row's state before the step (`states_before()`) where they lie before the chunk."""
        snapshots, ids, rows, before = self.conv_snapshots
        taken = conv_inputs(rows)
        if before is not None:
            dst, src = before
            taken.index_copy_(0, dst, states_before().flatten(0, 1).index_select(0, src).to(taken.dtype))
        snapshots[self.conv_index[layer_idx]].index_copy_(
            0, ids, taken.view(ids.shape[0], -1, taken.shape[-1]).to(snapshots.dtype))

    def in_proj_gated_conv(self, layer_idx, x, in_proj, weight, bias, *, norm=None):
        proj_weight = self._fused_linear_weight(in_proj, norm)
        if proj_weight is not None and weight.shape[-1] == 3 and bias is None:
            # batch-1 decode: in_proj (norm folded in), B*x -> 3-tap FIR -> *C and the state shift, one kernel
            from .kernels import ops as kernel_ops
            pool = self.conv_states[self.conv_index[layer_idx]]
            return kernel_ops.in_proj_gated_conv_op(x[0], proj_weight, *_norm_args(norm), weight, pool,
                                                    self.conv_slots, self.past)[None]
        return super().in_proj_gated_conv(layer_idx, x, in_proj, weight, bias, norm=norm)

    def _gated_short_conv_eager(self, layer_idx, bcx, weight, bias):
        return super().gated_short_conv(layer_idx, bcx, weight, bias)

    def short_conv(self, layer_idx, v, weight, bias):
        pool = self.conv_states[self.conv_index[layer_idx]]  # (slots + 1, K-1, D)
        x = v[0]
        if self.decode_only and x.shape[0] == 1 and x.device.type == "cpu":
            return self._conv_step_in_place(pool[int(self.conv_slots[0])], x, weight, bias)[None]
        state = self._states_before(pool)  # (S, K-1, D)
        if self.decode_only:
            # One new input per row: out = sum_k w_k * (state ++ x)_k, then shift the state.
            K = weight.shape[-1]
            w = weight.view(-1, K).to(x.dtype)
            window = torch.cat((state.to(x.dtype), x[:, None]), dim=1)  # (S, K, D)
            out = x * w[:, K - 1]
            for lag in range(1, K):
                out = out + window[:, K - 1 - lag] * w[:, K - 1 - lag]
            if bias is not None:
                out = out + bias.to(x.dtype)
            pool[self.conv_slots] = window[:, 1:].to(pool.dtype)
            return out[None]
        out, new_state = packed_causal_conv(x, weight, bias, self.cu_seqlens, self.pos_in_chunk,
                                            self.seq_of_token, state.transpose(1, 2))
        if self.conv_snapshots is not None:
            self._save_conv_snapshots(layer_idx, lambda rows: x.index_select(0, rows), lambda: state)
        pool[self.conv_slots] = new_state.transpose(1, 2).to(pool.dtype)
        return out[None]

    def _conv_step_in_place(self, state, x, weight, bias):
        """Batch-1 decode on the CPU: the conv step on the slot's own state (K-1, D), read and
        shifted in place (no gather, no concatenation); the same sums in the same order as the
        batched path."""
        if int(self.past[0]) == 0:  # a new sequence starts from zeros
            state.zero_()
        K = weight.shape[-1]
        w = weight.view(-1, K).to(x.dtype)
        out = x[0] * w[:, K - 1]
        for lag in range(1, K):
            out = out + state[K - 1 - lag].to(x.dtype) * w[:, K - 1 - lag]
        if bias is not None:
            out = out + bias.to(x.dtype)
        for j in range(K - 2):  # ascending: each row is read before it is overwritten
            state[j].copy_(state[j + 1])
        state[K - 2].copy_(x[0])
        return out[None]


def keep_eager_paths_out_of_compile() -> None:
    """`torch.compiler.disable` on PagedContext's eager paths (in-place cache writes, per-step
    kernels), applied by whoever sets up a torch.compile of the forward rather than at import:
    importing torch._dynamo takes ~1 s, which a process that never compiles (the CPU path) should
    not pay in its cold start. Idempotent."""
    for name in ("_attention_eager", "_gated_short_conv_eager"):
        fn = getattr(PagedContext, name)
        if not getattr(fn, "_fastlfm_eager_only", False):
            wrapped = torch.compiler.disable(fn)
            wrapped._fastlfm_eager_only = True
            setattr(PagedContext, name, wrapped)
