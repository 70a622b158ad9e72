"""CPU kernel modules (fastlfm.cpu_linear): pre-packed fp32/bf16 and weight-only int8 / int4.

Oracles: F.linear on the float weight, hand de-quantization (the scheme's formula), the fp32
model with de-quantized weights (what the quantized model must compute, up to bf16
activations), and the original fp32 model (the quantization error bound)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from fastlfm import cpu_linear
from fastlfm.cpu_linear import (FusedAway, Int4Linear, Int8Embedding, Int8Linear, PackedLinear, PlainLinear,
                                choose_float_kernels, measure_float_kernels, prepare_for_cpu, quantize_int4,
                                quantize_int8, save_quantized)
from fastlfm.models import Lfm2ForCausalLM, load_model
from fastlfm.sampling import SamplingParams


@pytest.fixture(scope="module")
def fp32_model(tiny_ckpt):
    return Lfm2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(10, 1000, (2, 17), generator=torch.Generator().manual_seed(3))


def _weight(N=96, K=128, seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_packed_linear_matches_f_linear():
    w, x = _weight(), torch.randn(3, 5, 128)
    torch.testing.assert_close(PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    wb, xb = w.bfloat16(), x.bfloat16()
    torch.testing.assert_close(PackedLinear(wb)(xb).float(), F.linear(xb, wb).float(), rtol=2e-2, atol=2e-2)


def test_int8_quantization_error():
    w = _weight()
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (96,)
    # Round to nearest: every weight within half a step of its row's scale.
    assert ((q.dequantize() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_min_max_quantization_error(group):
    w = _weight(seed=1)
    q = quantize_int4(w, group, symmetric=False)
    assert q.q.max() <= 15 and q.scale.shape == q.zero.shape == (96, 128 // group)
    groups = (q.dequantize() - w).abs().view(96, -1, group)
    assert (groups <= q.scale[..., None] / 2 + 1e-6).all()  # within half a step of the group's scale


@pytest.mark.parametrize("group", [32, 64])
def test_int4_symmetric_quantization_is_q4_0(group):
    """The default int4 is GGUF's Q4_0 (llama.cpp's reference quantizer, written out here: d = m / -8
    for the group's value m of largest magnitude, code = min(15, trunc(w / d + 8.5))), up to the
    scale's rounding to bf16 (the kernels' scale dtype), and errs by at most half a step but where the
    level 8 (= -7/8 m) clamps the far side."""
    w = _weight(seed=1)
    w[0, :group] = 0  # an all-zero group: codes 8, value 0
    q = quantize_int4(w, group)
    assert q.zero is None and q.q.max() <= 15 and q.scale.shape == (96, 128 // group)
    wg = w.view(96, -1, group)
    m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))
    d = (m / -8).bfloat16().float()
    d_safe = torch.where(d == 0, torch.ones_like(d), d)
    codes = torch.where(d == 0, 8.0, (wg / d_safe + 8.5).floor().clamp(0, 15))
    assert torch.equal(q.q.view(96, -1, group).float(), codes)
    err = (q.dequantize() - w).abs().view(96, -1, group)
    step = q.scale.abs()[..., None]
    assert (err <= torch.maximum(step / 2, wg.abs() - 7 * step) + 1e-6).all()
    assert torch.equal(q.dequantize()[0, :group], torch.zeros(group))


def test_quantizing_by_row_chunks_is_the_whole_weight_at_once(monkeypatch):
    """Quantization runs over chunks of rows (cache-sized temporaries): with chunks of 7 rows (an uneven
    last one) the codes and scales equal one chunk of all rows, within the rounding bound above, and the
    weight (fp32: no copy on the way in otherwise) is left as it was."""
    import fastlfm.cpu_linear as cpu_linear

    w = _weight(seed=3)  # fp32 (96, 128)
    before = w.clone()
    whole8, whole4 = quantize_int8(w), quantize_int4(w, 32)
    monkeypatch.setattr(cpu_linear, "_QUANT_CHUNK_BYTES", 7 * 4 * w.shape[1])
    part8, part4 = quantize_int8(w), quantize_int4(w, 32)
    assert torch.equal(w, before)
    assert torch.equal(part8.q, whole8.q) and torch.equal(part8.scale, whole8.scale)
    assert all(torch.equal(getattr(part4, f), getattr(whole4, f)) for f in ("q", "scale"))
    whole4z = quantize_int4(w, 32, symmetric=False)
    part4z = quantize_int4(w, 32, symmetric=False)
    assert all(torch.equal(getattr(part4z, f), getattr(whole4z, f)) for f in ("q", "scale", "zero"))
    assert ((part8.dequantize() - w).abs() <= part8.scale[:, None] / 2 + 1e-7).all()


# The kernel modules (Int8Linear, Int4Linear, Int8Embedding, PlainLinear) on both kernel paths:
# tests/test_cpu_gemv.py.


def test_packed_fp32_model_equals_plain(fp32_model, ids):
    model = prepare_for_cpu(copy.deepcopy(fp32_model), pack=True)
    assert isinstance(model.model.layers[2].self_attn.qkv_weight, PackedLinear)
    assert isinstance(model.model.layers[2].self_attn.q_proj, FusedAway)
    assert isinstance(model.lm_head, PackedLinear) and model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp32_model(ids).logits, rtol=1e-5, atol=1e-5)


def _dequantized_copy(model, scheme, group=32, symmetric=True):
    """The fp32 model with every projection replaced by its de-quantized weight (the oracle of
    what the quantized model computes) and the head / embedding de-quantized from int8."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                q = quantize_int8(m.weight) if scheme == "int8" else quantize_int4(m.weight, group, symmetric)
                m.weight.copy_(q.dequantize())
        ref.model.embed_tokens.weight.copy_(quantize_int8(ref.model.embed_tokens.weight).dequantize())
    return ref


@pytest.mark.parametrize("scheme,rel_bound", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_model_logits(fp32_model, ids, scheme, rel_bound):
    model = prepare_for_cpu(copy.deepcopy(fp32_model), scheme)
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, Int8Embedding)
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert isinstance(model.model.layers[0].feed_forward.w13_weight, kind)
    with torch.no_grad():
        got = model(ids).logits
        oracle = _dequantized_copy(fp32_model, scheme)(ids).logits
        exact = fp32_model(ids).logits
    scale = exact.abs().max()
    # The kernels compute the de-quantized model (up to the inputs they multiply: int8 blocks with
    # fastlfm's kernels, bf16 with torch's) ...
    assert (got - oracle).abs().max() < 0.03 * scale
    # ... and the quantization error against fp32 stays bounded.
    assert (got - exact).abs().max() < rel_bound * scale


def test_quantized_engine_tokens_match_the_same_model_stepwise(tiny_ckpt):
    """The engine (paged KV, conv slots, chunked prefill) on an int4 model gives the tokens of that
    model's own cache-free full forward, token by token."""
    from fastlfm.engine import LLMEngine

    model = load_model(tiny_ckpt, quantization="int4")
    prompts = [[5, 9, 200, 31, 7, 400], [17] * 3]
    engine = LLMEngine(model, max_num_seqs=4, max_num_batched_tokens=4)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out.token_ids == seq[len(p):]


def test_a_saved_min_max_int4_checkpoint_loads_with_its_zeros(fp32_model, ids, tmp_path, monkeypatch):
    """int4 with a zero per group (what fastlfm saved before its int4 became symmetric) loads and
    computes its de-quantized model."""
    from safetensors import safe_open

    monkeypatch.setattr(cpu_linear, "quantize_int4",
                        lambda w, group_size=32: quantize_int4(w, group_size, symmetric=False))
    save_quantized(fp32_model, tmp_path, "int4")
    monkeypatch.undo()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.endswith(".zeros") for k in f.keys())
    loaded = load_model(tmp_path)
    assert loaded.cpu_linears == "int4"
    with torch.no_grad():
        got = loaded(ids).logits
        oracle = _dequantized_copy(fp32_model, "int4", symmetric=False)(ids).logits
        symmetric = _dequantized_copy(fp32_model, "int4")(ids).logits
    scale = oracle.abs().max()
    assert (got - oracle).abs().max() < 0.03 * scale
    assert (symmetric - oracle).abs().max() > 0.03 * scale  # (the two schemes' models do differ)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_saved_quantized_checkpoint_round_trip(fp32_model, tiny_ckpt, ids, tmp_path, scheme):
    save_quantized(fp32_model, tmp_path, scheme)
    assert not any(p.name.endswith(".bin") for p in tmp_path.iterdir())
    loaded = load_model(tmp_path)
    in_memory = load_model(tiny_ckpt, quantization=scheme)
    assert loaded.cpu_linears == scheme
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="saved quantized as"):
        load_model(tmp_path, quantization="int8" if scheme == "int4" else "int4")


def test_llm_quantization_argument_and_errors(tiny_ckpt):
    from fastlfm import LLM

    llm = LLM(tiny_ckpt, quantization="int8")
    assert llm.model.cpu_linears == "int8"
    out = llm.generate("Hello", max_new_tokens=3, ignore_eos=True)
    assert len(out[0].token_ids) == 3
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        LLM(tiny_ckpt, quantization="int3")
    with pytest.raises(ValueError, match="projections are quantized"):
        llm.model.save_pretrained("/nonexistent/never-written")


@pytest.mark.parametrize("choice", ["packed", "plain", "auto"])
def test_a_model_packed_by_its_engine_still_saves_and_trains_exactly(tiny_ckpt, tmp_path, monkeypatch, choice):
    """generate() on the CPU packs the projections for oneDNN in place (or wraps them as
    PlainLinear); save_pretrained and train() give the plain layers back with the same weights (the
    reorder is lossless), and the next generate() packs them again."""
    from fastlfm import Lfm2ForCausalLM

    monkeypatch.setenv(cpu_linear.PACK_ENV, choice)

    model = Lfm2ForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 600, 700, 800]])
    first = model.generate(ids, max_new_tokens=6)
    assert model.cpu_linears == "float32"
    model.save_pretrained(tmp_path)
    assert not hasattr(model, "cpu_linears") and model.lm_head.weight is model.model.embed_tokens.weight
    saved = load_model(tmp_path, dtype=torch.float32).state_dict()
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    assert torch.equal(model.generate(ids, max_new_tokens=6), first) and model.cpu_linears == "float32"
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert model(ids, labels=ids).loss.isfinite()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_packed_linear_fused_residual_add():
    w, x, r = _weight(), torch.randn(1, 3, 128), torch.randn(1, 3, 96)
    torch.testing.assert_close(PackedLinear(w).add_to(x, r), r + F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_batch1_cpu_decode_path_matches_the_reference_model(tiny_ckpt):
    """Batch-1 decode steps on the CPU (attention over the sequence's own blocks, the conv step in
    place on its slot) give the greedy tokens of the plain fp32 model with its own cache; a second
    request reuses the conv slot of the first (its state must start from zeros)."""
    from fastlfm.engine import LLMEngine

    ref = load_model(tiny_ckpt, dtype=torch.float32)
    prompts = [[5, 9, 200, 31, 7, 400, 3, 3, 17, 99, 101, 5, 6, 7, 8, 9, 10, 11], [42]]  # [42]: a one-token row, past 0
    expected = []
    with torch.no_grad():
        for p in prompts:
            cache, ids, out = ref.make_cache(), torch.tensor([p]), []
            for _ in range(20):
                logp = ref(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].log_softmax(-1)
                t = int(logp.argmax())
                out.append((t, float(logp[t])))
                ids = torch.tensor([[t]])
            expected.append(out)
    engine = LLMEngine(load_model(tiny_ckpt, dtype=torch.float32), max_num_seqs=1, block_size=4)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    for p, want in zip(prompts, expected):  # one at a time: every decode step is batch 1
        out = engine.generate([p], params)[0]
        assert out.token_ids == [t for t, _ in want]
        got = torch.tensor([lp.logprob for lp in out.logprobs])
        torch.testing.assert_close(got, torch.tensor([lp for _, lp in want]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- packed or plain, chosen at load
@pytest.fixture
def fresh_decisions(monkeypatch):
    """An empty per-process decision cache (restored afterwards), so a test's fake timings decide."""
    monkeypatch.setattr(cpu_linear, "_decisions", {})
    monkeypatch.delenv(cpu_linear.PACK_ENV, raising=False)


def _fake_measure(packed_shapes, calls):
    """Timings where the shapes in `packed_shapes` are twice as fast packed, the others twice as fast plain."""
    def measure(samples):
        calls.append(sorted(samples, key=str))
        return {key: (1.0, 2.0) if key[1] in packed_shapes else (2.0, 1.0) for key in samples}
    return measure


def test_choice_picks_the_faster_kernel_per_shape_and_measures_once(fresh_decisions):
    a, b, c = (torch.float32, (8, 4)), (torch.float32, (16, 4)), (torch.bfloat16, (8, 4))
    samples = {a: [torch.zeros(8, 4)], b: [torch.zeros(16, 4)]}
    calls = []
    assert choose_float_kernels(samples, _fake_measure({(8, 4)}, calls)) == {a: True, b: False}
    # a second model in the same process: only the new (dtype, shape) is measured
    got = choose_float_kernels({a: samples[a], c: [torch.zeros(8, 4, dtype=torch.bfloat16)]},
                               _fake_measure(set(), calls))
    assert got == {a: True, c: False} and calls[1] == [c]
    # packing must be faster by the margin: a near-tie keeps plain F.linear
    d = (torch.float32, (4, 4))
    assert choose_float_kernels({d: [torch.zeros(4, 4)]}, lambda s: {d: (0.99, 1.0)}) == {d: False}
    # no trustworthy timing (a busy host): packed, as before, and measured again next time
    e = (torch.float32, (2, 4))
    assert choose_float_kernels({e: [torch.zeros(2, 4)]}, lambda s: {e: None}) == {e: True}
    assert choose_float_kernels({e: [torch.zeros(2, 4)]}, lambda s: {e: (2.0, 1.0)}) == {e: False}


def test_decisions_are_saved_per_host_and_read_by_a_later_process(fresh_decisions, monkeypatch, tmp_path):
    """The measured choices go to the decisions file under this host's key; a later process (the
    per-process cache empty again) takes them from there without measuring; another host's entry
    is not used."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv(cpu_linear.DECISIONS_FILE_ENV, str(path))
    monkeypatch.setattr(cpu_linear, "_saved_loaded", False)
    monkeypatch.setattr(cpu_linear, "_cpu_times", lambda: None)  # (no /proc/stat: saved; see the next test)
    a, b = (torch.float32, (8, 4)), (torch.bfloat16, (16, 4))
    samples = {a: [torch.zeros(8, 4)], b: [torch.zeros(16, 4, dtype=torch.bfloat16)]}
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda todo: {a: (1.0, 2.0), b: (2.0, 1.0)})
    assert choose_float_kernels(samples) == {a: True, b: False}
    saved = json.loads(path.read_text())
    assert saved == {cpu_linear._host_key(): {"float32 8x4": True, "bfloat16 16x4": False}}
    # a later process: nothing measured
    monkeypatch.setattr(cpu_linear, "_decisions", {})
    monkeypatch.setattr(cpu_linear, "_saved_loaded", False)
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda todo: pytest.fail(f"measured {todo}"))
    assert choose_float_kernels(samples) == {a: True, b: False}
    # another host (other CPU, threads or torch): measured again
    monkeypatch.setattr(cpu_linear, "_decisions", {})
    monkeypatch.setattr(cpu_linear, "_saved_loaded", False)
    monkeypatch.setattr(cpu_linear, "_host_key", lambda: "another host")
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda todo: {a: (2.0, 1.0), b: (2.0, 1.0)})
    assert choose_float_kernels(samples) == {a: False, b: False}


def test_decisions_measured_on_a_busy_machine_are_not_saved(fresh_decisions, monkeypatch, tmp_path):
    """While the kernels were timed, other processes used 40% of the machine's CPU time: the choice
    serves this process, the file stays unwritten, and a later process measures again; at 10%, saved.
    The share by hand: machine busy 8 s of 10 s, this process 4 s -> others (8 - 4) / 10 = 0.4."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv(cpu_linear.DECISIONS_FILE_ENV, str(path))
    monkeypatch.setattr(cpu_linear, "_saved_loaded", False)
    a = (torch.float32, (8, 4))
    samples = {a: [torch.zeros(8, 4)]}
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda todo: {a: (1.0, 2.0)})
    readings = iter([(100.0, 200.0, 50.0), (108.0, 210.0, 54.0)])  # (busy, all, this process) seconds
    monkeypatch.setattr(cpu_linear, "_cpu_times", lambda: next(readings))
    assert cpu_linear._others_busy_share((100.0, 200.0, 50.0), (108.0, 210.0, 54.0)) == pytest.approx(0.4)
    assert choose_float_kernels(samples) == {a: True}
    assert not path.exists()
    monkeypatch.setattr(cpu_linear, "_decisions", {})
    readings = iter([(100.0, 200.0, 50.0), (105.0, 210.0, 54.0)])  # others (5 - 4) / 10 = 0.1
    assert choose_float_kernels(samples) == {a: True}
    assert json.loads(path.read_text()) == {cpu_linear._host_key(): {"float32 8x4": True}}


def test_measure_float_kernels_times_both_kernels():
    samples = {(torch.float32, (96, 128)): [_weight(), _weight(seed=1)],
               (torch.bfloat16, (32, 64)): [_weight(32, 64).bfloat16()]}
    times = measure_float_kernels(samples, repeats=2)
    assert times.keys() == samples.keys()
    assert all(t is None or (t[0] > 0 and t[1] > 0) for t in times.values())  # None: the host was too busy


@pytest.fixture
def torch_kernels(monkeypatch):
    """fastlfm's own CPU kernels off (as on a CPU without AVX-512): torch's kernels, chosen by timing."""
    from fastlfm import cpu_gemv
    monkeypatch.setattr(cpu_gemv, "_state", {"ok": False, "error": "turned off by the test"})


def test_with_fastlfm_kernels_float_weights_stay_plain_unmeasured(fp32_model, fresh_decisions, monkeypatch):
    """Where fastlfm's kernels run, fp32 / bf16 projections are PlainLinear on them: nothing to time."""
    from fastlfm import cpu_gemv
    if not cpu_gemv.available():
        pytest.skip(f"fastlfm's CPU kernels do not run here: {cpu_gemv.unavailable_reason()}")
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda s: pytest.fail("nothing to measure"))
    model = prepare_for_cpu(copy.deepcopy(fp32_model))
    kinds = {type(m) for m in model.modules() if isinstance(m, (PackedLinear, PlainLinear, torch.nn.Linear))}
    assert kinds == {PlainLinear} and all(m.gemv for m in model.modules() if isinstance(m, PlainLinear))


def test_mixed_choices_give_the_unprepared_logits(fp32_model, ids, fresh_decisions, torch_kernels, monkeypatch):
    """qkv and w2 packed, the rest plain F.linear: same logits; the plain head still reads the
    tied embedding (no second copy)."""
    cfg = fp32_model.config
    qkv = ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size)
    w2 = (cfg.hidden_size, cfg.ffn_dim)
    calls = []
    monkeypatch.setattr(cpu_linear, "measure_float_kernels", _fake_measure({qkv, w2}, calls))
    model = prepare_for_cpu(copy.deepcopy(fp32_model))
    attn = next(layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn"))
    mlp = model.model.layers[0].feed_forward
    assert isinstance(attn.qkv_weight, PackedLinear) and isinstance(attn.q_proj, FusedAway)
    assert isinstance(attn.out_proj, PlainLinear) and isinstance(mlp.w2, PackedLinear)
    assert isinstance(mlp.w13_weight, PlainLinear) and isinstance(mlp.w1, FusedAway)
    assert isinstance(model.lm_head, PlainLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp32_model(ids).logits, rtol=1e-5, atol=1e-5)


def test_forced_choices_and_the_environment_variable(fp32_model, fresh_decisions, monkeypatch):
    def kinds(model):
        return {type(m) for m in model.modules() if isinstance(m, (PackedLinear, PlainLinear, torch.nn.Linear))}

    monkeypatch.setattr(cpu_linear, "measure_float_kernels", lambda s: pytest.fail("forced: nothing to measure"))
    assert kinds(prepare_for_cpu(copy.deepcopy(fp32_model), pack=True)) == {PackedLinear}
    assert kinds(prepare_for_cpu(copy.deepcopy(fp32_model), pack=False)) == {PlainLinear}
    monkeypatch.setenv(cpu_linear.PACK_ENV, "packed")
    assert kinds(prepare_for_cpu(copy.deepcopy(fp32_model))) == {PackedLinear}
    monkeypatch.setenv(cpu_linear.PACK_ENV, "plain")
    assert kinds(prepare_for_cpu(copy.deepcopy(fp32_model))) == {PlainLinear}
    monkeypatch.setenv(cpu_linear.PACK_ENV, "sometimes")
    with pytest.raises(ValueError, match="FASTLFM_CPU_PACK"):
        prepare_for_cpu(copy.deepcopy(fp32_model))


@pytest.mark.parametrize("pack", [False, True, "auto"])
def test_engine_pack_cpu_weights_modes_give_the_same_tokens(tiny_ckpt, fresh_decisions, torch_kernels, monkeypatch,
                                                           pack):
    """pack_cpu_weights=False keeps the model's nn.Linear layers; True packs all; "auto" (here with
    mixed fake timings: residual adds through PlainLinear and PackedLinear.add_to) decodes the
    same greedy tokens and logprobs."""
    from fastlfm.engine import LLMEngine

    model = load_model(tiny_ckpt, dtype=torch.float32)
    cfg = model.config
    monkeypatch.setattr(cpu_linear, "measure_float_kernels",
                        _fake_measure({(cfg.hidden_size, cfg.hidden_size), (cfg.hidden_size, cfg.ffn_dim)}, []))
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    prompt = [5, 9, 200, 31, 7, 400, 3]
    ref = LLMEngine(load_model(tiny_ckpt, dtype=torch.float32), max_num_seqs=1, block_size=4,
                    pack_cpu_weights=False).generate([prompt], params)[0]
    engine = LLMEngine(model, max_num_seqs=1, block_size=4, pack_cpu_weights=pack)
    kinds = {type(m) for m in model.modules() if isinstance(m, (PackedLinear, PlainLinear))}
    assert kinds == {False: set(), True: {PackedLinear}, "auto": {PackedLinear, PlainLinear}}[pack]
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == ref.token_ids
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs]),
                               torch.tensor([lp.logprob for lp in ref.logprobs]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_linear_one_row_and_many_rows_equal_the_product(dtype, torch_kernels):
    """PlainLinear runs one row through F.linear and several through oneDNN on the same unpacked
    weight: both equal x W^T computed in float64 (to the dtype's rounding)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g).to(dtype)
    lin = PlainLinear(w)
    assert lin.weight.data_ptr() == w.data_ptr()  # no copy
    for rows in (1, 5):
        x = torch.randn(2, rows, 64, generator=g).to(dtype)[:1]
        want = (x.double() @ w.double().T).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(lin(x), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_non_finite_weight_is_refused_by_name(fp32_model, monkeypatch, one_pass):
    """NaN or inf in a weight would quantize to finite codes (garbage that looks fine): quantizing
    refuses it, naming the row, and loading names the tensor; on the kernel library's one-pass
    quantizers (where they run) and on the torch code alike."""
    if one_pass and not cpu_linear.cpu_gemv.available():
        pytest.skip("the kernel library does not run here (the torch code is the other case)")
    if not one_pass:
        monkeypatch.setattr(cpu_linear, "_quantizes_in_one_pass", lambda w: False)
    w = _weight()
    w[37, 5] = float("nan")
    for quantize_fn in (quantize_int8, quantize_int4):
        with pytest.raises(cpu_linear.NonFiniteWeight, match="row 37 holds a non-finite value"):
            quantize_fn(w)
    w[37, 5] = float("inf")
    with pytest.raises(cpu_linear.NonFiniteWeight, match="row 37"):
        quantize_int4(w.bfloat16())
    model = copy.deepcopy(fp32_model)
    with torch.no_grad():
        model.model.layers[1].feed_forward.w2.weight[3, 0] = float("nan")
    with pytest.raises(cpu_linear.NonFiniteWeight, match=r"tensor model\.layers\.1\.feed_forward\.w2\.weight: row 3"):
        prepare_for_cpu(model, "int4")
