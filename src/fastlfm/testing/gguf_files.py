"""GGUF files from HF-format LFM2 checkpoints, for tests (written with the `gguf` package).

The layout is the one llama.cpp's converter writes for LFM2: `lfm2.*` metadata with a per-layer
`attention.head_count_kv` array (0 = conv layer) and the final FFN width, `tokenizer.ggml.*`
(gpt2 BPE, pre-tokenizer "lfm2"), tensors named `token_embd`, `token_embd_norm`, `blk.N.*`
(`shortconv.conv` stored 2-D), norms and the conv kernel in F32, the other weights in the chosen
type. Block quantization (Q8_0 / Q4_0) is the `gguf` package's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "BF16": 32}  # llama.cpp's LlamaFileType

_BLOCK = {  # HF module -> GGUF block tensor
    "operator_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_output", "self_attn.q_layernorm": "attn_q_norm",
    "self_attn.k_layernorm": "attn_k_norm", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down", "conv.in_proj": "shortconv.in_proj", "conv.out_proj": "shortconv.out_proj",
    "conv.conv": "shortconv.conv",
}


def gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        idx, module = base[len("model.layers."):].split(".", 1)
        return f"blk.{idx}.{_BLOCK[module]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.embedding_norm": "token_embd_norm",
            "lm_head": "output"}[base] + f".{suffix}"


def write_gguf(folder: str | Path, out: str | Path, weight_type: str = "F32", embed_type: str | None = None) -> Path:
    """Convert the checkpoint in `folder` to an LFM2 GGUF file `out`. `weight_type`: F32, F16,
    BF16, Q8_0 or Q4_0 for the projection weights; `embed_type` for the token embedding (default
    the same)."""
    import gguf
    from safetensors.torch import load_file

    from ..models import Lfm2Config

    folder, out = Path(folder), Path(out)
    raw = json.loads((folder / "config.json").read_text())
    cfg = Lfm2Config.from_dict(raw)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    qtype = gguf.GGMLQuantizationType

    w = gguf.GGUFWriter(str(out), "lfm2")
    w.add_name(folder.name)
    w.add_file_type(_FILE_TYPES[weight_type])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.num_key_value_heads if cfg.is_attention_layer(i) else 0
                         for i in range(cfg.num_hidden_layers)])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_shortconv_l_cache(cfg.conv_L_cache)
    _add_tokenizer(w, folder)

    for name, t in tensors.items():
        data = t.float()
        if name.endswith("conv.conv.weight"):
            data = data.squeeze(1)
        target = embed_type or weight_type if name == "model.embed_tokens.weight" else weight_type
        if data.dim() <= 1 or name.endswith("norm.weight") or name.endswith("conv.conv.weight"):
            target = "F32"
        arr = data.numpy()
        if target == "F32":
            w.add_tensor(gguf_name(name), arr.astype(np.float32))
        elif target == "F16":
            w.add_tensor(gguf_name(name), arr.astype(np.float16))
        else:
            kind = getattr(qtype, target)
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tokenizer(w, folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("lfm2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # CONTROL / NORMAL
    w.add_token_merges(merges)
    gen = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
    w.add_bos_token_id(gen.get("bos_token_id", 1))
    w.add_eos_token_id(gen.get("eos_token_id", 7))
    w.add_pad_token_id(gen.get("pad_token_id", 0))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    template = folder / "chat_template.jinja"
    if template.is_file():
        w.add_chat_template(template.read_text(encoding="utf-8"))
