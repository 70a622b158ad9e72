"""LFM2-MoE (LFM2-8B-A1B, LFM2-24B-A2B): dense LFM2 with sparse feed-forward blocks (spec §7).

Everything but the FFN of layers >= num_dense_layers is the dense model, so this file only
adds the router + experts and plugs them into `Lfm2Model` through `make_feed_forward`.

The experts of a layer are stacked, as transformers 5 holds them: `experts.gate_up_proj`
(E, 2I, D) with each expert's [w1; w3], and `experts.down_proj` (E, D, I). The released
checkpoints store one `experts.{e}.w1/w3/w2.weight` per expert; `sanitize` writes those into the
stacked tensors at load time and `checkpoint_tensors` splits them again for save_pretrained.
The experts' math is one call to the forward context (`ctx.moe_experts`): grouped GEMMs over
the tokens sorted by expert on the device, or the engine's fused Triton kernels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigError, Lfm2Config
from .lfm2 import PLAIN_OPS, ForwardContext, Lfm2ForCausalLM, Lfm2MLP, Lfm2Model


@dataclass
class Lfm2MoeConfig(Lfm2Config):
    intermediate_size: int = 7168
    moe_intermediate_size: int = 1792
    num_dense_layers: int = 2
    num_experts: int = 32
    num_experts_per_tok: int = 4
    use_expert_bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    model_type: str = "lfm2_moe"

    MODEL_TYPE: ClassVar[str] = "lfm2_moe"
    ARCHITECTURE: ClassVar[str] = "Lfm2MoeForCausalLM"

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size  # MoE configs use the width as written (no 2/3 rule)

    @classmethod
    def _check_layer_types_derivable(cls, raw: dict[str, Any]) -> None:
        if raw.get("full_attn_idxs") is None:
            raise ConfigError("an lfm2_moe config needs `layer_types` (or `full_attn_idxs`) to say which "
                              "layers are attention layers")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                              f"({self.num_experts})")


class Lfm2MoeExperts(nn.Module):
    """The routed SwiGLU experts of one layer, stacked (transformers 5 names and layout)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # [w1; w3]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # w2

    @torch.no_grad()
    def init_random_weights(self, std: float, generator: torch.Generator | None) -> None:
        for p in (self.gate_up_proj, self.down_proj):
            p.copy_((torch.randn(p.shape, generator=generator) * std).to(p.dtype))


class Lfm2MoeBlock(nn.Module):
    """Sigmoid router; the expert bias only chooses experts, the unbiased scores weight them."""

    def __init__(self, config: Lfm2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Lfm2MoeExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, D) -> chosen expert ids (tokens, k) and their weights (tokens, k), in x's dtype
        (ops.moe_route: in float32 throughout)."""
        return (ctx or PLAIN_OPS).moe_route(x, self.gate.weight, self.expert_bias, self.top_k, self.norm_topk_prob,
                                            self.scale)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """sum over each token's chosen experts of weight * expert(u), u = norm(x) (+ residual)."""
        u = norm(x) if norm is not None else x
        tokens = u.reshape(-1, u.shape[-1])
        expert_ids, weights = self.route(tokens, ctx)
        per_expert = (ctx or PLAIN_OPS).moe_experts(tokens, expert_ids, weights, self.experts.gate_up_proj,
                                                    self.experts.down_proj)  # (tokens, k, D)
        y = per_expert.sum(1).view(u.shape)
        return y if residual is None else residual + y


_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w1|w3|w2)\.weight")
_STACKED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    config_class = Lfm2MoeConfig
    keep_in_fp32 = ("expert_bias",)  # a float32 buffer in the checkpoint (spec §5.2), whatever the dtype

    def __init__(self, config: Lfm2MoeConfig):
        def feed_forward(i: int) -> nn.Module:
            if i < config.num_dense_layers:
                return Lfm2MLP(config.hidden_size, config.intermediate_size)
            return Lfm2MoeBlock(config)

        super().__init__(config, Lfm2Model(config, make_feed_forward=feed_forward))

    def sanitize(self, name: str, tensor: torch.Tensor) -> list[tuple]:
        """A released checkpoint's per-expert w1 / w3 / w2 goes into its rows of the stacked
        gate_up_proj / down_proj (loading.load_state_dict_into writes such parts in place);
        transformers 5's stacked tensors load as they are."""
        match = _PER_EXPERT.fullmatch(name)
        if match is None:
            return [(name, tensor)]
        base, e, w = match.group(1), int(match.group(2)), match.group(3)
        if e >= self.config.num_experts:
            return [(name, tensor)]  # reported as a tensor the model does not have
        if w == "w2":
            return [(f"{base}.down_proj", tensor, e)]
        inter = self.config.moe_intermediate_size
        rows = slice(0, inter) if w == "w1" else slice(inter, 2 * inter)
        return [(f"{base}.gate_up_proj", tensor, (e, rows))]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """save_pretrained writes the released layout: one w1 / w3 / w2 per expert."""
        match = _STACKED.fullmatch(name)
        if match is None:
            return [(name, tensor)]
        base = match.group(1)
        if match.group(2) == "down_proj":
            return [(f"{base}.{e}.w2.weight", t) for e, t in enumerate(tensor)]
        w1, w3 = tensor.chunk(2, dim=1)
        return [(f"{base}.{e}.{w}.weight", t[e]) for e in range(tensor.shape[0]) for w, t in (("w1", w1), ("w3", w3))]
