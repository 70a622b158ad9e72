"""The decode kernels as torch custom ops, so that torch.compile traces a whole decode step
as one graph: without them every mixing call is a graph break, and inductor cannot fuse
across a layer boundary (the residual add of one layer with the next layer's RMSNorm).

The ops write the KV cache / conv state in place without declaring it (`mutates_args=()`):
a declared mutation of an input makes functionalization copy whole cache pools, and no
other op of a decode graph reads those tensors, so nothing can be reordered around the
write. Call them only from PagedContext's decode path.
"""

from __future__ import annotations

import torch

from .conv import gated_conv_decode_step
from .paged_attention import paged_decode_attention


@torch.library.custom_op("fastlfm::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    return paged_decode_attention(q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, slot_mapping)


@paged_decode_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, block_tables, context_lens, slot_mapping):
    return q.new_empty(q.shape)


@torch.library.custom_op("fastlfm::gated_conv_decode_step", mutates_args=())
def gated_conv_decode_step_op(bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              pool: torch.Tensor, slots: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    return gated_conv_decode_step(bcx, weight, bias, pool, slots, past)


@gated_conv_decode_step_op.register_fake
def _(bcx, weight, bias, pool, slots, past):
    return bcx.new_empty((bcx.shape[0], bcx.shape[1] // 3))
