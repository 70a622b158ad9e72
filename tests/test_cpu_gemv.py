"""fastlfm's CPU kernels (fastlfm.cpu_gemv: AVX-512 VNNI / BF16 products) and the modules that use
them (fastlfm.cpu_linear), on both paths: the kernels and torch's (`kernels` fixture).

Oracles: the product computed by hand in float64 from the weight's formula (int8: q * scale;
int4: (q - 8) * scale + zero) and from the input as the kernels see it (int8 / int4: the input
quantized to int8 in blocks of 32, scale max|x| / 127, rounded to nearest even, written here in
torch; bf16: the input rounded to bf16); the model's own RMSNorm (fastlfm.ops.rms_norm, checked
against transformers in test_model_parity) and F.silu for the folded prologues."""

import os

import pytest
import torch
import torch.nn.functional as F

from fastlfm import cpu_gemv
from fastlfm.cpu_linear import (GEMV_ROWS, Int4Linear, Int8Embedding, Int8Linear, PlainLinear, quantize_int4,
                                quantize_int8)
from fastlfm.ops import rms_norm
from fastlfm.testing import anon_huge_page_bytes

HAS_INSTRUCTIONS = all(f in cpu_gemv.cpu_flags() for f in cpu_gemv.REQUIRED_FLAGS)
needs_kernels = pytest.mark.skipif(not HAS_INSTRUCTIONS, reason="this CPU lacks AVX-512 VNNI / BF16")


def test_the_kernels_build_wherever_the_cpu_has_the_instructions():
    if HAS_INSTRUCTIONS and os.environ.get(cpu_gemv.ENV, "1") != "0":
        assert cpu_gemv.available(), cpu_gemv.unavailable_reason()
    else:
        assert not cpu_gemv.available() and cpu_gemv.unavailable_reason()


@pytest.fixture(params=["fastlfm", "torch"])
def kernels(request, monkeypatch):
    """Which kernels the modules built in the test use: fastlfm's (where the CPU has them) or torch's."""
    if request.param == "fastlfm":
        if not HAS_INSTRUCTIONS:
            pytest.skip("this CPU lacks AVX-512 VNNI / BF16")
        assert cpu_gemv.available()
    else:
        monkeypatch.setattr(cpu_gemv, "_state", {"ok": False, "error": "turned off by the test"})
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def blocks_as_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 / int4 kernels multiply it: int8 in blocks of 32 along the last axis, scale
    max|x| / 127 (the rounding computed in fp32 like the kernel: x * (127 / max|x|))."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv).double() * (amax.double() / 127)).reshape(x.shape)


def int8_oracle(x, w):
    return blocks_as_int8(x) @ w.dequantize().double().t()


SHAPES = [(1, 100, 96), (3, 64, 1024), (2, 33, 4608), (9, 16, 32)]  # (rows, out, in): padding, several rows


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_kernel_equals_the_hand_product(m, n, k):
    x, w = torch.randn(m, k, generator=_gen(0)), quantize_int8(torch.randn(n, k, generator=_gen(1)))
    packed, scale = cpu_gemv.pack_int8(w.q, w.scale)
    assert cpu_gemv.available()
    y = cpu_gemv.gemv_int8(x, packed, scale, n, torch.float32)
    ref = int8_oracle(x, w)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("m,n,k", [s for s in SHAPES if s[2] % 64 == 0])
def test_int4_kernel_equals_the_hand_product(m, n, k, group, symmetric):
    x = torch.randn(m, k, generator=_gen(2))
    w = quantize_int4(torch.randn(n, k, generator=_gen(3)), group, symmetric=symmetric)
    packed, sz = cpu_gemv.pack_int4(w.q, w.scale, w.zero, group)
    assert sz.shape == (-(-n // 16), k // group, 1 if symmetric else 2, 16)  # symmetric: no zeros stored
    assert cpu_gemv.available()
    y = cpu_gemv.gemv_int4(x, packed, sz, group, n, torch.float32)
    ref = blocks_as_int8(x) @ w.dequantize().double().t()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [s for s in SHAPES if s[2] % 32 == 0])
def test_dense_kernel_equals_the_hand_product(m, n, k, dtype):
    """fp32 and bf16 weights (bf16: the input rounded to bf16, as torch's bf16 linear)."""
    x, w = torch.randn(m, k, generator=_gen(4)), torch.randn(n, k, generator=_gen(5)).to(dtype)
    assert cpu_gemv.available()
    y = cpu_gemv.gemv_dense(x, w, torch.float32)
    ref = x.to(dtype).double() @ w.double().t()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_residual_add_and_output_dtype(out_dtype):
    n, k = 40, 256
    x, w = torch.randn(2, k, generator=_gen(6)), quantize_int8(torch.randn(n, k, generator=_gen(7)))
    residual = torch.randn(2, n, generator=_gen(8)).to(out_dtype)
    packed, scale = cpu_gemv.pack_int8(w.q, w.scale)
    assert cpu_gemv.available()
    y = cpu_gemv.gemv_int8(x, packed, scale, n, out_dtype, residual)
    ref = (int8_oracle(x, w) + residual.double()).to(out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, ref, rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    wb = torch.randn(n, k, generator=_gen(9)).bfloat16()
    y = cpu_gemv.gemv_dense(x, wb, out_dtype, residual)
    ref = (x.bfloat16().double() @ wb.double().t() + residual.double()).to(out_dtype)
    torch.testing.assert_close(y, ref, rtol=1e-2 if out_dtype == torch.bfloat16 else 1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4", "bf16", "fp32"])
def test_folded_norm_and_gate_equal_the_separate_ops(kind, dtype):
    """RMSNorm (LFM2's) and SiLU(gate) * up folded into the product give what the model's own ops
    followed by the same kernel give."""
    n, k = 48, 128
    assert cpu_gemv.available()
    w = torch.randn(n, k, generator=_gen(10))
    if kind == "int8":
        q = quantize_int8(w)
        packed, scale = cpu_gemv.pack_int8(q.q, q.scale)
        run = lambda x, **kw: cpu_gemv.gemv_int8(x, packed, scale, n, torch.float32, **kw)  # noqa: E731
    elif kind == "int4":
        q = quantize_int4(w, 32)
        packed, sz = cpu_gemv.pack_int4(q.q, q.scale, q.zero, 32)
        run = lambda x, **kw: cpu_gemv.gemv_int4(x, packed, sz, 32, n, torch.float32, **kw)  # noqa: E731
    else:
        wd = w.to(torch.bfloat16 if kind == "bf16" else torch.float32)
        run = lambda x, **kw: cpu_gemv.gemv_dense(x, wd, torch.float32, **kw)  # noqa: E731
    x = (torch.randn(3, k, generator=_gen(11)) * 3).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(k, generator=_gen(12))).to(dtype)
    fused = run(x, norm=(norm_w, 1e-5))
    separate = run(rms_norm(x, norm_w, 1e-5))
    torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-4 * separate.abs().max().item())
    gate_up = torch.randn(3, 2 * k, generator=_gen(13)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    fused = run(gate_up, silu_gate=True)
    separate = run((F.silu(gate) * up).contiguous())
    torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-4 * separate.abs().max().item())


@needs_kernels
def test_a_nan_input_gives_nan_not_numbers():
    n, k = 16, 64
    q = quantize_int8(torch.randn(n, k, generator=_gen(14)))
    packed, scale = cpu_gemv.pack_int8(q.q, q.scale)
    x = torch.randn(2, k, generator=_gen(15))
    x[1, 5] = float("nan")
    assert cpu_gemv.available()
    y = cpu_gemv.gemv_int8(x, packed, scale, n, torch.float32)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


# ----------------------------------------------------------------------------- the modules, both paths
def test_int8_module(kernels):
    w = quantize_int8(torch.randn(96, 128, generator=_gen(16)) * 0.05)
    x = torch.randn(4, 128, generator=_gen(17))
    module = Int8Linear(w)
    assert module.gemv == (kernels == "fastlfm")
    # what each kernel multiplies: int8 blocks of the input (fastlfm's), the input in bf16 (torch's)
    ref = int8_oracle(x, w) if module.gemv else x.bfloat16().double() @ w.dequantize().double().t()
    torch.testing.assert_close(module(x).double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_module(kernels, group, symmetric):
    w = quantize_int4(torch.randn(96, 128, generator=_gen(18)) * 0.05, group, symmetric=symmetric)
    x = torch.randn(4, 128, generator=_gen(19))
    module = Int4Linear(w)
    assert module.gemv == (kernels == "fastlfm")
    x_seen = blocks_as_int8(x) if module.gemv else x.bfloat16().double()
    torch.testing.assert_close(module(x).double(), x_seen @ w.dequantize().double().t(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_module_rows_through_either_kernel(kernels, dtype):
    """Up to GEMV_ROWS rows through fastlfm's product, more through oneDNN: the same numbers."""
    w = torch.randn(80, 96, generator=_gen(20)).to(dtype)
    module = PlainLinear(w)
    assert module.gemv == (kernels == "fastlfm")
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 3):
        x = torch.randn(rows, 96, generator=_gen(rows)).to(dtype)
        ref = (x.double() @ w.double().t()).to(dtype)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(module(x), ref, rtol=tol, atol=tol)


def test_int8_embedding_and_tied_head_share_one_table(kernels):
    w = torch.randn(64, 32, generator=_gen(21)) * 0.05
    emb = Int8Embedding(quantize_int8(w), torch.float32)
    head = emb.head()
    table = "packed" if emb.gemv else "q"
    assert getattr(head, table).data_ptr() == getattr(emb, table).data_ptr()  # one copy
    ids = torch.tensor([[0, 5, 17, 63]])
    deq = quantize_int8(w).dequantize()
    torch.testing.assert_close(emb(ids), deq[ids], rtol=0, atol=0)  # q * scale, exact in fp32
    # bf16 rows: q and the scale in bf16, their product rounded to bf16 (as torch's ops on bf16 do)
    qw = quantize_int8(w)
    expected = qw.q[ids].to(torch.bfloat16) * qw.scale[ids, None].to(torch.bfloat16)
    assert torch.equal(Int8Embedding(qw, torch.bfloat16)(ids), expected)
    with pytest.raises((IndexError, RuntimeError), match="out|outside"):
        emb(torch.tensor([64]))
    x = torch.randn(2, 32, generator=_gen(22))
    ref = int8_oracle(x, quantize_int8(w)) if head.gemv else x.bfloat16().double() @ deq.double().t()
    torch.testing.assert_close(head(x).double(), ref, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_equals_torch_argmax(dtype):
    """First maximum on ties, first NaN when there is one, any row length (not only multiples of 16)."""
    assert cpu_gemv.available()
    for v in (1, 15, 16, 17, 65536, 65539):
        x = torch.randn(3, v, generator=_gen(v)).to(dtype)
        x[1] = x[1].round()  # many ties
        if v > 3:
            x[2, 3] = float("nan")
            x[2, v - 1] = float("nan")
        got = cpu_gemv.argmax_rows(x)
        assert got.tolist() == x.argmax(-1).tolist(), v


# ----------------------------------------------------------------------------- the rest of a decode step
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reset", [False, True])
def test_conv_step_equals_the_torch_ops(dtype, reset):
    """C * conv(B * x) over the slot's state and the state shift, with the roundings of the eager ops
    (each product and sum in the activations' dtype): bit-equal; the pool's other slots untouched.
    D = 1030: vector and scalar tails. A new sequence (past 0) starts from zeros."""
    D, K, slot = 1030, 3, 2
    bcx = torch.randn(3 * D, generator=_gen(30)).to(dtype)
    w = torch.randn(D, 1, K, generator=_gen(31)).to(dtype)
    states = torch.randn(4, K - 1, D, generator=_gen(32)).to(dtype)
    others = states.clone()
    state = states[slot]
    expected_state = torch.zeros_like(state) if reset else state.clone()
    b, c, x = bcx.chunk(3)
    bx = b * x
    taps = w.view(D, K)
    out = bx * taps[:, K - 1]
    for lag in range(1, K):
        out = out + expected_state[K - 1 - lag] * taps[:, K - 1 - lag]
    expected = c * out
    expected_state = torch.stack([expected_state[1], bx])
    assert cpu_gemv.available()
    got = cpu_gemv.conv_step(bcx, w, None, states, torch.tensor([slot]), torch.tensor([0 if reset else 5]))
    assert torch.equal(got, expected) and torch.equal(state, expected_state)
    assert all(torch.equal(states[i], others[i]) for i in range(4) if i != slot)


@needs_kernels
def test_batch1_ops_refuse_slots_and_blocks_outside_their_pools():
    """A slot, length or block id outside the cache is an error naming it, not a read or write
    outside the tensor."""
    D, K = 64, 3
    states = torch.zeros(2, K - 1, D)
    bcx, w = torch.randn(3 * D), torch.randn(D, 1, K)
    with pytest.raises(RuntimeError, match="slot 2 outside the pool"):
        cpu_gemv.conv_step(bcx, w, None, states, torch.tensor([2]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="one-element"):
        cpu_gemv.conv_step(bcx, w, None, states, torch.tensor([0, 1]), torch.tensor([1]))
    caches = [torch.zeros(3, 16, 2, 32) for _ in range(2)]
    q, k = torch.randn(4, 32), torch.randn(2, 32)
    table = torch.tensor([0, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block 7 outside the cache"):
        cpu_gemv.paged_decode_attention(q, k, k, *caches, table, torch.tensor([19]))
    with pytest.raises(RuntimeError, match="position 39 outside the block table"):
        cpu_gemv.paged_decode_attention(q, k, k, *caches, table, torch.tensor([39], dtype=torch.int32))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_equals_the_model_ops(dtype):
    from fastlfm.ops import apply_rope
    H, Hkv, d = 16, 8, 64
    q = torch.randn(H, d, generator=_gen(33)).to(dtype) * 3
    k = torch.randn(Hkv, d, generator=_gen(34)).to(dtype)
    qw, kw = (1 + 0.1 * torch.randn(2, d, generator=_gen(35))).to(dtype)
    angles = torch.randn(d // 2, generator=_gen(36)) * 10
    cos, sin = torch.cat([angles, angles]).cos().to(dtype), torch.cat([angles, angles]).sin().to(dtype)
    assert cpu_gemv.available()
    got_q, got_k = cpu_gemv.qk_norm_rope(q, k, qw, kw, 1e-5, cos, sin)
    for got, x, w in ((got_q, q, qw), (got_k, k, kw)):
        ref = apply_rope(rms_norm(x[None, None], w, 1e-5), cos[None, None], sin[None, None])[0, 0]
        # rsqrt vs 1 / sqrt may differ in the last fp32 bit: at most one step of the dtype
        torch.testing.assert_close(got, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("H, Hkv, d", [(16, 8, 64), (32, 8, 64), (6, 6, 128), (12, 3, 24)])  # (d=24: scalar path)
def test_paged_decode_attention_equals_sdpa_over_the_gathered_history(dtype, n, H, Hkv, d):
    bs = 16
    blocks = -(-n // bs)
    k_cache = torch.randn(blocks + 5, bs, Hkv, d, generator=_gen(37)).to(dtype)
    v_cache = torch.randn(blocks + 5, bs, Hkv, d, generator=_gen(38)).to(dtype)
    # scattered blocks; the row is wider than the history (as a block-table row is)
    table = torch.randperm(blocks + 5, generator=_gen(39))[:blocks + 2].to(torch.int32)
    slot = int(table[(n - 1) // bs]) * bs + (n - 1) % bs  # the new token's position
    q, k, v = (torch.randn(h, d, generator=_gen(40 + h)).to(dtype) for h in (H, Hkv, Hkv))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref.view(-1, Hkv, d)[slot], v_ref.view(-1, Hkv, d)[slot] = k, v
    kh = k_ref[table.long()].flatten(0, 1)[:n].transpose(0, 1)[None]
    vh = v_ref[table.long()].flatten(0, 1)[:n].transpose(0, 1)[None]
    ref = F.scaled_dot_product_attention(q[None, :, None].float(), kh.float(), vh.float(), enable_gqa=True)[0, :, 0]
    assert cpu_gemv.available()
    got = cpu_gemv.paged_decode_attention(q, k, v, k_cache, v_cache, table, torch.tensor([n - 1]))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # the token's K/V written at its slot
    torch.testing.assert_close(got.float(), ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_qk_norm_rope_equals_the_two_calls(dtype):
    """The attention op given the QK norms, cos and sin: the values of qk_norm_rope then the attention,
    bit for bit, the cache written alike."""
    H, Hkv, d, bs, past = 16, 8, 64, 16, 40
    g = _gen(60)
    caches = [torch.randn(6, bs, Hkv, d, generator=g).to(dtype) for _ in range(2)]
    table = torch.tensor([4, 1, 3, 0], dtype=torch.int32)
    q, k, v = (torch.randn(h, d, generator=g).to(dtype) for h in (H, Hkv, Hkv))
    qw, kw = (1 + 0.1 * torch.randn(2, d, generator=g)).to(dtype)
    angles = torch.randn(d // 2, generator=g) * 10
    cos, sin = torch.cat([angles, angles]).cos().to(dtype), torch.cat([angles, angles]).sin().to(dtype)
    two = [c.clone() for c in caches]
    qn, kn = cpu_gemv.qk_norm_rope(q, k, qw, kw, 1e-5, cos, sin)
    expected = cpu_gemv.paged_decode_attention(qn, kn, v, *two, table, torch.tensor([past]))
    got = cpu_gemv.paged_decode_attention(q, k, v, *caches, table, torch.tensor([past]), (qw, kw, 1e-5, cos, sin))
    assert torch.equal(got, expected) and all(torch.equal(a, b) for a, b in zip(caches, two))


def test_a_shape_only_fastlfm_takes_stays_quantized(kernels):
    """int4 with 40 output rows: torch's int4 kernel needs N % 16 (the weight then runs de-quantized
    in bf16); fastlfm's pads the rows and keeps it int4. Either way the product is the weight's."""
    from fastlfm.cpu_linear import PackedLinear, make_linear
    w = quantize_int4(torch.randn(40, 64, generator=_gen(50)) * 0.05, 32)
    module = make_linear(w)
    assert type(module) is (Int4Linear if kernels == "fastlfm" else PackedLinear)
    x = torch.randn(3, 64, generator=_gen(51))
    x_seen = blocks_as_int8(x) if kernels == "fastlfm" else x.bfloat16().double()
    torch.testing.assert_close(module(x).double(), x_seen @ w.dequantize().double().t(), rtol=2e-2, atol=2e-2)


def test_weights_on_huge_pages_are_2mb_aligned_tensors_that_outlive_their_mapping(monkeypatch):
    """The kernels' large weights live in 2 MB-aligned anonymous memory (advised as huge pages); the
    tensor keeps its mapping alive; small ones, and all with FASTLFM_HUGE_PAGES=0, are plain tensors."""
    import gc

    big = cpu_gemv.empty_on_huge_pages((1024, 1024), torch.float32)  # 4 MB
    assert big.shape == (1024, 1024) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % cpu_gemv.HUGE_PAGE == 0
    big.fill_(2.0)
    gc.collect()
    _ = [torch.randn(256, 256) for _ in range(16)]  # memory churn after the mapping's last Python name is gone
    assert big.sum().item() == 2.0 * 1024 * 1024
    small = cpu_gemv.empty_on_huge_pages((16, 16), torch.bfloat16)
    assert small.shape == (16, 16) and small.dtype == torch.bfloat16
    monkeypatch.setenv(cpu_gemv.HUGE_PAGES_ENV, "0")
    plain = cpu_gemv.empty_on_huge_pages((1024, 1024), torch.float32)
    assert plain.untyped_storage().nbytes() == 4 * 1024 * 1024  # torch's own allocation, not a sliced mapping


@pytest.mark.skipif(not cpu_gemv.huge_pages_usable(), reason="no transparent huge pages here")
def test_collapsing_moves_a_tensor_onto_huge_pages_in_place(monkeypatch):
    """MADV_COLLAPSE through collapse_onto_huge_pages: the same address and bytes, now on 2 MB pages
    (as the kernel reports them in smaps); with FASTLFM_HUGE_PAGES=0 left as they were."""
    t = torch.randn(2 * 1024 * 1024)  # 8 MB of fp32 in torch's allocation: at least 3 whole 2 MB pages
    before, ptr = t.clone(), t.data_ptr()
    whole = ((ptr + t.nbytes) // cpu_gemv.HUGE_PAGE - -(-ptr // cpu_gemv.HUGE_PAGE)) * cpu_gemv.HUGE_PAGE
    # (smaps counts per mapping, and the kernel merges neighbouring anonymous ones: compare before / after)
    advised_only = "[madvise]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    huge_before = anon_huge_page_bytes(t)
    monkeypatch.setenv(cpu_gemv.HUGE_PAGES_ENV, "0")
    assert cpu_gemv.collapse_onto_huge_pages([t]) == 0 and anon_huge_page_bytes(t) == huge_before
    monkeypatch.delenv(cpu_gemv.HUGE_PAGES_ENV)
    assert whole >= 3 * cpu_gemv.HUGE_PAGE and cpu_gemv.collapse_onto_huge_pages([t]) == whole
    # THP "madvise": torch's memory was on 4 KB pages and now is on 2 MB ones ("always": it may have been)
    assert anon_huge_page_bytes(t) >= huge_before + (whole if advised_only else 0) and anon_huge_page_bytes(t) >= whole
    assert t.data_ptr() == ptr and torch.equal(t, before)


@pytest.mark.skipif(not cpu_gemv.huge_pages_usable(), reason="no transparent huge pages here")
def test_a_writable_file_mapping_is_not_collapsed(tmp_path):
    """How a bf16 checkpoint's tensors are read in place: the kernel refuses, the bytes stay (the engine
    copies such weights instead: test_cpu_graph)."""
    import mmap

    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * (3 * 2**21 // 256))
    with open(path, "r+b") as f:
        area = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    t = torch.frombuffer(area, dtype=torch.uint8)
    assert cpu_gemv.collapse_onto_huge_pages([t]) == 0
    assert torch.equal(t[:256], torch.arange(256, dtype=torch.uint8))


@pytest.mark.parametrize("huge", ["1", "0"])
def test_packed_layouts_do_not_depend_on_the_pages(monkeypatch, huge):
    """pack_int8 / pack_int4 give the same bytes in huge-page memory as in torch's (the layout written
    out by hand: row group, input quad / octet, row in group, lane)."""
    monkeypatch.setenv(cpu_gemv.HUGE_PAGES_ENV, huge)
    g = torch.Generator().manual_seed(5)
    n, k = 2048, 1024  # 2 MB of int8 codes: over the huge-page threshold
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    packed, _ = cpu_gemv.pack_int8(q8, torch.ones(n))
    r, c, j = 37, 501, 2  # one code checked by hand
    assert int(packed[r // 16, c // 4, r % 16, c % 4]) == int(q8[r, c]) + 128
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(n, k).to(torch.int16) - 128, q8.to(torch.int16))
    q4 = torch.randint(0, 16, (n, 2 * k), generator=g, dtype=torch.uint8)
    packed4, _ = cpu_gemv.pack_int4(q4, torch.ones(n, 2 * k // 32), torch.zeros(n, 2 * k // 32), 32)
    byte = int(packed4[r // 16, c // 8, r % 16, j])
    assert byte & 0xF == int(q4[r, 8 * (c // 8) + j]) and byte >> 4 == int(q4[r, 8 * (c // 8) + 4 + j])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64])
def test_quantizing_at_load_in_one_pass_equals_the_torch_code(dtype, group, monkeypatch):
    """The kernel library's quantizers (used at load where it runs) give the codes and scales of the
    torch code (the fallback elsewhere), ties of magnitude (bf16 weights have many) and all-zero
    groups included; its packers give the torch packers' layouts, rows padded (N = 40)."""
    import fastlfm.cpu_linear as cpu_linear

    w = (torch.randn(40, 256, generator=_gen(60)) * 0.05).to(dtype)
    w[3, :group] = 0
    w[5, 0], w[5, 7] = -0.2, 0.2  # the first of two equal magnitudes sets the scale's sign
    w[6, 0], w[6, 7] = 0.2, -0.2
    assert cpu_gemv.available()
    fast4, fast8 = quantize_int4(w, group), quantize_int8(w)
    monkeypatch.setattr(cpu_linear, "_quantizes_in_one_pass", lambda w: False)
    ref4, ref8 = quantize_int4(w, group), quantize_int8(w)
    assert torch.equal(fast4.q, ref4.q) and torch.equal(fast4.scale, ref4.scale) and fast4.zero is None
    assert torch.equal(fast8.q, ref8.q) and torch.equal(fast8.scale, ref8.scale)
    assert fast4.scale[5, 0] > 0 > fast4.scale[6, 0]  # scale = m / -8
    packed4, packed8 = cpu_gemv.pack_int4(ref4.q, ref4.scale, None, group), cpu_gemv.pack_int8(ref8.q, ref8.scale)
    monkeypatch.setattr(cpu_gemv, "available", lambda: False)
    for fast, ref in ((packed4, cpu_gemv.pack_int4(ref4.q, ref4.scale, None, group)),
                      (packed8, cpu_gemv.pack_int8(ref8.q, ref8.scale))):
        assert all(torch.equal(a, b) for a, b in zip(fast, ref))


def test_a_module_runs_on_its_current_weights(kernels):
    """The kernel modules bind their op's weight arguments once; assigning a weight / buffer anew or
    converting the module (`_apply`) rebinds them: the product is the new weight's."""
    w1, w2 = (quantize_int8(torch.randn(32, 64, generator=_gen(s)) * 0.05) for s in (70, 71))
    x = torch.randn(2, 64, generator=_gen(72))
    module = Int8Linear(w1)
    first = module(x)
    new = Int8Linear(w2)
    for name in ("packed", "q", "scale"):
        if hasattr(new, name):
            setattr(module, name, getattr(new, name))
    torch.testing.assert_close(module(x), new(x), rtol=0, atol=0)
    assert not torch.equal(module(x), first)
    plain = PlainLinear(torch.randn(32, 64, generator=_gen(73)))
    plain(x[:1])
    plain.weight = torch.randn(32, 64, generator=_gen(74))
    torch.testing.assert_close(plain(x[:1]).double(), x[:1].double() @ plain.weight.double().t(), rtol=1e-5, atol=1e-5)
    module.to("cpu")  # (_apply: the arguments are bound again, to the same tensors here)
    assert "_bound" not in module.__dict__
    torch.testing.assert_close(module(x), new(x), rtol=0, atol=0)
