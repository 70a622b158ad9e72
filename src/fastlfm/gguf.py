"""Loading LFM2 GGUF files (llama.cpp's format): config, tokenizer and weights.

The `gguf` package (the format's reference reader, from the llama.cpp project) parses the file;
this module maps it onto fastlfm (spec §5.2 for the names):

- config: `lfm2.*` metadata; the per-layer `attention.head_count_kv` array says which layers
  are attention (non-zero) and which are conv (0); the FFN width is stored final (no auto-adjust).
- tokenizer: `tokenizer.ggml.*` (byte-level BPE, "gpt2" model; pre-tokenizer "lfm2" = the
  Llama-3 split regex, whole words in the vocabulary kept as they are, as llama.cpp does),
  special-token ids and the chat template.
- weights: F32 / F16 / BF16 tensors as float; Q4_0 blocks map exactly onto the symmetric int4
  group-32 kernel ((q - 8) * d, no zeros); Q8_0 blocks (int8 with a scale per 32 values) and the
  Q6_K token embedding llama-quantize writes into Q4_0 files become int8 per output channel,
  re-rounded to one scale per row (the int8 kernel has no group scales) a row at a time, with no
  float copy of the model kept; other block types are de-quantized by `gguf` and stored as int8.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from .cpu_linear import Int4Weight, Int8Weight, QuantizedWeight, naming, quantize_int8, run_quantizer
from .loading import CheckpointError, model_on_meta
from .tokenizer import LFM2_SPLIT_PATTERN  # GGUF pre-type "lfm2"

_LLAMA3_PRE_TYPES = {"lfm2", "llama3", "llama-bpe", "llama-v3", "default"}

_BLOCK_NAMES = {  # GGUF block tensor -> HF module (attention and conv layers)
    "attn_norm": "operator_norm", "ffn_norm": "ffn_norm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.out_proj", "attn_q_norm": "self_attn.q_layernorm",
    "attn_k_norm": "self_attn.k_layernorm",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
    "shortconv.in_proj": "conv.in_proj", "shortconv.out_proj": "conv.out_proj", "shortconv.conv": "conv.conv",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "token_embd_norm": "model.embedding_norm",
                 "output_norm": "model.embedding_norm", "output": "lm_head"}


def is_gguf_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package (pip install 'fastlfm[gguf]')") from None
    try:
        return _fast_reader_class(gguf)(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a damaged file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


@functools.lru_cache(maxsize=None)
def _fast_reader_class(gguf) -> type:
    """gguf.GGUFReader, reading its fields through a plain ndarray view of the file instead of the
    np.memmap (every slice of a memmap runs memmap.__array_finalize__ in Python, and the reader
    slices a few times per element of each array field) and string arrays in one loop: LFM2's
    65,536-token vocabulary and its merges took ~3.3 s to read. The same fields, parts included
    (tests/test_gguf.py compares both readers); the stock reader where its private methods are not
    the ones this replaces."""
    import inspect

    import numpy as np  # comes with the gguf package

    stock = gguf.GGUFReader
    if list(inspect.signature(stock._get).parameters) != ["self", "offset", "dtype", "count", "override_order"] \
            or list(inspect.signature(stock._get_field_parts).parameters) != ["self", "orig_offs", "raw_type"]:
        return stock

    kinds = gguf.GGUFValueType
    string, array = int(kinds.STRING), int(kinds.ARRAY)  # (ints: enum lookups cost per element)

    class FastGGUFReader(stock):
        def _plain(self) -> np.ndarray:
            plain = self.__dict__.get("_plain_data")
            if plain is None:
                plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
            return plain

        def _get(self, offset, dtype, count=1, override_order=None):
            count, dt = int(count), np.dtype(dtype)
            arr = self._plain()[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs, raw_type):
            # An array of strings (the vocabulary, the merges) or of numbers (token types) in one
            # loop, with the parts the stock reader makes: per string its length (uint64) and its
            # bytes, per number a 1-element array.
            if raw_type != array:
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            kind, n_items = int(item_type[0]), int(count[0])
            scalar = self.gguf_scalar_to_np.get(kinds(kind)) if kind != array else None
            if kind != string and scalar is None:  # nested arrays: the stock reader
                return super()._get_field_parts(orig_offs, raw_type)
            plain, offs, parts = self._plain(), orig_offs + 12, [item_type, count]
            if scalar is not None:
                dt = np.dtype(scalar).newbyteorder(self.byte_order)
                whole = plain[offs:offs + dt.itemsize * n_items].view(dt)
                parts += [whole[i:i + 1] for i in range(n_items)]
                types = [kinds.ARRAY, kinds(kind)] if n_items else [kinds.ARRAY]
                return 12 + dt.itemsize * n_items, parts, list(range(2, 2 + n_items)), types
            length, data = np.dtype(np.uint64).newbyteorder(self.byte_order), []
            for _ in range(n_items):
                n = plain[offs:offs + 8].view(length)
                parts += (n, plain[offs + 8:offs + 8 + int(n[0])])
                data.append(len(parts) - 1)
                offs += 8 + int(n[0])
            return offs - orig_offs, parts, data, [kinds.ARRAY, kinds.STRING] if data else [kinds.ARRAY]

    return FastGGUFReader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, path: Path) -> dict[str, Any]:
    """The HF-style config.json dict of an LFM2 GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "lfm2":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (fastlfm reads 'lfm2')")

    def need(key: str) -> Any:
        value = _field(reader, f"lfm2.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lfm2.{key} is missing")
        return value

    layers = int(need("block_count"))
    kv = need("attention.head_count_kv")
    kv = [int(v) for v in kv] if isinstance(kv, list) else [int(kv)] * layers
    if len(kv) != layers:
        raise CheckpointError(f"{path}: lfm2.attention.head_count_kv has {len(kv)} entries for {layers} blocks")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(_field(reader, "lfm2.vocab_size", len(tokens) if tokens else 0))
    return {
        "model_type": "lfm2",
        "architectures": ["Lfm2ForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "block_auto_adjust_ff_dim": False,  # GGUF stores the final FFN width
        "num_hidden_layers": layers,
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": max(kv),
        "layer_types": ["full_attention" if n else "conv" for n in kv],
        "max_position_embeddings": int(_field(reader, "lfm2.context_length", 128000)),
        # float32 in the file: 1e-5 reads back as 9.99999975e-06; 7 digits restore the written value
        "norm_eps": float(f'{_field(reader, "lfm2.attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
        "rope_theta": float(f'{_field(reader, "lfm2.rope.freq_base", 1e6):.7g}'),
        "conv_L_cache": int(_field(reader, "lfm2.shortconv.l_cache", 3)),
        "conv_bias": any(n.endswith("shortconv.conv.bias") for n in names),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", 7),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
    }


def tokenizer_from_gguf(reader, path: Path):
    """A fastlfm Tokenizer from the GGUF vocabulary, merges, special ids and chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    from .tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (LFM2 uses 'gpt2', byte-level BPE)")
    if pre not in _LLAMA3_PRE_TYPES:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (LFM2 uses 'lfm2')")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LFM2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    # Control (3) and user-defined (4) tokens are matched verbatim; control ones are special.
    backend.add_tokens([AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                        for i in range(len(tokens)) if types[i] in (3, 4)])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if bos is not None and _field(reader, "tokenizer.ggml.add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.index(bos))])
    return Tokenizer(backend, special_tokens={"bos_token": bos, "eos_token": token("eos"), "pad_token": token("padding"),
                                              "unk_token": token("unknown")},
                     chat_template=_field(reader, "tokenizer.chat_template"), name_or_path=str(path))


def _hf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if name.startswith("blk."):
        _, idx, rest = base.split(".", 2)
        mapped = _BLOCK_NAMES.get(rest)
        return f"model.layers.{idx}.{mapped}.{suffix}" if mapped else None
    mapped = _GLOBAL_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def _blocks(t, block_bytes: int) -> np.ndarray:
    """A quantized tensor's raw data as (rows, blocks per row, bytes per block)."""
    import numpy as np  # comes with the gguf package

    rows = int(np.prod(t.shape[1:]))
    return np.ascontiguousarray(t.data).reshape(rows, -1, block_bytes)


def _block_rows(t, block_bytes: int) -> torch.Tensor:
    """A quantized tensor's raw blocks as a (rows, bytes) uint8 tensor over the file's mapping (no
    copy: fastlfm's ops only read it)."""
    import warnings

    b = _blocks(t, block_bytes)
    with warnings.catch_warnings():  # (torch warns that the array is read-only)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(b.reshape(b.shape[0], -1))


def _q4_0(t) -> Int4Weight:
    import numpy as np  # comes with the gguf package

    from . import cpu_gemv

    # fp16 scale d, then 16 bytes: value j in the low nibble, j + 16 in the high one
    if cpu_gemv.available():  # (one pass)
        q, d = torch.ops.fastlfm_cpu.q4_0_codes(_block_rows(t, 18))
        return Int4Weight(q, d, None, 32)
    b = _blocks(t, 18)
    d = torch.from_numpy(b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(b[..., 2:].copy())
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(b.shape[0], -1)
    return Int4Weight(q, d, None, 32)  # (q - 8) * d


def _as_int8(t) -> Int8Weight:
    """A quantized tensor as int8 with one scale per row: its values de-quantized, then quantized
    again (`quantize_int8`); Q8_0 and Q6_K (llama-quantize's token embedding) rows in one pass where
    fastlfm's CPU kernels run."""
    import gguf

    from . import cpu_gemv

    kind = gguf.GGMLQuantizationType
    if t.tensor_type in (kind.Q8_0, kind.Q6_K) and cpu_gemv.available():
        blocks = _block_rows(t, 34 if t.tensor_type == kind.Q8_0 else 210)
        return Int8Weight(*run_quantizer(torch.ops.fastlfm_cpu.gguf_blocks_to_int8_rows, blocks, int(t.tensor_type)))
    return quantize_int8(_dequantized(t))


def _dequantized(t) -> torch.Tensor:
    import gguf
    import numpy as np  # comes with the gguf package

    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:  # d * q per block of 32
        b = _blocks(t, 34)
        d = b[..., :2].copy().view(np.float16).astype(np.float32)
        q = b[..., 2:].copy().view(np.int8).astype(np.float32)
        return torch.from_numpy((q * d).reshape(b.shape[0], -1))
    try:
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name}: GGUF type {t.tensor_type.name} is not supported") from None


def _float(t) -> torch.Tensor:
    import gguf
    import numpy as np  # comes with the gguf package

    kind = gguf.GGMLQuantizationType
    if t.tensor_type == kind.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32))
    if t.tensor_type == kind.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16))
    if t.tensor_type == kind.BF16:
        raw = np.ascontiguousarray(t.data).view(np.int16).reshape(tuple(int(n) for n in reversed(t.shape)))
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)  # ggml lists dims innermost first
    return _dequantized(t)


def _is_float(t) -> bool:
    import gguf

    return t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.BF16)


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer an LFM2 GGUF file carries (vocabulary, merges, special ids, chat template)."""
    return tokenizer_from_gguf(_reader(Path(path)), Path(path))


def load_gguf(path: str | os.PathLike, dtype: str | torch.dtype | None = "auto",
              device: str | torch.device | None = None, quantization: str | None = None, cls: type | None = None):
    """(model, tokenizer) of an LFM2 GGUF file, the model of class `cls` (default
    fastlfm.models.Lfm2ForCausalLM). A file whose projections are quantized loads
    onto the CPU int8 / int4 kernels (activations bf16 unless `dtype` says otherwise); a float
    file loads as float (`quantization` may quantize it at load, like a safetensors checkpoint).
    `dtype="auto"`: float32 for F32 and F16 files (exact; "bfloat16" halves the memory), bfloat16
    otherwise."""
    import gguf

    from .cpu_linear import QUANTIZATION_SCHEMES, build_quantized_model, prepare_for_cpu
    from .loading import resolve_device, resolve_dtype
    from .models import Lfm2Config, Lfm2ForCausalLM

    path = Path(path)
    reader = _reader(path)
    raw_config = config_from_gguf(reader, path)
    config = Lfm2Config.from_dict(raw_config)
    cls = cls or Lfm2ForCausalLM
    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r} for LFM2")
        tensors[name] = t
    projection = {n for n in tensors if n.endswith("_proj.weight") or ".feed_forward.w" in n}
    quantized_file = any(not _is_float(tensors[n]) for n in projection)
    # F32 and F16 weights are exact in float32; BF16 and block-quantized files run in bf16.
    exact_in_fp32 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    file_dtype = torch.float32 if all(tensors[n].tensor_type in exact_in_fp32 for n in projection) \
        else torch.bfloat16
    torch_dtype = file_dtype if dtype in (None, "auto") else resolve_dtype(dtype, None)
    device = resolve_device(device or "cpu")
    if quantization is not None and quantization not in QUANTIZATION_SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATION_SCHEMES)}")
    if quantized_file and device.type != "cpu":
        raise ValueError(f"{path}: quantized GGUF weights run on the CPU kernels only (device {device} requested)")
    if quantized_file and quantization is not None:
        raise ValueError(f"{path}: the file is already quantized; load it without quantization=")

    floats: dict[str, torch.Tensor] = {}
    qweights: dict[str, QuantizedWeight] = {}
    kinds = set()
    for name, t in tensors.items():
        is_projection = name in projection or name in ("lm_head.weight", "model.embed_tokens.weight")
        if name.endswith("conv.conv.weight"):  # stored (D, K); the module holds (D, 1, K)
            floats[name] = _float(t).unsqueeze(1)
        elif _is_float(t) or not quantized_file or not is_projection:
            floats[name] = _float(t)
        elif t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and name not in ("lm_head.weight", "model.embed_tokens.weight"):
            qweights[name.removesuffix(".weight")] = _q4_0(t)
            kinds.add("int4")
        else:  # Q8_0 and other block types: int8 per output channel
            with naming(f"{path}: {t.name}"):
                qweights[name.removesuffix(".weight")] = _as_int8(t)
            kinds.add("int8")
    if quantized_file:
        head = qweights.pop("lm_head", None) or qweights.pop("model.embed_tokens", None)
        if "model.embed_tokens" in qweights:  # untied: the input embedding as float
            floats["model.embed_tokens.weight"] = qweights.pop("model.embed_tokens").dequantize()
        scheme = "int4" if "int4" in kinds else "int8"
        model = build_quantized_model(cls, config, floats, qweights, head, torch_dtype, scheme)
    else:
        model = model_on_meta(cls, config)
        expected = model.state_dict()
        missing = [k for k in expected if k not in floats and k != "lm_head.weight"]
        if missing:
            raise CheckpointError(f"{path}: tensors missing from the GGUF file: {', '.join(missing[:10])}")
        for k, v in floats.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{path}: tensor {k} has shape {tuple(v.shape)}, the metadata implies "
                                      f"{tuple(expected[k].shape)}")
        model.load_state_dict({k: v.to(device=device, dtype=torch_dtype) for k, v in floats.items()},
                              strict=False, assign=True)
        model.model.reset_buffers(device)
        model.tie_weights()
        if quantization is not None:
            prepare_for_cpu(model, quantization)
    model.generation_config = {k: raw_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.name_or_path = str(path)
    return model.eval(), tokenizer_from_gguf(reader, path)
