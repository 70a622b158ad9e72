"""`Lfm2Config`: reads every `config.json` variant of the LFM2 family (spec §1)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

DEFAULT_ROPE_THETA = 1_000_000.0

# Legacy Liquid keys -> current keys. The legacy key wins where the spec says so.
_LEGACY_WINS = {"block_ff_dim": "intermediate_size", "tie_embedding": "tie_word_embeddings"}
# Legacy keys used only when the current key is missing.
_LEGACY_FALLBACK = {
    "block_dim": "hidden_size",
    "num_heads": "num_attention_heads",
    "block_norm_eps": "norm_eps",
}


class ConfigError(ValueError):
    """A config.json that cannot describe an LFM2 model."""


@dataclass
class Lfm2Config:
    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 128_000
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_theta: float = DEFAULT_ROPE_THETA
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    layer_types: list[str] | None = None
    model_type: str = "lfm2"
    torch_dtype: str | None = None
    # Keys we do not interpret, kept so save_pretrained round-trips the file.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    MODEL_TYPE: ClassVar[str] = "lfm2"
    ARCHITECTURE: ClassVar[str] = "Lfm2ForCausalLM"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )

    # -- derived -----------------------------------------------------------------
    @property
    def ffn_dim(self) -> int:
        """Effective SwiGLU width (spec §1.2)."""
        width = self.intermediate_size
        if not self.block_auto_adjust_ff_dim:
            return width
        width = int(2 * width / 3)
        if self.block_ffn_dim_multiplier is not None:
            width = int(self.block_ffn_dim_multiplier * width)
            m = self.block_multiple_of
            width = ((width + m - 1) // m) * m
        return width

    def is_attention_layer(self, idx: int) -> bool:
        # transformers 5.x treats every non-"conv" type as attention.
        return self.layer_types[idx] != "conv"

    @property
    def attention_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_attention_layer(i)]

    @property
    def conv_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.is_attention_layer(i)]

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    # -- (de)serialisation ---------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Lfm2Config":
        raw = dict(raw)
        model_type = raw.setdefault("model_type", cls.MODEL_TYPE)
        if model_type != cls.MODEL_TYPE:
            raise ConfigError(f"unsupported model_type {model_type!r}: this class reads {cls.MODEL_TYPE!r} configs")
        for legacy, current in _LEGACY_WINS.items():
            if legacy in raw:
                raw[current] = raw.pop(legacy)
        for legacy, current in _LEGACY_FALLBACK.items():
            if legacy in raw and current not in raw:
                raw[current] = raw[legacy]
        # RoPE theta: `rope_parameters` (5.x) > top-level `rope_theta`; legacy `theta` as last resort.
        # Either dict (or 4.x's `rope_scaling`, whose key is "type" in older files) may ask for scaled
        # positions, which LFM2 does not use: refused rather than run as plain RoPE.
        ropes = []
        for key in ("rope_parameters", "rope_scaling"):
            r = raw.pop(key, None)
            if not r:
                continue
            if not isinstance(r, dict):
                raise ConfigError(f"config.json {key} must be an object (rope_type, rope_theta), got {r!r}")
            ropes.append(r)
            kind = r.get("rope_type", r.get("type", "default"))
            if kind not in ("default", None):
                raise ConfigError(f"unsupported RoPE scaling {kind!r} (config.json {key}): LFM2 uses the default RoPE")
        top_theta = raw.pop("rope_theta", raw.get("theta", DEFAULT_ROPE_THETA))
        theta = next((r["rope_theta"] for r in ropes if "rope_theta" in r), top_theta)
        raw["rope_theta"] = float(theta)
        if raw.get("layer_types") is None:
            cls._check_layer_types_derivable(raw)
            n = raw.get("num_hidden_layers", cls.num_hidden_layers)
            attn = raw.get("full_attn_idxs")
            attn = set(range(n)) if attn is None else set(attn)
            raw["layer_types"] = ["full_attention" if i in attn else "conv" for i in range(n)]
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in known}
        try:
            return cls(**kwargs)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(str(e)) from None

    @classmethod
    def _check_layer_types_derivable(cls, raw: dict[str, Any]) -> None:
        """Dense LFM2 derives layer_types from full_attn_idxs (or all-attention)."""

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Lfm2Config":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON ({e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict (what transformers writes), keeping unknown keys."""
        out = {k: v for k, v in self.extra.items() if k not in ("full_attn_idxs", "theta")}
        data = asdict(self)
        data.pop("extra")
        theta = data.pop("rope_theta")
        if data.get("torch_dtype") is None:
            data.pop("torch_dtype")
        out.update(data)
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        out["architectures"] = [self.ARCHITECTURE]
        out["full_attn_idxs"] = self.attention_layer_ids
        return out

    def save(self, folder: str | os.PathLike) -> None:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
