"""LFM2: a hybrid of gated short-convolution and GQA attention blocks (spec §3-§5).

The layers compute projections, norms and RoPE themselves and hand the sequence-mixing
step to a *forward context*: `BatchContext` below serves the transformers-style API
(aligned rows, left padding, `Lfm2Cache`), `PackedContext` serves packed training, and the
engine has its own context over a paged KV cache and conv-state slots. The forward pass
itself exists once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import PretrainedMixin
from ..ops import (apply_rope, causal_conv, moe_route, moe_swiglu_experts, packed_causal_conv, rms_norm,
                   rope_cos_sin)
from .config import Lfm2Config


# ----------------------------------------------------------------------------- contexts
class ForwardContext(Protocol):
    """How one forward mixes tokens: attention over the cache, conv over the conv state."""

    position_ids: torch.Tensor  # (B, T)
    head_takes_final_norm: bool  # the causal LM hands the final norm to `linear` with the head

    def mask_padding(self, x: torch.Tensor) -> torch.Tensor: ...
    def linear(self, x: torch.Tensor, proj: nn.Module | torch.Tensor, *, norm: nn.Module | None = None,
               silu_gate: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor: ...
    def qk_norm_rope(self, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
    def qk_norm_rope_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_norm: nn.Module, k_norm: nn.Module, cos: torch.Tensor,
                               sin: torch.Tensor) -> torch.Tensor: ...
    def short_conv(self, layer_idx: int, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...
    def gated_short_conv(self, layer_idx: int, bcx: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor: ...
    def in_proj_gated_conv(self, layer_idx: int, x: torch.Tensor, in_proj: nn.Module, weight: torch.Tensor,
                           bias: torch.Tensor | None, *, norm: nn.Module | None = None) -> torch.Tensor: ...
    def moe_route(self, x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...
    def moe_experts(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor: ...


class MixingContext:
    """Shared defaults: no padding to mask, projections, QK-norm + RoPE and MoE routing and experts as plain ops,
    and the conv block's gates around `short_conv`. A backend with fused kernels overrides `linear`,
    `qk_norm_rope`, `gated_short_conv`, `in_proj_gated_conv`, `moe_route` or `moe_experts`; one that
    runs the final norm and the head as one kernel sets `head_takes_final_norm`."""

    head_takes_final_norm = False

    def mask_padding(self, x):
        return x

    def linear(self, x: torch.Tensor, proj: nn.Module | torch.Tensor, *, norm: nn.Module | None = None,
               silu_gate: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + proj(prologue(x)): the prologue is `norm(x)`, or SiLU(gate) * up of x = [gate | up]
        (`silu_gate`). `proj` is a module or a bare weight. One call, so that an engine can run it as
        one kernel (batch-1 decode, where each of these ops would otherwise be a launch of its own)."""
        if norm is not None:
            x = norm(x)
        if silu_gate:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        y = F.linear(x, proj) if isinstance(proj, torch.Tensor) else proj(x)
        return y if residual is None else residual + y

    def qk_norm_rope(self, q: torch.Tensor, k: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head norm, then RoPE, of q and k (B, T, H, d)."""
        return apply_rope(q_norm(q), cos, sin), apply_rope(k_norm(k), cos, sin)

    def qk_norm_rope_attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               q_norm: nn.Module, k_norm: nn.Module, cos: torch.Tensor,
                               sin: torch.Tensor) -> torch.Tensor:
        """`attention` of `qk_norm_rope`'s q and k. One call, so that an engine can run a batch-1 decode
        step of it as one kernel."""
        q, k = self.qk_norm_rope(q, k, q_norm, k_norm, cos, sin)
        return self.attention(layer_idx, q, k, v)

    def gated_short_conv(self, layer_idx, bcx, weight, bias):
        """bcx: the in_proj output [B gate | C gate | x] (..., 3D); returns C * conv(B * x)."""
        b_gate, c_gate, h = bcx.chunk(3, dim=-1)
        return c_gate * self.short_conv(layer_idx, b_gate * h, weight, bias)

    def in_proj_gated_conv(self, layer_idx: int, x: torch.Tensor, in_proj: nn.Module, weight: torch.Tensor,
                           bias: torch.Tensor | None, *, norm: nn.Module | None = None) -> torch.Tensor:
        """The conv block up to out_proj: `gated_short_conv` of in_proj(norm(x)). One call, so that an
        engine can run a batch-1 decode step of it as one kernel."""
        return self.gated_short_conv(layer_idx, self.linear(x, in_proj, norm=norm), weight, bias)

    def moe_route(self, x: torch.Tensor, gate_weight: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                  normalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """An MoE layer's router (ops.moe_route): each token's k expert ids (T, k) and weights (T, k)."""
        return moe_route(x, gate_weight, expert_bias, top_k, normalize, scale)

    def moe_experts(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """The routed SwiGLU experts of an MoE layer (ops.moe_swiglu_experts): x (T, D), each token's
        k expert ids and weights (T, k), stacked weights gate_up (E, 2I, D) and down (E, D, I); returns
        each (token, expert) pair's weighted output (T, k, D)."""
        return moe_swiglu_experts(x, expert_ids, expert_weights, gate_up, down)


PLAIN_OPS = MixingContext()  # `linear` for callers without a forward context


class Lfm2Cache:
    """Hybrid cache for aligned batches: post-RoPE K/V per attention layer, the last K-1
    conv inputs per conv layer. K/V live in buffers that grow by doubling, so decoding T
    tokens costs O(T) copies, not O(T^2). Created empty; sized by the first forward."""

    def __init__(self, config: Lfm2Config):
        self.config = config
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv_states: dict[int, torch.Tensor] = {}
        self.seq_len = 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (B, H, T, d) at the current length; return the whole history."""
        end = self.seq_len + k.shape[2]
        buf_k = self.keys.get(layer_idx)
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(256, 2 * end)
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if buf_k is not None:
                new_k[:, :, : self.seq_len] = buf_k[:, :, : self.seq_len]
                new_v[:, :, : self.seq_len] = self.values[layer_idx][:, :, : self.seq_len]
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
            buf_k = new_k
        buf_v = self.values[layer_idx]
        buf_k[:, :, self.seq_len : end] = k
        buf_v[:, :, self.seq_len : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def reorder(self, batch_idx: torch.Tensor) -> None:
        """Keep/reorder rows (beam search, dropping finished rows)."""
        for store in (self.keys, self.values, self.conv_states):
            for i, t in store.items():
                store[i] = t.index_select(0, batch_idx.to(t.device))

    def reset(self) -> None:
        self.keys.clear(), self.values.clear(), self.conv_states.clear()
        self.seq_len = 0


class BatchContext(MixingContext):
    """Aligned rows (B, T) with an optional 2-D padding mask over past + new tokens."""

    def __init__(self, position_ids, cache: Lfm2Cache | None, attention_mask: torch.Tensor | None, T: int):
        self.position_ids = position_ids
        self.cache = cache
        past = cache.seq_len if cache is not None else 0
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        # Conv layers see zeros at pad positions (spec §4.3); decode steps need no mask.
        self.pad_keep = attention_mask[:, -T:, None].bool() if has_padding and T > 1 else None
        self.is_causal = self.attn_mask = None
        if has_padding or (past > 0 and T > 1):
            S = past + T
            q_pos = torch.arange(past, S, device=position_ids.device)
            allowed = torch.arange(S, device=position_ids.device)[None, :] <= q_pos[:, None]
            allowed = allowed[None, None]
            if has_padding:
                allowed = allowed & attention_mask[:, None, None, :S].bool()
            # Fully masked rows (queries at pad positions) would give NaN; let them see all.
            self.attn_mask = allowed | ~allowed.any(-1, keepdim=True)
        else:
            self.is_causal = T > 1

    def mask_padding(self, x):
        return x if self.pad_keep is None else x * self.pad_keep.to(x.dtype)

    def attention(self, layer_idx, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.cache is not None:
            k, v = self.cache.update_kv(layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.attn_mask, is_causal=bool(self.is_causal), enable_gqa=True
        )
        return out.transpose(1, 2)

    def short_conv(self, layer_idx, v, weight, bias):
        state = self.cache.conv_states.get(layer_idx) if self.cache is not None else None
        out, new_state = causal_conv(v, weight, bias, state)
        if self.cache is not None:
            self.cache.conv_states[layer_idx] = new_state
        return out


class PackedContext(MixingContext):
    """Several sequences packed into one row (1, N) with no cache: packed training and
    padding-free scoring. Attention and conv both restart at every boundary."""

    def __init__(self, seq_lens: list[int] | torch.Tensor, device: torch.device | str | None = None):
        lens = torch.as_tensor(seq_lens, dtype=torch.long, device=device)
        self.cu_seqlens = F.pad(lens.cumsum(0), (1, 0))
        N = int(self.cu_seqlens[-1])
        self.seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
        self.pos_in_chunk = torch.arange(N, device=device) - self.cu_seqlens[self.seq_of_token]
        self.position_ids = self.pos_in_chunk[None]
        same = self.seq_of_token[:, None] == self.seq_of_token[None, :]
        causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()
        self.attn_mask = (same & causal)[None, None]

    def attention(self, layer_idx, q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask, enable_gqa=True)
        return out.transpose(1, 2)

    def short_conv(self, layer_idx, v, weight, bias):
        out, _ = packed_causal_conv(v[0], weight, bias, self.cu_seqlens, self.pos_in_chunk, self.seq_of_token)
        return out[None]


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def can_fuse(*linears: nn.Module) -> bool:
    """Plain bias-free nn.Linear layers (LoRA-wrapped or biased ones keep their own GEMMs)."""
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """One (sum of out, in) weight for Linears that share an input, so inference runs one
    GEMM instead of several. The Linears' weights become views into it: memory and every
    other use of the modules (state_dict, saving) are unchanged."""
    if not can_fuse(*linears):
        raise TypeError("only plain bias-free nn.Linear layers can be fused (merge LoRA adapters first)")
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[start:start + n], requires_grad=m.weight.requires_grad)
        start += n
    return fused


class Lfm2Attention(nn.Module):
    def __init__(self, config: Lfm2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * d, bias=False)
        self.out_proj = nn.Linear(self.n_heads * d, D, bias=False)
        self.q_layernorm = RMSNorm(d, config.norm_eps)
        self.k_layernorm = RMSNorm(d, config.norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # set by fuse_projections()

    def project_qkv(self, x, ctx: ForwardContext, norm: nn.Module | None):
        if self.qkv_weight is None:
            u = norm(x) if norm is not None else x
            return self.q_proj(u), self.k_proj(u), self.v_proj(u)
        kv = self.n_kv * self.head_dim
        return ctx.linear(x, self.qkv_weight, norm=norm).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x, cos, sin, ctx: ForwardContext, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None):
        """out_proj(attention(norm(x))) (+ residual)."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, ctx, norm)
        out = ctx.qk_norm_rope_attention(
            self.layer_idx, q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim),
            v.view(B, T, self.n_kv, self.head_dim), self.q_layernorm, self.k_layernorm, cos, sin)
        return ctx.linear(out.reshape(B, T, -1), self.out_proj, residual=residual)


class Lfm2ShortConv(nn.Module):
    """in_proj -> (B_gate * x) -> depthwise causal conv -> * C_gate -> out_proj."""

    def __init__(self, config: Lfm2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, K = config.hidden_size, config.conv_L_cache
        self.in_proj = nn.Linear(D, 3 * D, bias=config.conv_bias)
        self.conv = nn.Conv1d(D, D, K, groups=D, bias=config.conv_bias, padding=K - 1)
        self.out_proj = nn.Linear(D, D, bias=config.conv_bias)

    def forward(self, x, ctx: ForwardContext, norm: nn.Module | None = None, residual: torch.Tensor | None = None):
        """out_proj(gated conv(in_proj(norm(x)))) (+ residual). Padding is zeroed before the norm,
        which keeps zero rows zero."""
        y = ctx.in_proj_gated_conv(self.layer_idx, ctx.mask_padding(x), self.in_proj, self.conv.weight,
                                   self.conv.bias, norm=norm)
        return ctx.linear(y, self.out_proj, residual=residual)


class Lfm2MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)  # gate
        self.w3 = nn.Linear(hidden, ffn, bias=False)  # up
        self.w2 = nn.Linear(ffn, hidden, bias=False)  # down
        self.w13_weight: torch.Tensor | None = None  # set by fuse_projections()

    def forward(self, x, ctx: ForwardContext | None = None, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None):
        """w2(SiLU(w1 u) * w3 u) for u = norm(x) (+ residual)."""
        if self.w13_weight is None:
            u = norm(x) if norm is not None else x
            y = self.w2(F.silu(self.w1(u)) * self.w3(u))
            return y if residual is None else residual + y
        ctx = ctx or PLAIN_OPS
        gate_up = ctx.linear(x, self.w13_weight, norm=norm)
        return ctx.linear(gate_up, self.w2, silu_gate=True, residual=residual)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> None:
    """Inference: q/k/v and w1/w3 of every LFM2 layer in `model` (dense, MoE experts, VL)
    each run as one GEMM. The engine calls this; idempotent. Call it once the model is on its
    device: a `.to()` afterwards would copy the views apart (still correct, twice the memory)."""
    for module in model.modules():
        if isinstance(module, Lfm2Attention) and module.qkv_weight is None \
                and can_fuse(module.q_proj, module.k_proj, module.v_proj):
            module.qkv_weight = fuse_linears(module.q_proj, module.k_proj, module.v_proj)
        elif isinstance(module, Lfm2MLP) and module.w13_weight is None and can_fuse(module.w1, module.w3):
            module.w13_weight = fuse_linears(module.w1, module.w3)


class Lfm2DecoderLayer(nn.Module):
    def __init__(self, config: Lfm2Config, layer_idx: int, feed_forward: nn.Module | None = None):
        super().__init__()
        self.is_attention = config.is_attention_layer(layer_idx)
        if self.is_attention:
            self.self_attn = Lfm2Attention(config, layer_idx)
        else:
            self.conv = Lfm2ShortConv(config, layer_idx)
        self.feed_forward = feed_forward or Lfm2MLP(config.hidden_size, config.ffn_dim)
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, h, cos, sin, ctx: ForwardContext):
        # h + mixer(norm(h)), then h + ffn(norm(h)); the blocks take the norm and the residual
        # so that the context can fold them into their first and last projections.
        if self.is_attention:
            h = self.self_attn(h, cos, sin, ctx, norm=self.operator_norm, residual=h)
        else:
            h = self.conv(h, ctx, norm=self.operator_norm, residual=h)
        return self.feed_forward(h, ctx, norm=self.ffn_norm, residual=h)  # SwiGLU MLP or MoE block


# ----------------------------------------------------------------------------- models
@dataclass
class BaseModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: Lfm2Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: Lfm2Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Lfm2Model(nn.Module):
    def __init__(self, config: Lfm2Config, make_feed_forward=None):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(
            Lfm2DecoderLayer(config, i, make_feed_forward(i) if make_feed_forward else None)
            for i in range(config.num_hidden_layers)
        )
        self.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps)  # the *final* norm
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)

    def rope_inv_freq(self, device=None) -> torch.Tensor:
        d = self.config.head_dim
        if torch.empty(0, device=device).is_meta:
            # Built on the meta device (a checkpoint's model): reset_buffers computes it where the weights land.
            # (Computing on meta would run torch's Python references, which import torch._dynamo: ~1 s.)
            return torch.empty(d // 2, device=device)
        exponent = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
        return 1.0 / (self.config.rope_theta**exponent)

    def reset_buffers(self, device) -> None:
        self.inv_freq = self.rope_inv_freq(device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Lfm2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        context: ForwardContext | None = None,
        apply_final_norm: bool = True,
    ) -> BaseModelOutput:
        """`apply_final_norm` False: the last hidden state before the final norm (`embedding_norm`), for a
        caller that folds the norm into its next product."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if context is None:
            if use_cache and past_key_values is None:
                past_key_values = Lfm2Cache(self.config)
            past = past_key_values.seq_len if past_key_values is not None else 0
            if attention_mask is not None and attention_mask.shape[-1] != past + T:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} tokens; expected past {past} + new {T}"
                )
            if position_ids is None:
                if attention_mask is not None:
                    # As in generate(): left-padded rows start at position 0 on their first token.
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                elif cache_position is not None:
                    position_ids = cache_position[None].expand(B, -1)
                else:
                    position_ids = torch.arange(past, past + T, device=h.device)[None].expand(B, -1)
            context = BatchContext(position_ids, past_key_values, attention_mask, T)
        cos, sin = rope_cos_sin(context.position_ids, self.inv_freq.to(h.device), h.dtype)
        all_hidden = [h] if output_hidden_states else None
        for layer in self.layers:
            h = layer(h, cos, sin, context)
            if all_hidden is not None:
                all_hidden.append(h)
        if isinstance(context, BatchContext) and context.cache is not None:
            context.cache.seq_len += T
        if apply_final_norm:
            h = self.embedding_norm(h)
        if all_hidden is not None:
            all_hidden[-1] = h  # transformers reports the normed final state last
        return BaseModelOutput(h, past_key_values, tuple(all_hidden) if all_hidden else None)


def select_logit_positions(h: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Hidden states to run the head on: all (0), the last n (int n), shared positions (1-D),
    per-row positions (2-D int) or a boolean selection (2-D bool, flattened)."""
    if isinstance(logits_to_keep, int):
        return h if logits_to_keep == 0 else h[:, -logits_to_keep:]
    if logits_to_keep.dtype == torch.bool:
        return h[logits_to_keep]
    if logits_to_keep.dim() == 1:
        return h[:, logits_to_keep]
    return h.gather(1, logits_to_keep[..., None].expand(-1, -1, h.shape[-1]))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t is scored against labels[t+1]; -100 is ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1).to(logits.device),
        ignore_index=-100,
        reduction="sum" if num_items_in_batch is not None else "mean",
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class Lfm2ForCausalLM(PretrainedMixin, nn.Module):
    config_class = Lfm2Config

    def __init__(self, config: Lfm2Config, model: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.model = model if model is not None else Lfm2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_cache(self) -> Lfm2Cache:
        return Lfm2Cache(self.config)

    # The final norm's weight: it stays a float parameter when the projections and the head are
    # swapped for packed or quantized CPU kernels (fastlfm.cpu_linear).
    @property
    def device(self) -> torch.device:
        return self.model.embedding_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embedding_norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Lfm2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | None = None,
        context: ForwardContext | None = None,
    ) -> CausalLMOutput:
        # An engine's batch-1 CPU step runs the final norm inside the head's product (one kernel, not ~8 ops).
        fold_norm = context is not None and context.head_takes_final_norm and not output_hidden_states
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
            use_cache, cache_position, output_hidden_states, context, apply_final_norm=not fold_norm,
        )
        h = select_logit_positions(out.last_hidden_state, logits_to_keep)
        logits = context.linear(h, self.lm_head, norm=self.model.embedding_norm) if fold_norm else self.lm_head(h)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)

    # -- initialisation (training from scratch; spec §3.9) -------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
                w = torch.randn(module.weight.shape, generator=gen) * std
                module.weight.copy_(w.to(module.weight.dtype))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif hasattr(module, "init_random_weights"):  # bare parameters, e.g. stacked MoE experts
                module.init_random_weights(std, gen)
        pad = self.config.pad_token_id
        if pad is not None:
            self.model.embed_tokens.weight[pad].zero_()
