"""The engine's Triton kernels run by triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1
where there is no GPU): those of a prefill step on CUDA (engine/kernels/rowwise.py, the prefill part of
engine/kernels/conv.py, QK-norm + RoPE) and the MoE experts, against float64 computations by hand; and
the engine on its Triton path against the engine without it."""

import pytest
import torch
import torch.nn.functional as F

from fastlfm.engine.kernels import conv, rowwise


def test_the_kernels_run_in_the_interpreter_here():
    import os

    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# fp16, not bf16, for the half-precision cases: the interpreter casts to bf16 by truncation (the GPU rounds).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_over_strided_rows(dtype):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 7, 160, generator=g).to(dtype) * 3
    x = wide[..., 30:130]  # rows 160 apart, 100 wide
    weight = (torch.rand(100, generator=g) + 0.5).to(dtype)
    out = rowwise.rms_norm(x, weight, 1e-5)
    xd = x.double()
    normed = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    expected = weight.double() * normed.to(dtype).double()  # the normalised x is rounded before * weight
    assert out.shape == x.shape and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_rms_norm_takes_the_promoted_dtype_of_weight_and_input():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert rowwise.rms_norm(x, torch.ones(8), 1e-6).dtype == torch.float32  # as `weight * normed` would be


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 2 * 1500, generator=g) * 4).to(dtype)  # |x| < ~20: fp16 products stay finite  # I = 1500: more than one block per row
    out = rowwise.silu_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    assert out.shape == (5, 1500) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), gate * torch.sigmoid(gate) * up, atol=1e-6, rtol=1e-6)
    else:  # rounded where eager fp16 rounds (SiLU, then the product)
        eager = F.silu(x[:, :1500]) * x[:, 1500:]
        torch.testing.assert_close(out.double(), eager.double(), atol=1e-3, rtol=1e-3)


def test_qk_norm_rope_over_the_rows_of_a_prefill_step():
    """Every token's heads normalised and rotated at its own position, q and k read from strided views
    of one fused qkv row (40 heads: not a power of two), against float64 by hand (rotate-half RoPE)."""
    from fastlfm.engine.kernels.qk_norm_rope import qk_norm_rope

    g = torch.Generator().manual_seed(3)
    N, Hq, Hkv, d = 37, 10, 5, 16
    qkv = 3 * torch.randn(N, (Hq + 2 * Hkv) * d, generator=g)
    q, k = qkv[:, :Hq * d].view(N, Hq, d), qkv[:, Hq * d:(Hq + Hkv) * d].view(N, Hkv, d)
    qw, kw = 1 + 0.2 * torch.randn(d, generator=g), 1 + 0.2 * torch.randn(d, generator=g)
    positions = torch.randint(0, 5000, (N,), generator=g).double()
    angles = positions[:, None] * (1.0 / 1e6 ** (torch.arange(0, d, 2).double() / d))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def by_hand(x, w):
        x = x.double()
        x = w.double() * x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
        return x * cos[:, None] + rotated * sin[:, None]

    out_q, out_k = qk_norm_rope(q, k, qw, kw, 1e-5, cos.float(), sin.float())
    torch.testing.assert_close(out_q.double(), by_hand(q, qw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k.double(), by_hand(k, kw), atol=1e-5, rtol=1e-5)


def conv_by_hand(bcx, weight, bias, state, fresh):
    """One sequence: its inputs B*x after the K-1 of its state (zeros when fresh), each output the K-tap
    window ending at its token, + bias, times C; and the last K-1 inputs. float64."""
    D = bcx.shape[1] // 3
    K = weight.shape[-1]
    b, c, x = bcx.double().split(D, dim=1)
    inputs = torch.cat((torch.zeros(K - 1, D, dtype=torch.float64) if fresh else state.double(), b * x))
    w = weight.double().view(D, K)
    y = torch.stack([(inputs[t:t + K] * w.t()).sum(0) for t in range(bcx.shape[0])]) if bcx.shape[0] else c
    if bias is not None:
        y = y + bias.double()
    return c * y, inputs[-(K - 1):]


@pytest.mark.parametrize("K", [3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_conv_prefill_and_state_shift(K, with_bias):
    g = torch.Generator().manual_seed(K + 10 * with_bias)
    D = 300
    lens = [1, 5, 2, 0, 9, 1]  # decode rows, chunks shorter than the state, an empty row
    past = [3, 0, 1, 0, 7, 0]  # 0: a fresh sequence (its state reads as zeros, whatever the slot holds)
    slots = [4, 0, 6, 2, 1, 5]
    N = sum(lens)
    bcx = torch.randn(N, 3 * D + 8, generator=g)[:, :3 * D]  # rows wider than 3D (a strided view)
    weight = torch.randn(D, 1, K, generator=g)
    bias = torch.randn(D, generator=g) if with_bias else None
    pool = torch.randn(8, K - 1, D, generator=g)
    before = pool.clone()
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0))
    seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos_in_chunk = torch.arange(N) - cu[seq_of_token]
    args = (torch.tensor(slots), torch.tensor(past))
    out = conv.gated_conv_prefill(bcx, weight, bias, pool, *args, seq_of_token, pos_in_chunk)
    assert torch.equal(pool, before), "the outputs' kernel must leave the states alone"
    conv.shift_conv_states(bcx, pool, *args, cu)
    for s, (n, p, slot) in enumerate(zip(lens, past, slots)):
        start = int(cu[s])
        expected, state = conv_by_hand(bcx[start:start + n], weight, bias, before[slot], fresh=p == 0)
        torch.testing.assert_close(out[start:start + n].double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool[slot].double(), state, atol=1e-6, rtol=1e-6)
    untouched = [i for i in range(8) if i not in slots]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    from fastlfm.testing import tiny_moe_config, write_checkpoint

    # the larger init scale makes greedy outputs wander (see conftest's wandering_ckpt)
    return write_checkpoint(tmp_path_factory.mktemp("moe-triton"), tiny_moe_config(initializer_range=0.2),
                            tokenizer=False)


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_engine_on_the_triton_path_gives_the_plain_engines_tokens(family, request):
    """The engine as it runs on CUDA (the runner's Triton path: these prefill kernels, the decode
    kernels and for LFM2-MoE the experts' kernels in every step), here on the interpreter: chunked
    prefill beside decodes (a budget of 16 tokens), and a prompt resumed from the prefix cache (a conv
    state restored from a snapshot the Triton path took), give the greedy tokens of the same engine on
    its plain torch path (fp32)."""
    from fastlfm.engine import LLMEngine
    from fastlfm.models import load_model
    from fastlfm.sampling import SamplingParams

    folder = request.getfixturevalue("wandering_ckpt" if family == "dense" else "moe_ckpt")
    model = load_model(folder, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 40, 1, 23)]
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    tokens = {}
    for triton_path in (False, True):
        engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                           num_kv_blocks=32, enforce_eager=True, pack_cpu_weights=False)
        engine.runner.use_triton = triton_path
        first = [o.token_ids for o in engine.generate(prompts, params)]
        again = engine.generate(prompts[1:2], params)[0]
        engine.check_no_leaks()
        assert again.num_cached_tokens == 32  # two blocks of its 40 tokens from the cache
        tokens[triton_path] = first, again.token_ids
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("T,k", [(1, 4), (7, 3), (24, 4), (600, 4)])  # 600: prefill's 128-row tiles
def test_fused_moe_kernels_against_a_pair_by_pair_loop(T, k):
    """The MoE experts' Triton kernels (tokens sorted by expert on the device, grouped gate_up GEMM with
    SiLU*mul, grouped down GEMM, weighted back to each (token, slot) pair) against each pair computed on
    its own in float64: random routing, an expert that no token chooses, and every token on one expert.
    D and I are not multiples of the kernels' tiles."""
    from fastlfm.engine.kernels import moe

    g = torch.Generator().manual_seed(T)
    E, D, I = 8, 40, 24
    gate_up, down = torch.randn(E, 2 * I, D, generator=g) / D**0.5, torch.randn(E, D, I, generator=g) / I**0.5
    x = 2 * torch.randn(T, D, generator=g)
    random_ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    scores = torch.rand(T, E, generator=g)
    scores[:, 5] = -1
    unused = scores.topk(k, dim=-1).indices  # expert 5: chosen by no token
    scores = torch.rand(T, E, generator=g)
    scores[:, 2] = 2
    same = scores.topk(k, dim=-1).indices  # expert 2: chosen by every token
    for ids in (random_ids, unused, same):
        weights = torch.rand(T, k, generator=g)
        out = moe.fused_moe(x, ids, weights, gate_up, down)
        expected = torch.empty(T, k, D, dtype=torch.float64)
        for t in range(T):
            for slot, e in enumerate(ids[t].tolist()):
                h = gate_up[e].double() @ x[t].double()
                expected[t, slot] = weights[t, slot].double() * (down[e].double() @ (F.silu(h[:I]) * h[I:]))
        assert out.shape == (T, k, D)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T,E,k,bias,normalize,scale,dtype", [
    (1, 32, 4, True, True, 1.0, torch.float32),  # LFM2-8B-A1B's router at batch 1
    (40, 32, 4, True, True, 1.0, torch.bfloat16),
    (7, 64, 4, True, True, 1.0, torch.float32),  # LFM2-24B-A2B's 64 experts
    (19, 12, 3, False, False, 2.5, torch.float32),  # 12 experts padded to 16, no bias, unnormalized, scaled
])
def test_route_kernel_against_float64(T, E, k, bias, normalize, scale, dtype):
    """The router's kernel (fp32 logits, sigmoid, top-k of score + bias, unbiased weights normalized and
    scaled) against the same computed in float64 by hand; the inputs are checked to have no near-tie at
    the k-th expert, where float32 rounding may pick either."""
    from fastlfm.engine.kernels import moe

    g = torch.Generator().manual_seed(T * E + k)
    D = 1100  # over one K tile (1,024 wide for 32 experts, 512 for 64) and not a multiple of it
    x = torch.randn(T, D, generator=g).to(dtype)
    gate = (torch.randn(E, D, generator=g) / D**0.5).to(dtype)
    expert_bias = 0.1 * torch.randn(E, generator=g) if bias else None
    scores = torch.sigmoid(x.double() @ gate.double().t())
    choice = scores + (expert_bias.double() if bias else 0)
    ranked = choice.sort(dim=-1, descending=True).values
    assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-5, "a near-tie at the k-th expert: pick another seed"
    want = choice.topk(k, dim=-1).indices
    w = scores.gather(1, want)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-6)
    ids, weights = moe.route_top_k(x, gate, expert_bias, k, normalize, scale)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    # the same experts with the same weights (the order within the k follows the scores, which may nearly tie)
    ids, order = ids.sort(dim=-1)
    want, want_order = want.sort(dim=-1)
    assert torch.equal(ids, want)
    torch.testing.assert_close(weights.gather(1, order).double(), (w * scale).to(dtype).gather(1, want_order).double(),
                               atol=1e-6, rtol=1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_route_kernel_gives_real_distinct_experts_for_nan_rows():
    """A token whose hidden state is NaN (an overflow) still gets k distinct ids of real experts, so the
    sort by expert stays right for the other tokens of the step, whose routing is unchanged."""
    from fastlfm.engine.kernels import moe
    from fastlfm.ops import moe_route

    g = torch.Generator().manual_seed(1)
    x, gate, bias = torch.randn(6, 40, generator=g), torch.randn(12, 40, generator=g), torch.randn(12, generator=g)
    x[2] = float("nan")
    x[4, 7] = float("inf")
    ids, weights = moe.route_top_k(x, gate, bias, 4, True, 1.0)
    assert ((ids >= 0) & (ids < 12)).all()
    assert all(len(set(row)) == 4 for row in ids.tolist())
    want = moe_route(x, gate, bias, 4, True, 1.0)[0]
    clean = [0, 1, 3, 5]
    assert torch.equal(ids[clean].sort(-1).values, want[clean].sort(-1).values)
    assert torch.isnan(weights[2]).all() and torch.isfinite(weights[clean]).all()


def test_route_kernel_leaves_large_steps_to_torch(monkeypatch):
    """Steps of more tokens than the router's kernel takes (prefill) route through the reference ops."""
    from fastlfm.engine.kernels import moe
    from fastlfm.ops import moe_route

    monkeypatch.setattr(moe, "_route_kernel", None)  # a launch would fail
    monkeypatch.setattr(moe, "ROUTE_KERNEL_MAX_TOKENS", 4)
    g = torch.Generator().manual_seed(0)
    x, gate, bias = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    got, want = moe.route_top_k(x, gate, bias, 2, True, 1.5), moe_route(x, gate, bias, 2, True, 1.5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_history_splits_pick_what_was_fastest_on_the_h200(monkeypatch):
    """Decode attention's split count at the batch sizes timed on an H200 (132 SMs, LFM2's 8 KV heads,
    1k and 2k tokens of history; bench/decode_attention.py, BENCHMARKS.md session 10): the measured
    fastest, or within 3% of it (batch 128: 1 split 79 / 152 us, 2 splits 84 / 155, 4 splits 81 / 147)."""
    import types

    from fastlfm.engine.kernels.paged_attention import num_history_splits

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=132))
    measured_best = {32: 2, 64: 1, 100: 2, 128: 1}
    assert {b: num_history_splits(b, 8, torch.device("cuda")) for b in measured_best} == measured_best
    # small batches: split (BENCHMARKS.md, 2026-12-01: batch 1 in 32 splits 6.6 us vs 8.2 in one; batch 8 in 4, 7.2 vs 8.4)
    assert [num_history_splits(b, 8, torch.device("cuda")) for b in (1, 8)] == [32, 4]
