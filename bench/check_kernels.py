"""Check the engine's Triton kernels against the eager reference path on random inputs.

On a GPU:  PYTHONPATH=src python bench/check_kernels.py
On a CPU:  TRITON_INTERPRET=1 PYTHONPATH=src python bench/check_kernels.py --device cpu [--compile]
(triton's interpreter; fp32 and fp16 there). Exits non-zero on a mismatch. Every output is
poisoned (NaN) before the kernel runs, so an unwritten element fails the check.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastlfm.engine.context import paged_decode_attention_ref
from fastlfm.ops import causal_conv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_conv(device, dtype, B=5, D=1200, seed=0) -> float:
    from fastlfm.engine.kernels.conv import gated_conv_decode_step

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    bcx, weight, bias = rnd(B, 3 * D), rnd(D, 1, 3), rnd(D)
    slots_n = 9
    pool = rnd(slots_n, 2, D)
    slots = torch.tensor([3, 0, 7, 8, 5][:B], device=device)
    past = torch.tensor([7, 0, 1, 130, 0][:B], device=device)  # 0: a fresh sequence
    fresh = past == 0
    # reference: the model's eager math on the same state
    b, c, x = bcx.chunk(3, -1)
    state = pool[slots].clone()
    state[fresh] = 0
    ref_y, ref_state = causal_conv((b * x)[:, None], weight, bias, state.transpose(1, 2))
    ref = c * ref_y[:, 0]
    pool_k = pool.clone()
    out = gated_conv_decode_step(bcx, weight, bias, pool_k, slots, past)
    err = max(rel_err(out, ref), rel_err(pool_k[slots], ref_state.transpose(1, 2)))
    others = [i for i in range(slots_n) if i not in slots.tolist()]
    assert torch.equal(pool_k[others], pool[others]), "conv kernel wrote outside its slots"
    return err


def check_attention(device, dtype, Hq=8, Hkv=2, d=64, block=16, seed=0, splits=1) -> float:
    """`splits` > 1: the history split over programs and merged (more splits than blocks leaves some empty)."""
    from fastlfm.engine.kernels.paged_attention import paged_decode_attention

    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    lens = [1, 17, 16, 40, 3]  # history incl. the new token; 1 = empty history (graph padding row)
    B, nblocks = len(lens), 20
    k_cache, v_cache = rnd(nblocks, block, Hkv, d), rnd(nblocks, block, Hkv, d)
    perm = torch.randperm(nblocks - 1, generator=g).tolist()
    width = max(-(-n // block) for n in lens)
    tables, slot_map = [], []
    for i, n in enumerate(lens):
        need = -(-n // block)
        row = perm[:need]
        perm = perm[need:]
        tables.append(row + [nblocks - 1] * (width - need))
        slot_map.append(row[(n - 1) // block] * block + (n - 1) % block)
    tables = torch.tensor(tables, dtype=torch.int32, device=device)
    slot_map = torch.tensor(slot_map, device=device)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    q, k_new = rnd(B, Hq, d), rnd(B, Hkv, d)
    v_all = rnd(B, Hkv + 3, d)  # a strided view, as the fused qkv split gives
    v_new = v_all[:, 1:Hkv + 1]
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kc_ref.view(-1, Hkv, d)[slot_map] = k_new
    vc_ref.view(-1, Hkv, d)[slot_map] = v_new
    ref = paged_decode_attention_ref(q, kc_ref, vc_ref, tables, context_lens)
    out = paged_decode_attention(q, k_new, v_new, k_cache, v_cache, tables, context_lens, slot_map, splits=splits)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "K/V cache write differs"
    return rel_err(out, ref)


def tiny_engine_case(device, dtype=torch.float32):
    """A tiny LFM2, four prompts, and the eager model's greedy tokens for them (the reference)."""
    import tempfile

    from fastlfm.models import Lfm2ForCausalLM
    from fastlfm.testing import tiny_config, write_checkpoint

    folder = write_checkpoint(tempfile.mkdtemp(), tiny_config("LFM2-350M", hidden=128, heads=4, kv_heads=2),
                              tokenizer=False)
    model = Lfm2ForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in (5, 40, 1, 23)]
    refs = []
    with torch.no_grad():
        for p in prompts:
            cache, ids, out = model.make_cache(), torch.tensor([p], device=device), []
            for _ in range(NEW_TOKENS):
                t = int(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].argmax())
                out.append(t)
                ids = torch.tensor([[t]], device=device)
            refs.append(out)
    return model, prompts, refs


NEW_TOKENS = 12


def run_engine(engine, prompts) -> list[list[int]]:
    from fastlfm.sampling import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    engine.check_no_leaks()
    return [o.token_ids for o in outs]


def check_engine(device) -> bool:
    """The engine with its Triton path (fused kernels in decode and mixed steps, chunked
    prefill, async scheduling) gives the eager model's greedy tokens (fp32: exactly)."""
    from fastlfm.engine import LLMEngine

    model, prompts, refs = tiny_engine_case(device)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                       num_kv_blocks=32, async_scheduling=True, enforce_eager=device == "cpu")
    engine.runner.use_triton = True  # on CPU: triton's interpreter
    return run_engine(engine, prompts) == refs


def check_compiled_decode(device) -> bool:
    """torch.compile traces a whole decode step as one graph (the kernels are custom ops, so
    there is no break at the mixing calls), and the compiled step, replayed on the graph
    path's static buffers, gives the eager model's greedy tokens."""
    import torch._dynamo as dynamo

    from fastlfm.engine import LLMEngine
    from fastlfm.engine.kernels import ops  # noqa: F401 (registers the custom ops)

    model, prompts, refs = tiny_engine_case(device)
    engine = LLMEngine(model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, block_size=16,
                       num_kv_blocks=32, async_scheduling=True, enforce_eager=True)
    runner = engine.runner
    runner.use_triton = True
    B = 4
    step_inputs = (torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device),
                   torch.ones(B, dtype=torch.long, device=device),
                   torch.full((B, runner.max_blocks_per_seq), runner.padding_block, dtype=torch.int32, device=device),
                   torch.full((B,), runner.padding_slot, dtype=torch.long, device=device))
    with torch.inference_mode():
        explained = dynamo.explain(runner._decode_forward)(*step_inputs)
    print(f"decode step under torch.compile: {explained.graph_count} graph(s), {explained.graph_break_count} "
          f"break(s) {[str(b.reason)[:120] for b in explained.break_reasons][:3]}")
    dynamo.reset()
    runner.decode_forward = torch.compile(runner._decode_forward, dynamic=True)
    runner.capture_graphs(B)  # CUDA graphs on a GPU; eager replays of the same buffers on CPU
    same = run_engine(engine, prompts) == refs
    print(f"compiled decode graphs: greedy tokens {'equal' if same else 'DIFFER from'} the eager model's")
    return same and explained.graph_count == 1 and explained.graph_break_count == 0


def time_attention_splits(Hq=32, Hkv=8, d=64, block=64, history=384) -> None:
    """Batch-1 paged decode (LFM2-1.2B heads), one program per KV head vs the split history."""
    import triton.testing

    from fastlfm.engine.kernels.paged_attention import num_history_splits, paged_decode_attention

    dev, dt = "cuda", torch.bfloat16
    for B in (1, 8, 100):
        nb = -(-(history + 1) // block)
        k_cache = torch.randn(B * nb + 1, block, Hkv, d, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        tables = torch.arange(B * nb, device=dev, dtype=torch.int32).view(B, nb)
        lens = torch.full((B,), history + 1, device=dev, dtype=torch.int32)
        slots = tables[:, -1].long() * block + history % block
        q, kn, vn = (torch.randn(B, h, d, device=dev, dtype=dt) for h in (Hq, Hkv, Hkv))
        auto = num_history_splits(B, Hkv, q.device)
        us = [1e3 * triton.testing.do_bench_cudagraph(lambda n=n: paged_decode_attention(q, kn, vn, k_cache, v_cache, tables,
                                                                               lens, slots, splits=n))
              for n in (1, auto)]
        print(f"paged attention, batch {B}, history {history}: {us[0]:.1f} us in 1 split, {us[1]:.1f} us in {auto}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also check the torch.compile'd decode step "
                    "(one graph, tokens equal; minutes on CPU)")
    args = ap.parse_args()
    # triton's interpreter computes garbage for bf16 (even x * y), so on CPU fp16 stands in
    # for the half-precision rounding paths.
    dtypes = [torch.float32, torch.float16] if args.device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    ok = True
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        checks = [("gated conv decode", check_conv), ("paged attention decode", check_attention)]
        checks += [(f"  history in {n} splits", lambda *a, n=n, **k: check_attention(*a, splits=n, **k)) for n in (2, 8)]
        for name, fn in checks:
            errs = [fn(args.device, dtype, seed=s) for s in range(3)]
            good = all(e == e and e <= tol for e in errs)  # e == e: NaN fails
            ok &= good
            print(f"{name:24s} {str(dtype):15s} max rel err {max(errs):.2e} (tol {tol:.0e}) {'ok' if good else 'FAIL'}")
    if args.device == "cuda":
        time_attention_splits()
    same = check_engine(args.device)
    ok &= same
    print(f"engine (Triton path, fp32) greedy tokens {'equal' if same else 'DIFFER from'} the eager model's")
    if args.compile:
        ok &= check_compiled_decode(args.device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
