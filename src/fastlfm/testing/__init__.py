"""Development helpers: HF-format LFM2 checkpoints with random weights and real shapes.

No hub download is needed to test or benchmark: `write_checkpoint` writes what a real
checkpoint folder holds (config.json in the released key style, safetensors, tokenizer
files with the real special-token ids, generation_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Released dense checkpoints (spec §2.1), in the key style of their config.json files.
_DENSE = {
    "LFM2-350M": dict(hidden=1024, layers=16, heads=16, ff=6656, attn=[2, 5, 8, 10, 12, 14]),
    "LFM2-700M": dict(hidden=1536, layers=16, heads=24, ff=10240, attn=[2, 5, 8, 10, 12, 14]),
    "LFM2-1.2B": dict(hidden=2048, layers=16, heads=32, ff=12288, attn=[2, 5, 8, 10, 12, 14]),
    "LFM2-2.6B": dict(hidden=2048, layers=30, heads=32, ff=10752, attn=[2, 5, 9, 13, 17, 21, 24, 27],
                      auto_adjust=False),
}


def real_config(name: str, **overrides: Any) -> dict[str, Any]:
    """config.json of a released dense LFM2 model, with legacy and current keys as shipped."""
    spec = _DENSE[name]
    hidden, heads = spec["hidden"], spec["heads"]
    cfg = {
        "architectures": ["Lfm2ForCausalLM"],
        "block_auto_adjust_ff_dim": spec.get("auto_adjust", True),
        "block_dim": hidden,
        "block_ff_dim": spec["ff"],
        "block_ffn_dim_multiplier": 1.0,
        "block_mlp_init_scale": 1.0,
        "block_multiple_of": 256,
        "block_norm_eps": 1e-05,
        "block_out_init_scale": 1.0,
        "block_use_swiglu": True,
        "block_use_xavier_init": True,
        "bos_token_id": 1,
        "conv_L_cache": 3,
        "conv_bias": False,
        "conv_dim": hidden,
        "conv_dim_out": hidden,
        "conv_use_xavier_init": True,
        "eos_token_id": 7,
        "full_attn_idxs": spec["attn"],
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec["ff"],
        "max_position_embeddings": 128000,
        "model_type": "lfm2",
        "norm_eps": 1e-05,
        "num_attention_heads": heads,
        "num_heads": heads,
        "num_hidden_layers": spec["layers"],
        "num_key_value_heads": 8,
        "pad_token_id": 0,
        "rope_theta": 1000000.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_pos_enc": True,
        "vocab_size": 65536,
    }
    cfg.update(overrides)
    return cfg


def tiny_config(name: str = "LFM2-350M", hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                vocab_size: int = 1024, **overrides: Any) -> dict[str, Any]:
    """The layer pattern of a released model at a small width (same keys, same rules)."""
    spec = _DENSE[name]
    ff = spec["ff"] * hidden // spec["hidden"]
    cfg = real_config(name, block_dim=hidden, hidden_size=hidden, conv_dim=hidden, conv_dim_out=hidden,
                      num_attention_heads=heads, num_heads=heads, num_key_value_heads=kv_heads,
                      block_ff_dim=ff, intermediate_size=ff, block_multiple_of=32, vocab_size=vocab_size,
                      torch_dtype="float32")
    cfg.update(overrides)
    return cfg


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}


def write_checkpoint(folder: str | Path, config: dict[str, Any] | None = None, seed: int = 0,
                     dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                     perturb: bool = True) -> Path:
    """Write an HF-format LFM2 checkpoint with random weights.

    `perturb` gives the norms non-unit weights and the pad row a non-zero embedding so
    that tests notice a norm applied wrongly or padding that leaks.
    """
    from ..models import MODEL_TYPES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config())
    cls = MODEL_TYPES[config.get("model_type", "lfm2")]
    model = cls(cls.config_class.from_dict(config))
    model.init_weights(seed)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            model.model.embed_tokens.weight[config.get("pad_token_id", 0) or 0].normal_(0, 0.02, generator=gen)
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):  # so that choosing experts by a biased score shows
                    b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    model.to(dtype)
    model.generation_config = dict(GENERATION_CONFIG)
    model.save_pretrained(folder)
    # Keep the config.json exactly in the released style (legacy keys and all).
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        from .tokenizer_files import write_tokenizer_files

        write_tokenizer_files(folder, vocab_size=config["vocab_size"])
    return folder


# LFM2-MoE checkpoints. 8B-A1B: spec §2.2. 24B-A2B: its model card gives 40 layers (30 conv + 10
# attention), 64 experts with top-4, the first 2 layers dense, hidden 2048, expert width 1536, vocab 65536;
# its dense FFN width and attention layer indices were not collected: assumed 7168 (as 8B-A1B) and an
# attention layer every 4 (which layers they are does not change the cost of a step).
_MOE = {
    "LFM2-8B-A1B": dict(layers=24, attn=[2, 6, 10, 14, 18, 21], experts=32, moe_ff=1792),
    "LFM2-24B-A2B": dict(layers=40, attn=[2, 6, 10, 14, 18, 22, 26, 30, 34, 37], experts=64, moe_ff=1536),
}
MOE_SHAPES = tuple(_MOE)  # the released LFM2-MoE shapes real_moe_config knows


def real_moe_config(name: str, **overrides: Any) -> dict[str, Any]:
    """config.json (HF-native keys) of a released LFM2-MoE model (see _MOE for what is assumed)."""
    spec = _MOE[name]
    layer_types = ["full_attention" if i in spec["attn"] else "conv" for i in range(spec["layers"])]
    cfg = tiny_moe_config(
        vocab_size=65536, hidden_size=2048, intermediate_size=7168, moe_intermediate_size=spec["moe_ff"],
        num_hidden_layers=spec["layers"], num_attention_heads=32, num_key_value_heads=8, num_dense_layers=2,
        num_experts=spec["experts"], num_experts_per_tok=4, layer_types=layer_types, torch_dtype="bfloat16")
    cfg.update(overrides)
    return cfg


def tiny_moe_config(**overrides: Any) -> dict[str, Any]:
    """An LFM2-8B-A1B-pattern config.json (HF-native keys) at a small width."""
    cfg = {
        "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "vocab_size": 1024,
        "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 48, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_dense_layers": 2, "num_experts": 8,
        "num_experts_per_tok": 3, "use_expert_bias": True, "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "conv_L_cache": 3, "conv_bias": False, "norm_eps": 1e-5,
        "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "max_position_embeddings": 128000,
        "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def tiny_vl_config(text: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """An HF-native LFM2-VL config.json at a small width (LFM2-VL-450M layout)."""
    cfg = {
        "architectures": ["Lfm2VlForConditionalGeneration"],
        "model_type": "lfm2_vl",
        "image_token_id": 396,
        "downsample_factor": 2,
        "projector_hidden_act": "gelu",
        "projector_hidden_size": 96,
        "projector_bias": True,
        "projector_use_layernorm": True,
        "tie_word_embeddings": True,
        "vision_config": {
            "model_type": "siglip2_vision_model", "hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_channels": 3, "patch_size": 16,
            "num_patches": 256, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        },
        "text_config": text or tiny_config("LFM2-350M"),
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def write_vl_checkpoint(folder: str | Path, config: dict[str, Any] | None = None, seed: int = 0,
                        tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write an HF-format LFM2-VL checkpoint with random weights (and the LFM2 tokenizer),
    stored in `dtype`."""
    from ..models import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_vl_config())
    model = Lfm2VlForConditionalGeneration(Lfm2VlConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.to(dtype)
    model.generation_config = dict(GENERATION_CONFIG)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        from .tokenizer_files import write_tokenizer_files

        write_tokenizer_files(folder, vocab_size=config["text_config"]["vocab_size"])
    return folder


def random_model(config: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0):
    """A model of `config` (a config.json dict) with random weights made directly on `device` in
    `dtype`, with no checkpoint on disk and no float32 copy in host memory (benchmarks of the real
    shapes: LFM2-24B-A2B is 48 GB in bf16). Values as `write_checkpoint`'s: N(0, initializer_range)
    weights, norms 1 + N(0, 0.2), a small random expert bias."""
    from ..models import MODEL_TYPES

    cls = MODEL_TYPES[config.get("model_type", "lfm2")]
    cfg = cls.config_class.from_dict(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)  # parameters in `dtype`; buffers as the model made them (fp32 expert bias)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = cfg.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.1, generator=gen)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device(device))
    model.tie_weights()
    model.generation_config = dict(GENERATION_CONFIG)
    return model.eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """The oracle of the engine tests: greedy continuation of one prompt, one token at a time over
    the model's own cache (no engine, no batching, no paging)."""
    with torch.no_grad():
        cache, ids, out = model.make_cache(), torch.tensor([prompt], device=model.device), []
        for _ in range(n):
            t = int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
            out.append(t)
            ids = torch.tensor([[t]], device=model.device)
    return out


def anon_huge_page_bytes(t: torch.Tensor) -> int:
    """AnonHugePages of the memory mapping that holds t's first byte (/proc/self/smaps, Linux), in
    bytes. The kernel merges neighbouring anonymous mappings, so this may count more than t."""
    addr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    raise ValueError("no mapping holds the tensor")
