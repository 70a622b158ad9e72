"""GGUF import (fastlfm.gguf): LFM2 GGUF files written from a fixture checkpoint in llama.cpp's
converter layout (fastlfm.testing.gguf_files, with the `gguf` package's own writer and block
quantizers) load with the same config, tokenizer and logits as the safetensors model, within
the format's rounding. Oracle for block formats: the `gguf` package's de-quantizer."""

import json

import gguf  # a test dependency (pyproject's test extra): the format's reference reader and quantizers
import numpy as np
import pytest
import torch

from fastlfm import LLM, load_model
from fastlfm.cpu_linear import Int4Linear, Int8Linear
from fastlfm.loading import CheckpointError
from fastlfm.testing.gguf_files import gguf_name, write_gguf
from fastlfm.tokenizer import Tokenizer

TEXT = "Hello world, it's 2026!\n\n  def f(x):\treturn x**2 <|im_start|>user\nhi<|im_end|> ünïcödé 日本語 123456"


@pytest.fixture(scope="module")
def ids():
    return torch.randint(10, 1000, (1, 23), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def files(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: write_gguf(tiny_ckpt, out / f"tiny-{t}.gguf", t) for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0")}


def test_f32_gguf_equals_safetensors(tiny_ckpt, files, ids):
    ref = load_model(tiny_ckpt, dtype=torch.float32)
    model = load_model(files["F32"])
    assert model.dtype == torch.float32
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "ffn_dim",
                "layer_types", "rope_theta", "norm_eps", "conv_L_cache", "vocab_size", "tie_word_embeddings"):
        assert getattr(model.config, key) == getattr(ref.config, key), key
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_f16_gguf_is_exact_in_fp32(tiny_ckpt, files, ids):
    ref = load_model(tiny_ckpt, dtype=torch.float32)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:  # the file stores matrices in F16 (norms and the conv kernel in F32)
                p.copy_(p.half().float())
    model = load_model(files["F16"])
    assert model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_gguf_tokenizer_equals_the_checkpoint_tokenizer(tiny_ckpt, files):
    ref = Tokenizer.from_pretrained(tiny_ckpt)
    tok = LLM(files["Q4_0"]).tokenizer
    assert tok.encode(TEXT) == ref.encode(TEXT)
    assert tok.encode(TEXT, add_special_tokens=False) == ref.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ref.encode(TEXT)) == ref.decode(ref.encode(TEXT))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        ref.apply_chat_template(messages, add_generation_prompt=True)


def test_bf16_gguf_equals_safetensors_in_bf16(tiny_ckpt, files, ids):
    ref = load_model(tiny_ckpt, dtype=torch.bfloat16)
    model = load_model(files["BF16"])
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def _gguf_dequantized_model(tiny_ckpt, path):
    """The fp32 model with every weight replaced by the gguf package's de-quantization of the
    file's tensor: what a GGUF runtime computes with these blocks."""
    ref = load_model(tiny_ckpt, dtype=torch.float32)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            t = tensors[gguf_name(name)]
            deq = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            p.copy_(torch.from_numpy(deq).reshape(p.shape))
    return ref


@pytest.mark.parametrize("kind,module,bound", [("Q4_0", Int4Linear, 0.03), ("Q8_0", Int8Linear, 0.05)])
def test_quantized_gguf_runs_its_blocks_on_the_quantized_kernels(tiny_ckpt, files, ids, kind, module, bound):
    model = load_model(files[kind])
    assert model.cpu_linears == ("int4" if kind == "Q4_0" else "int8")
    assert isinstance(model.model.layers[0].feed_forward.w13_weight, module)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens(ids).dtype == torch.bfloat16
    oracle = _gguf_dequantized_model(tiny_ckpt, files[kind])
    with torch.no_grad():
        got, want = model(ids).logits.float(), oracle(ids).logits
    # Q4_0 maps exactly (bf16 activations and scales remain); Q8_0 is re-rounded to one scale per row
    # and the embedding / head to int8.
    assert (got - want).abs().max() < bound * want.abs().max()


def test_llm_and_engine_load_a_gguf_file(files):
    llm = LLM(str(files["Q4_0"]))
    out = llm.generate(["Hello", "Hi there"], max_new_tokens=4, ignore_eos=True)  # a batch: the engine
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert llm.tokenizer.eos_token_id == 7


def test_bad_gguf_files_get_clear_errors(tiny_ckpt, files, tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(files["F32"].read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        load_model(bad)
    other = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(other), "llama")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not supported"):
        load_model(other)
    with pytest.raises(ValueError, match="already quantized"):
        load_model(files["Q8_0"], quantization="int4")


def test_cli_generate_reads_gguf(files, capsys):
    from fastlfm.cli import main

    assert main(["generate", str(files["Q8_0"]), "Hello", "--raw", "--max-new-tokens", "3", "--ignore-eos", "-q"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["generate", str(files["F32"]), "Hi", "--raw", "--max-new-tokens", "2", "-q",
                 "--quantization", "int4"]) == 0


def test_gguf_metadata_matches_llama_cpp_layout(files):
    """The fields llama.cpp reads for LFM2 (llama-arch / llama-model), as this writer stores them."""
    reader = gguf.GGUFReader(str(files["F32"]))
    fields = {k: reader.fields[k].contents() for k in reader.fields}
    assert fields["general.architecture"] == "lfm2"
    assert fields["lfm2.attention.head_count_kv"] == [0, 0, 2, 0, 0, 2, 0, 0, 2, 0, 2, 0, 2, 0, 2, 0]
    assert fields["tokenizer.ggml.pre"] == "lfm2" and fields["tokenizer.ggml.model"] == "gpt2"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "token_embd_norm.weight", "blk.0.shortconv.conv.weight",
            "blk.2.attn_q_norm.weight"} <= names and "output.weight" not in names
    conv = next(t for t in reader.tensors if t.name == "blk.0.shortconv.conv.weight")
    assert conv.data.shape == (64, 3)  # stored 2-D
    json.dumps(fields["lfm2.attention.head_count_kv"])


def test_engine_from_pretrained_and_serve_flag(files, tiny_ckpt):
    from fastlfm.engine import LLMEngine
    from fastlfm.server import build_parser

    engine = LLMEngine.from_pretrained(str(files["Q4_0"]), max_num_seqs=2)
    assert engine.tokenizer is not None and engine.model.cpu_linears == "int4"
    assert LLMEngine.from_pretrained(str(tiny_ckpt), quantization="int8", max_num_seqs=2).model.cpu_linears == "int8"
    assert build_parser().parse_args(["model", "--quantization", "int4"]).quantization == "int4"


def test_transformers_style_entry_points_read_a_gguf_file(tiny_ckpt, files):
    """AutoTokenizer and pipeline() on a .gguf path: the file's own tokenizer (equal to the checkpoint's),
    and the pipeline's greedy text equals model.generate's on the same file."""
    from fastlfm import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(files["F32"])
    assert tok.encode(TEXT) == Tokenizer.from_pretrained(tiny_ckpt).encode(TEXT)
    messages = [{"role": "user", "content": "hi"}]
    out = pipeline("text-generation", files["F32"])(messages, max_new_tokens=6, do_sample=False)
    model = AutoModelForCausalLM.from_pretrained(files["F32"])
    ids = torch.tensor([tok.apply_chat_template(messages, add_generation_prompt=True)])
    want = tok.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:],
                      skip_special_tokens=True)
    assert out[0]["generated_text"][-1] == {"role": "assistant", "content": want}


def test_the_faster_reader_reads_what_the_gguf_package_reads(files):
    """fastlfm reads GGUF files through a subclass of gguf.GGUFReader (fields through a plain array
    view of the file): every field and tensor equals the stock reader's."""
    import gguf
    import numpy as np

    from fastlfm.gguf import _reader

    for kind in ("BF16", "Q4_0"):
        stock, fast = gguf.GGUFReader(str(files[kind])), _reader(files[kind])
        assert type(fast) is not gguf.GGUFReader and list(stock.fields) == list(fast.fields)
        for key, field in stock.fields.items():
            a, b = field.contents(), fast.fields[key].contents()
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), key
            other = fast.fields[key]  # and the parts the contents come from
            assert (field.offset, field.data, field.types) == (other.offset, other.data, other.types), key
            assert [type(t) for t in field.types] == [type(t) for t in other.types], key
            assert len(field.parts) == len(other.parts), key
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(field.parts, other.parts)), key
        assert [(t.name, t.tensor_type, tuple(t.shape)) for t in stock.tensors] == \
               [(t.name, t.tensor_type, tuple(t.shape)) for t in fast.tensors]
        assert all(np.array_equal(a.data, b.data) for a, b in zip(stock.tensors, fast.tensors))


def test_q8_0_rows_in_one_pass_equal_dequantize_then_quantize(files):
    """Q8_0 projections become int8 per row in one pass where fastlfm's kernels run: the codes and
    scales of de-quantizing the blocks (the format's d * q) and quantizing that again."""
    import gguf

    from fastlfm import cpu_gemv
    from fastlfm.cpu_linear import quantize_int8
    from fastlfm.gguf import _as_int8, _dequantized, _reader

    if not cpu_gemv.available():
        pytest.skip("fastlfm's CPU kernels do not run here (the other path is the oracle itself)")
    q8 = [t for t in _reader(files["Q8_0"]).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0]
    assert len(q8) > 5
    for t in q8:
        fast, ref = _as_int8(t), quantize_int8(_dequantized(t))
        assert torch.equal(fast.q, ref.q) and torch.equal(fast.scale, ref.scale), t.name


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K"])
def test_block_rows_to_int8_equal_the_gguf_packages_dequantize_then_quantize(kind):
    """Random blocks of each type (Q6_K: what llama-quantize writes for the token embedding of a
    Q4_0 file) through fastlfm's one-pass op give the int8 codes and scales of the `gguf` package's
    de-quantization followed by `quantize_int8`."""
    import gguf
    import numpy as np

    from fastlfm import cpu_gemv
    from fastlfm.cpu_linear import quantize_int8

    if not cpu_gemv.available():
        pytest.skip("fastlfm's CPU kernels do not run here (the other path is the oracle itself)")
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    block_bytes, d_at = (34, 0) if kind == "Q8_0" else (210, 208)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(24, 4, block_bytes), dtype=np.uint8)  # 24 rows of 4 blocks
    raw[..., d_at:d_at + 2] = (rng.random((24, 4, 1)) * 0.02).astype(np.float16).view(np.uint8)
    raw = raw.reshape(24, -1)
    ref = quantize_int8(torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)))
    q, scale = torch.ops.fastlfm_cpu.gguf_blocks_to_int8_rows(torch.from_numpy(raw), int(qtype))
    assert q.shape == ref.q.shape and torch.equal(q, ref.q) and torch.equal(scale, ref.scale)


def test_q4_0_codes_in_one_pass_equal_the_numpy_unpacking(files, monkeypatch):
    """Q4_0 blocks unpack to the same int4 codes and scales through fastlfm's op as through numpy."""
    import gguf

    from fastlfm import cpu_gemv
    from fastlfm.gguf import _q4_0, _reader

    if not cpu_gemv.available():
        pytest.skip("fastlfm's CPU kernels do not run here (the other path is the oracle itself)")
    q4 = [t for t in _reader(files["Q4_0"]).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert len(q4) > 5
    fast = [_q4_0(t) for t in q4]
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    for t, a in zip(q4, fast):
        b = _q4_0(t)
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and a.zero is b.zero is None, t.name
