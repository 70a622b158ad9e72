"""LFM2-VL: a SigLIP2 NaFlex vision tower, a pixel-unshuffle projector and the LFM2 text
model, unchanged (spec §8). Image features replace the `<image>` token embeddings; after
that the text model runs exactly as for text, so every forward context works."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..loading import PretrainedMixin
from .config import ConfigError, Lfm2Config
from .lfm2 import CausalLMOutput, Lfm2Cache, Lfm2Model, causal_lm_loss, select_logit_positions

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _from_known(cls, raw: dict[str, Any]):
    known = {f.name for f in fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in raw.items() if k in known},
               extra={k: v for k, v in raw.items() if k not in known})


@dataclass
class SiglipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 256
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "siglip2_vision_model"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({k: v for k, v in asdict(self).items() if k != "extra"})
        out["vision_use_head"] = False  # LFM2-VL never uses the pooling head
        return out


@dataclass
class Lfm2VlConfig:
    vision_config: SiglipVisionConfig
    text_config: Lfm2Config
    image_token_id: int = 396
    projector_hidden_act: str = "gelu"
    projector_hidden_size: int = 2560
    projector_bias: bool = True
    projector_use_layernorm: bool = True
    downsample_factor: int = 2
    tie_word_embeddings: bool = True
    model_type: str = "lfm2_vl"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Lfm2VlConfig":
        raw = dict(raw)
        if raw.get("model_type") not in ("lfm2_vl", "lfm2-vl"):
            raise ConfigError(f"unsupported model_type {raw.get('model_type')!r}: this class reads 'lfm2_vl' configs")
        raw["model_type"] = "lfm2_vl"  # remote-code era name
        if "image_token_index" in raw:
            raw.setdefault("image_token_id", raw.pop("image_token_index"))
        if "tie_embedding" in raw:
            raw["tie_word_embeddings"] = raw.pop("tie_embedding")
        vision = dict(raw.pop("vision_config", None) or {})
        # Remote-code configs drop trailing encoder layers with vision_feature_layer (-2: last one unused).
        feature_layer = raw.pop("vision_feature_layer", -1)
        if feature_layer != -1:
            n = vision.get("num_hidden_layers", SiglipVisionConfig.num_hidden_layers)
            vision["num_hidden_layers"] = n + feature_layer + 1 if feature_layer < 0 else feature_layer
        text = dict(raw.pop("text_config", None) or {})
        text.setdefault("model_type", "lfm2")
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        cfg = _from_known(cls, {**raw, "vision_config": _from_known(SiglipVisionConfig, vision),
                                "text_config": Lfm2Config.from_dict(text)})
        v = cfg.vision_config
        if v.hidden_size % v.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size {v.hidden_size} is not divisible by "
                              f"num_attention_heads {v.num_attention_heads}")
        if int(v.num_patches**0.5) ** 2 != v.num_patches:
            raise ConfigError(f"vision_config.num_patches {v.num_patches} is not a square grid")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({k: getattr(self, k) for k in (
            "image_token_id", "projector_hidden_act", "projector_hidden_size", "projector_bias",
            "projector_use_layernorm", "downsample_factor", "tie_word_embeddings", "model_type")})
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["architectures"] = ["Lfm2VlForConditionalGeneration"]
        return out

    def save(self, folder) -> None:
        import json
        import os

        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    def __getattr__(self, name: str) -> Any:
        # Generation and the engine read text-model fields (vocab_size, layer types, heads,
        # eos, ...); the VL model *is* that text model once image features are embedded.
        if name.startswith("__") or name == "text_config":
            raise AttributeError(name)
        return getattr(self.text_config, name)


# ----------------------------------------------------------------------------- vision tower
class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.grid = int(config.num_patches**0.5)
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """pixel_values: (N, P, 3·p·p) channel-last patches; spatial_shapes: (N, 2) patch grid (h, w)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        table = self.position_embedding.weight
        grid = table.reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None].float()
        pos = torch.empty_like(x)
        # One antialiased bilinear resize per distinct grid size (tiles share 32x32).
        shapes = [tuple(s) for s in spatial_shapes.tolist()]
        for h, w in set(shapes):
            resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            resized = resized[0].reshape(table.shape[1], h * w).t().to(x.dtype)
            for i, shape in enumerate(shapes):
                if shape == (h, w):
                    pos[i, : h * w] = resized
                    pos[i, h * w:] = resized[0]  # padding rows are masked anyway
        return x + pos


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x, key_mask):
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTower(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, pixel_attention_mask, spatial_shapes) -> torch.Tensor:
        x = self.embeddings(pixel_values, spatial_shapes)
        key_mask = pixel_attention_mask.bool()[:, None, None, :]  # bidirectional, real patches only
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)


class Lfm2VlProjector(nn.Module):
    """Pixel-unshuffle by f (channels ordered row offset, column offset, channel), then
    [LayerNorm] -> Linear -> act -> Linear into the text width."""

    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        f = self.factor = config.downsample_factor
        width = config.vision_config.hidden_size * f * f
        self.layer_norm = nn.LayerNorm(width) if config.projector_use_layernorm else None
        self.linear_1 = nn.Linear(width, config.projector_hidden_size, bias=config.projector_bias)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size, bias=config.projector_bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (h, w, C) patch features of one view -> (h/f · w/f, D_text)."""
        h, w, C = grid.shape
        f = self.factor
        x = grid.reshape(h // f, f, w // f, f, C).permute(0, 2, 1, 3, 4).reshape(h // f * (w // f), f * f * C)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.linear_2(self.act(self.linear_1(x)))


# ----------------------------------------------------------------------------- the model
class Lfm2VlModel(nn.Module):
    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision_config)
        self.multi_modal_projector = Lfm2VlProjector(config)
        self.language_model = Lfm2Model(config.text_config)

    def get_image_features(self, pixel_values, pixel_attention_mask, spatial_shapes) -> list[torch.Tensor]:
        """One (tokens, D_text) tensor per view (tile or single image), in order."""
        hidden = self.vision_tower(pixel_values, pixel_attention_mask, spatial_shapes)
        feats = []
        for i, (h, w) in enumerate(spatial_shapes.tolist()):
            if h % self.multi_modal_projector.factor or w % self.multi_modal_projector.factor:
                raise ValueError(f"view {i}: patch grid {h}x{w} is not divisible by downsample_factor")
            feats.append(self.multi_modal_projector(hidden[i, : h * w].reshape(h, w, -1)))
        return feats

    def embed(self, input_ids: torch.Tensor, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None):
        """Token embeddings with image features scattered, in order, into the `<image>` slots."""
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        feats = torch.cat(self.get_image_features(pixel_values, pixel_attention_mask, spatial_shapes))
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens but the images give "
                             f"{feats.shape[0]} features; expand prompts with the processor")
        return embeds.masked_scatter(slots[..., None], feats.to(embeds.dtype))


class Lfm2VlForConditionalGeneration(PretrainedMixin, nn.Module):
    config_class = Lfm2VlConfig

    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        self.config = config
        self.model = Lfm2VlModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.tie_weights()

    def sanitize(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        # transformers 5.x dropped SigLIP2's `vision_model.` wrapper; older checkpoints have it.
        name = name.replace("vision_tower.vision_model.", "vision_tower.")
        # Remote-code checkpoints store encoder layers that vision_feature_layer leaves unused.
        prefix = "model.vision_tower.encoder.layers."
        if name.startswith(prefix):
            if int(name[len(prefix):].split(".")[0]) >= self.config.vision_config.num_hidden_layers:
                return []
        return [(name, tensor)]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def make_cache(self) -> Lfm2Cache:
        return Lfm2Cache(self.config.text_config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def get_image_features(self, pixel_values, pixel_attention_mask, spatial_shapes) -> list[torch.Tensor]:
        """Vision tower + projector: one (tokens, D_text) tensor per view, in order."""
        return self.model.get_image_features(pixel_values, pixel_attention_mask, spatial_shapes)

    # The final norm's weight: it stays a float parameter when the projections and the head are
    # swapped for packed or quantized CPU kernels (fastlfm.cpu_linear).
    @property
    def device(self) -> torch.device:
        return self.model.language_model.embedding_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embedding_norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Lfm2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        context=None,
    ) -> CausalLMOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.embed(input_ids, pixel_values, pixel_attention_mask, spatial_shapes)
        out = self.model.language_model(
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            context=context,
        )
        logits = self.lm_head(select_logit_positions(out.last_hidden_state, logits_to_keep))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss, out.past_key_values, out.hidden_states)
