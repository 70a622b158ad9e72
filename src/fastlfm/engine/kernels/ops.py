"""The decode kernels (paged attention, QK-norm + RoPE, the conv step, batch-1 projections and
conv blocks, MoE routing and experts) as torch custom ops, so that torch.compile traces a whole decode step as
one graph: without them every mixing call is a graph break, and inductor cannot fuse across the breaks.

The ops write the KV cache / conv state in place without declaring it (`mutates_args=()`):
a declared mutation of an input makes functionalization copy whole cache pools, and no
other op of a decode graph reads those tensors, so nothing can be reordered around the
write. Call them only from PagedContext's decode path.
"""

from __future__ import annotations

import torch

from .conv import gated_conv_decode_step
from .linear import fused_linear, in_proj_gated_conv
from .moe import fused_moe, route_top_k
from .qk_norm_rope import qk_norm_rope
from .paged_attention import paged_decode_attention


@torch.library.custom_op("fastlfm::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, block_tables: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    return paged_decode_attention(q, k_new, v_new, k_cache, v_cache, block_tables, past)


@paged_decode_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, block_tables, past):
    return q.new_empty(q.shape)


@torch.library.custom_op("fastlfm::gated_conv_decode_step", mutates_args=())
def gated_conv_decode_step_op(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              pool: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    return gated_conv_decode_step(bcx, weight, bias, pool, slots, past)


@gated_conv_decode_step_op.register_fake
def _(bcx, weight, bias, pool, slots, past):
    return bcx.new_empty((bcx.shape[0], bcx.shape[1] // 3))


@torch.library.custom_op("fastlfm::fused_linear", mutates_args=())
def fused_linear_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                    silu_gate: bool, residual: torch.Tensor | None) -> torch.Tensor:
    return fused_linear(x, weight, norm_weight, eps, silu_gate, residual)


@fused_linear_op.register_fake
def _(x, weight, norm_weight, eps, silu_gate, residual):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastlfm::in_proj_gated_conv", mutates_args=())
def in_proj_gated_conv_op(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
                          conv_weight: torch.Tensor, pool: torch.Tensor, slot: torch.Tensor,
                          past: torch.Tensor) -> torch.Tensor:
    return in_proj_gated_conv(x, weight, norm_weight, eps, conv_weight, pool, slot, past)


@in_proj_gated_conv_op.register_fake
def _(x, weight, norm_weight, eps, conv_weight, pool, slot, past):
    return x.new_empty((x.shape[0], weight.shape[0] // 3))


@torch.library.custom_op("fastlfm::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin)


@qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, eps, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fastlfm::moe_route", mutates_args=())
def moe_route_op(x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                 normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return route_top_k(x, gate_weight, expert_bias, top_k, normalize, scale)


@moe_route_op.register_fake
def _(x, gate_weight, expert_bias, top_k, normalize, scale):
    return x.new_empty((x.shape[0], top_k), dtype=torch.int64), x.new_empty((x.shape[0], top_k))


@torch.library.custom_op("fastlfm::moe_experts", mutates_args=())
def moe_experts_op(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    return fused_moe(x, expert_ids, expert_weights, gate_up, down)


@moe_experts_op.register_fake
def _(x, expert_ids, expert_weights, gate_up, down):
    return x.new_empty((x.shape[0], expert_ids.shape[1], x.shape[1]))
