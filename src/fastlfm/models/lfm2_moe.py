"""LFM2-MoE (e.g. LFM2-8B-A1B): dense LFM2 with sparse feed-forward blocks (spec §7).

Everything but the FFN of layers >= num_dense_layers is the dense model, so this file only
adds the router + experts and plugs them into `Lfm2Model` through `make_feed_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigError, Lfm2Config
from .lfm2 import Lfm2ForCausalLM, Lfm2MLP, Lfm2Model


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


class Lfm2MoeBlock(nn.Module):
    """Sigmoid router; the expert bias only chooses experts, the unbiased scores weight them."""

    def __init__(self, config: Lfm2MoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Lfm2MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, D) -> chosen expert ids (tokens, k) and their weights (tokens, k)."""
        logits = self.gate(x)
        scores = logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts).type_as(logits)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
        return experts, weights * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        experts, weights = self.route(x)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():  # only the experts some token chose
            token, slot = (experts == e).nonzero(as_tuple=True)
            out.index_add_(0, token, (self.experts[e](x[token]) * weights[token, slot, None]).to(x.dtype))
        return out.reshape(shape)


class Lfm2MoeForCausalLM(Lfm2ForCausalLM):
    config_class = Lfm2MoeConfig

    def __init__(self, config: Lfm2MoeConfig):
        def feed_forward(i: int) -> nn.Module:
            if i < config.num_dense_layers:
                return Lfm2MLP(config.hidden_size, config.intermediate_size)
            return Lfm2MoeBlock(config)

        super().__init__(config, Lfm2Model(config, make_feed_forward=feed_forward))

    def sanitize(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        # Released checkpoints store one w1/w3/w2 per expert (our layout). transformers 5.x
        # keeps them stacked in memory (gate_up_proj = [w1; w3], down_proj = w2); accept both.
        if name.endswith(".experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            w1, w3 = tensor.chunk(2, dim=1)
            return [(f"{base}{e}.{w}.weight", t[e]) for e in range(tensor.shape[0]) for w, t in (("w1", w1), ("w3", w3))]
        if name.endswith(".experts.down_proj"):
            base = name[: -len("down_proj")]
            return [(f"{base}{e}.w2.weight", tensor[e]) for e in range(tensor.shape[0])]
        return [(name, tensor)]
