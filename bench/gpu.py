"""GPU benchmark of the engine vs transformers on random bf16 weights (LFM2-1.2B / 350M shapes; LFM2-8B-A1B
and LFM2-24B-A2B, the MoE models, with weights made on the GPU: bench_moe_model).

Run on a CUDA machine from the repo root:  PYTHONPATH=src python bench/gpu.py [--models ...]
CPU smoke runs:  PYTHONPATH=src python bench/gpu.py --device cpu --tiny --models LFM2-8B-A1B  (the MoE benchmark)
                 PYTHONPATH=src python bench/gpu.py --device cpu --tiny --models LFM2-1.2B    (user paths + guide)
Prints one table (fastlfm and the transformers peer measured in the same run, each with its
ratio to the hardware limit) and writes it to $OUT/gpu_table.md when $OUT is set.

Limits: decode is bound by reading the weights once per step (weight bytes / measured copy
bandwidth); prefill by bf16 matmul FLOPs (2 * params * tokens / measured matmul rate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlfm.engine import LLMEngine
from fastlfm.models import Lfm2ForCausalLM
from fastlfm.sampling import SamplingParams
from fastlfm.testing import MOE_SHAPES, real_config, real_moe_config, tiny_config, write_checkpoint

DEV = "cuda"


def log(*a):
    print(*a, flush=True)


def sync_time():
    if DEV == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(20):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (s.elapsed_time(e) / 1e3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10):
        a @ b
    e.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (s.elapsed_time(e) / 1e3)


def prompts(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 60000, (length,), generator=g).tolist() for _ in range(n)]


def eager_greedy(model, prompt, n):
    """Reference: the eager model with Lfm2Cache, token by token; returns tokens and each step's logits."""
    cache, ids, toks, step_logits = model.make_cache(), torch.tensor([prompt], device=DEV), [], []
    for _ in range(n):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
        toks.append(int(logits.argmax()))
        step_logits.append(logits)
        ids = torch.tensor([[toks[-1]]], device=DEV)
    return toks, step_logits


def divergence(model32, prompt, ref, ref_logits, k, token) -> tuple[bool, tuple]:
    """Whether the engine's `token` instead of the reference's ref[k] at step k is a near-tie: the fp32
    model (same weights, the exact-arithmetic oracle) puts the two logits closer together than twice
    the bf16 rounding error at that step, so bf16 rounding decides their order. The error scale is
    the bf16 reference's largest deviation from fp32 over the step's leading logits (fp32's top 8 and
    the two tokens): one bf16 forward's rounding, measured where the choice is made. Also returns
    (bf16 margin, fp32 margin, bf16 error) for the log."""
    l32 = model32(input_ids=torch.tensor([prompt + ref[:k]], device=DEV), logits_to_keep=1).logits[0, -1].float()
    l16, want = ref_logits[k], ref[k]
    margin16, margin32 = float(l16[want] - l16[token]), float(l32[want] - l32[token])
    leading = torch.cat((l32.topk(8).indices, torch.tensor([want, token], device=DEV)))
    err16 = float((l16[leading] - l32[leading]).abs().max())
    return abs(margin32) <= 2 * err16, (round(margin16, 4), round(margin32, 4), round(err16, 4))


@torch.no_grad()
def check_correctness(engine, model, notes, judge=None, n_new: int = 32, max_len: int | None = None) -> bool:
    """Engine greedy tokens vs the eager model's: 8 prompts as one batch, then the first two alone
    (batch-1 decode steps, which take the fused projection kernels where they are tuned). Where a
    sequence diverges, the fp32 model (`judge()` builds it: the same weights in float32) judges whether
    the step was a near-tie (`divergence`); without a judge a divergence is only reported."""
    lens = [n if max_len is None else min(n, max_len - n_new - 1) for n in (17, 64, 128, 5, 300, 33, 250, 90)]
    ps = [p[:n] for p, n in zip(prompts(8, max(lens), 1), lens)]
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    refs = [eager_greedy(model, p, n_new) for p in ps]
    model32 = None
    ok = True
    for what, runs in (("batch 8", [ps]), ("batch 1", [[p] for p in ps[:2]])):
        outs = [o for run in runs for o in engine.generate(run, params)]
        exact, near_tie, other = 0, [], []
        for i, (o, (ref, ref_logits)) in enumerate(zip(outs, refs)):
            if o.token_ids == ref:
                exact += 1
                continue
            k = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            if judge is not None and model32 is None:
                model32 = judge()
            if model32 is not None:
                tie, margins = divergence(model32, ps[i], ref, ref_logits, k, o.token_ids[k])
                (near_tie if tie else other).append((i, k, *margins))
            else:
                other.append((i, k))
        judged = "diverged after a near-tie (seq, step, bf16 margin, fp32 margin, bf16 error)" if judge is not None \
            else "(no fp32 judge for this model) diverged at (seq, step)"
        notes.append(f"correctness ({what}): {exact}/{len(outs)} identical; {judged}: {near_tie if judge else other}"
                     + (f"; real mismatches: {other}" if judge is not None else ""))
        log(notes[-1])
        ok &= not (judge is not None and other)
    del model32
    free_device_memory()
    return ok


def bench_dtype() -> str:
    """bf16 on the GPU; float32 for the CPU smoke runs (bf16 matmuls are slow on CPUs without bf16 units)."""
    return "bfloat16" if DEV == "cuda" else "float32"


def hf_peer(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, bench_dtype())).to(DEV).eval()


def hf_generate_tps(hf, batch, prompt_len, new):
    ids = torch.tensor(prompts(batch, prompt_len, 5), device=DEV)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    hf.generate(ids[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    t = sync_time()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    dt = sync_time() - t
    assert out.shape[1] == prompt_len + new
    return batch * new / dt


def hf_prefill_tps(hf, batch, length):
    ids = torch.tensor(prompts(batch, length, 6), device=DEV)
    with torch.no_grad():
        hf(ids[:1, :128], logits_to_keep=1)
        t = sync_time()
        for i in range(0, batch, 8):
            hf(ids[i:i + 8], logits_to_keep=1)
        dt = sync_time() - t
    return batch * length / dt


def graph_replay_ms(graph, reps: int) -> float:
    """GPU time of one replay of a captured graph (events around `reps` replays)."""
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def save_profile(title: str, table: str) -> None:
    """All profiles of a run in one file, $OUT/profiles.txt (the device tool returns at most 8 files)."""
    with open(Path(os.environ.get("OUT", "/tmp"), "profiles.txt"), "a") as f:
        f.write(f"## {title}\n{table}\n\n")


def kernel_profile(fn, name, tag, reps=10) -> str:
    """GPU time per call by kernel (torch.profiler sees the kernels inside graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90)
    save_profile(f"decode step, {name}, {tag}", table)
    launches = sum(e.count for e in events) / reps
    total = sum(e.device_time_total for e in events) / reps
    top = sorted(events, key=lambda e: -e.device_time_total)[:8]
    return (f"{launches:.0f} kernels, {total / 1e3:.3f} ms summed; " + "; ".join(
        f"{e.key[:38]} x{e.count // reps} {e.device_time_total / reps / 1e3:.3f}" for e in top))


def host_breakdown(engine, run) -> str:
    """Wall time of `run()` split into the engine's parts, each exclusive of the parts it calls:
    scheduling, launching (metadata, graph launch), sampling (with grammars: waiting for their
    masks, applying them), advancing the grammars, output processing, and waiting for a step's ids
    (GPU-bound time)."""
    from fastlfm.engine import llm_engine

    spent = dict(schedule=0.0, launch=0.0, sample=0.0, advance=0.0, process=0.0, wait=0.0)
    steps, stack = [0], []

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            stack.append(0.0)  # time spent in timed parts called from this one
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                inner = stack.pop()
                spent[key] += dt - inner
                if stack:
                    stack[-1] += dt
        return wrapper

    fetch = llm_engine.StepInFlight.fetch
    names = [("schedule", engine.scheduler, "schedule"), ("launch", engine, "_forward"), ("launch", engine, "_launch"),
             ("sample", engine, "_sample"), ("advance", engine, "_feed_grammars"), ("process", engine, "_process")]
    for key, obj, attr in names:
        setattr(obj, attr, timed(key, getattr(obj, attr)))
    llm_engine.StepInFlight.fetch = timed("wait", fetch)
    step = engine.step

    def counted():
        steps[0] += 1
        return step()
    engine.step = counted
    t = time.perf_counter()
    try:
        run()
    finally:
        total = time.perf_counter() - t
        for _, obj, attr in names:
            delattr(obj, attr)  # the instance attributes set above: the class's methods show again
        llm_engine.StepInFlight.fetch = fetch
        del engine.step
    n = max(steps[0], 1)
    return (f"{n} steps, {1e3 * total / n:.2f} ms/step: " + ", ".join(f"{k} {1e3 * v / n:.2f}" for k, v in spent.items())
            + f", other {1e3 * (total - sum(spent.values())) / n:.2f} ms")


def batch1_decode(engine, prompt, new=512) -> tuple[float, float]:
    """One request of `new` tokens after a warm-up: (time to first token s, decode tok/s after it)."""
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_new_tokens=16, **greedy))  # warm-up
    engine.add_request(prompt, SamplingParams(max_new_tokens=new, **greedy), "b1")
    t0 = sync_time()
    t_first = None
    while engine.has_unfinished():
        for o in engine.step():
            if t_first is None and o.new_token_ids:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, (new - 1) / (t_end - t_first)


def ttft_prefill_graph_ab(engine, name, notes, lengths=(128, 1024), reps=7) -> None:
    """Median time to first token of one prompt alone, with the engine's prefill graphs and with them off
    (every kernel launched from the host), interleaved, after a warm-up of each."""
    runner, greedy = engine.runner, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    sizes = runner.prefill_sizes
    for length in lengths:
        p = prompts(1, length, 5)[0]
        times = {"graph": [], "eager": []}
        for i in range(reps + 1):
            for mode in times:
                runner.prefill_sizes = sizes if mode == "graph" else []
                t = sync_time()
                engine.generate([p], greedy)
                if i:  # the first round is the warm-up (capture, first use of the shapes)
                    times[mode].append(sync_time() - t)
        runner.prefill_sizes = sizes
        g, e = (1e3 * sorted(times[m])[reps // 2] for m in ("graph", "eager"))
        notes.append(f"{name}: TTFT of one {length}-token prompt (generate of 1 token, median of {reps}): "
                     f"prefill graph {g:.1f} ms, eager prefill {e:.1f} ms")
        log(notes[-1])


def bench_checkpoint(name) -> Path:
    """/tmp/ckpt-NAME: random bf16 weights of the model's real shape, with the full-size byte-level test
    tokenizer (65,536 ids); written once."""
    folder = Path(f"/tmp/ckpt-{name}")
    if not (folder / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(folder, real_config(name), dtype=torch.bfloat16, tokenizer=False)
        log(f"{name}: wrote checkpoint in {time.perf_counter() - t:.1f}s")
    if not (folder / "tokenizer.json").exists():
        from fastlfm.testing.tokenizer_files import write_tokenizer_files

        write_tokenizer_files(folder, vocab_size=real_config(name)["vocab_size"])
    return folder


def bench_model(name, bw, flops, args, rows, notes):
    folder = bench_checkpoint(name)
    model = Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device=DEV)
    params = {id(p): p for p in model.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    n_params = sum(p.numel() for p in params.values())
    floor_tps = bw / weight_bytes
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_model_len=4096,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.3, compile=args.compile,
                           enable_prefix_caching=False)  # runs repeat their prompts: measure work, not cache hits
        mode = "graphs+compile" if args.compile else "graphs"
    except Exception as e:  # keep the run useful if inductor fails on this machine
        log(f"compile failed ({type(e).__name__}: {str(e)[:300]}); falling back to eager graphs")
        import gc

        torch._dynamo.reset()
        e = None
        gc.collect()
        torch.cuda.empty_cache()
        engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_model_len=4096,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.3, compile=False,
                           enable_prefix_caching=False)
        mode = "graphs"
    log(f"{name}: engine ready in {time.perf_counter() - t:.1f}s ({mode}); "
        f"{engine.block_manager.num_blocks} KV blocks of {engine.block_manager.block_size}")
    ok = check_correctness(engine, model, notes,
                           judge=lambda: Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.float32, device=DEV))
    if args.correctness_only:
        return ok
    greedy = dict(temperature=0.0, ignore_eos=True)

    # batch-1 decode + TTFT
    p = prompts(1, 128, 2)[0]
    ttft, b1 = batch1_decode(engine, p)
    ttft_floor = weight_bytes / bw + 2 * n_params * 128 / flops
    ttft_prefill_graph_ab(engine, name, notes)
    # what the decode step spends: one graph replay alone vs the whole engine step
    runner = engine.runner
    bs1 = runner.graphs[1]
    replay_ms = graph_replay_ms(bs1, 100)
    if args.profile_decode:  # the same decode with the host reading each step's ids before the next launch
        engine.async_scheduling = False
        engine.add_request(p, SamplingParams(max_new_tokens=257, **greedy), "b1-sync")
        t_sync, n_sync = None, 0
        while engine.has_unfinished():
            for o in engine.step():
                n_sync += len(o.new_token_ids)
                if t_sync is None:
                    t_sync, n_sync = time.perf_counter(), 0
        sync_tps = n_sync / (time.perf_counter() - t_sync)
        engine.async_scheduling = True
        notes.append(f"{name}: batch-1 decode with synchronous scheduling {sync_tps:.0f} tok/s "
                     f"(asynchronous: {b1:.0f})")
        log(notes[-1])
        notes.append(f"{name}: batch-1 graph replay, GPU time by kernel: " + kernel_profile(bs1.replay, name, "b1"))
        log(notes[-1])
    del runner, bs1
    notes.append(f"{name}: batch-1 step {1e3 / b1:.3f} ms wall, graph replay alone {replay_ms:.3f} ms, "
                 f"weight-read floor {1e3 / floor_tps:.3f} ms")
    log(notes[-1])

    # throughput: 100 x (1024 + 1024)
    reqs = prompts(100, 1024, 3)
    # A cold run first: the first pass over these shapes JIT-compiles Triton specialisations
    # (split counts of mixed steps), picks GEMM algorithms for the prefill chunks, etc.
    t = sync_time()
    engine.generate(reqs, SamplingParams(max_new_tokens=1024, **greedy))
    cold = sync_time() - t
    t = sync_time()
    outs = engine.generate(reqs, SamplingParams(max_new_tokens=1024, **greedy))
    dt = sync_time() - t
    notes.append(f"{name}: throughput run {dt:.2f} s warm (the table), {cold:.2f} s cold (first run of these shapes)")
    log(notes[-1])
    assert all(len(o.token_ids) == 1024 for o in outs)
    thr = 100 * 1024 / dt
    if args.profile_decode:  # the same run again, timed by part of the engine step
        notes.append(f"{name}: throughput run, host time per engine step: " + host_breakdown(
            engine, lambda: engine.generate(reqs, SamplingParams(max_new_tokens=1024, **greedy))))
        log(notes[-1])
    if args.profile_decode:  # the batch-100 decode step: GPU time of its graph vs the engine's wall time per step
        runner = engine.runner
        g100 = runner.graphs[runner._padded_size(100)]
        notes.append(f"{name}: throughput run {dt:.2f} s for 1024 steps ({1e3 * dt / 1024:.2f} ms/step incl. prefill); "
                     f"batch-{runner._padded_size(100)} graph replay {graph_replay_ms(g100, 20):.3f} ms; by kernel: "
                     + kernel_profile(g100.replay, name, "b100"))
        log(notes[-1])
        del runner, g100
    kv_per_tok = engine.runner.kv_caches[0][0][0, 0].numel() * 2 * 2 * len(engine.runner.kv_caches)
    # limit: every decode step reads the weights + the KV of all 100 histories (mean 1536 tokens)
    thr_floor_s = 1024 * (weight_bytes + 100 * 1536 * kv_per_tok) / bw + 2 * n_params * 102400 / flops
    thr_limit = 102400 / thr_floor_s
    engine.check_no_leaks()

    # prefill: 32 x 2048
    reqs = prompts(32, 2048, 4)
    engine.generate(reqs[:2], SamplingParams(max_new_tokens=1, **greedy))
    t = sync_time()
    engine.generate(reqs, SamplingParams(max_new_tokens=1, **greedy))
    dt = sync_time() - t
    pre = 32 * 2048 / dt
    if args.profile_prefill:  # what a 16k-token prefill step spends its GPU time on
        try:
            from torch.profiler import ProfilerActivity, profile
    
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.generate(reqs[:8], SamplingParams(max_new_tokens=1, **greedy))
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=60)
            save_profile(f"prefill step, {name}", table)
            top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]
            notes.append(f"{name}: prefill step (8 x 2048) GPU time by kernel (ms): " + "; ".join(
                f"{e.key[:40]} {e.device_time_total / 1e3:.1f}" for e in top))
            log(notes[-1])
        except Exception as e:
            log(f"prefill profile failed: {e!r}")
    pre_limit = flops / (2 * n_params)
    peak = torch.cuda.max_memory_allocated() / 2**30
    kv_gb = sum(k.numel() * k.element_size() * 2 for k, _ in engine.runner.kv_caches) / 2**30
    engine.check_no_leaks()
    runner = engine.runner
    if runner.fused_linear_shapes:  # A/B, last (it leaves only the batch-1 graph): cuBLAS projections instead
        runner.fused_linear_shapes = frozenset()
        runner.capture_graphs(1)
        _, b1_cublas = batch1_decode(engine, p)
        replay_cublas = graph_replay_ms(runner.graphs[1], 100)
        notes.append(f"{name}: batch-1 decode with the fused projection kernel (tuned shapes): {b1:.0f} tok/s "
                     f"(replay {replay_ms:.3f} ms); with cuBLAS + separate kernels for all: {b1_cublas:.0f} tok/s "
                     f"(replay {replay_cublas:.3f} ms)")
        log(notes[-1])
        engine.check_no_leaks()
    del runner
    del engine
    del model
    free_device_memory()
    try:
        user = bench_user_paths(name, folder, args, notes, raw_thr=thr)
        user.update(bench_guide(name, folder, notes))
    except Exception as e:  # the raw engine's rows still make the table
        import traceback

        traceback.print_exc()
        notes.append(f"{name}: user paths FAILED: {type(e).__name__}: {str(e)[:300]}")
        user, ok = {}, False
        free_device_memory()
    if args.start_time and name == "LFM2-1.2B":
        engine_start_times(name, folder, notes)

    # transformers peer, same weights
    hf_b1 = hf_thr = hf_pre = float("nan")
    if not args.no_hf:
        hf = hf_peer(folder)
        hf_b1 = hf_generate_tps(hf, 1, 128, args.hf_b1_tokens)
        hf_thr = hf_generate_tps(hf, 100, 1024, args.hf_thr_tokens)
        hf_pre = hf_prefill_tps(hf, 32, 2048)
        del hf
        torch.cuda.empty_cache()

    def row(metric, ours, peer, limit, unit, goal=""):
        rows.append((name, metric, ours, peer, limit, unit, goal))

    row("batch-1 decode (128 + 512)", b1, hf_b1, floor_tps, "tok/s", ">= 1000" if name == "LFM2-1.2B" else ">= 2000")
    row("throughput 100 x (1024 + 1024)", thr, hf_thr, thr_limit, "out tok/s", ">= 30000" if name == "LFM2-1.2B" else "")
    row("prefill 32 x 2048", pre, hf_pre, pre_limit, "tok/s", ">= 100000" if name == "LFM2-1.2B" else "")
    row("TTFT batch 1 (prompt 128)", ttft * 1e3, float("nan"), ttft_floor * 1e3, "ms")
    row("peak GPU memory (engine)", peak, float("nan"), torch.cuda.get_device_properties(0).total_memory / 2**30,
        f"GiB (KV pool {kv_gb:.1f})")
    user_rows(name, user, rows, hf_b1, hf_thr, floor_tps, thr_limit)
    return ok


def user_rows(name, user, rows, hf_b1, hf_thr, floor_tps, thr_limit) -> None:
    """The user paths' rows: peer "b1" is transformers' batch-1 generate, "thr" its batch-100 one."""
    goals = USER_GOALS.get(name, {})
    for metric, (value, peer) in user.items():
        rows.append((name, metric, value, {"b1": hf_b1, "thr": hf_thr}[peer], floor_tps if peer == "b1" else thr_limit,
                     "tok/s" if peer == "b1" else "out tok/s", goals.get(metric, "")))


# ----------------------------------------------------------------------------- user paths (issue 14)
USER_GOALS = {
    "LFM2-1.2B": {"LLM.chat, one conversation (512 new)": ">= 1000", "model.generate, one prompt (512 new)": ">= 900",
                  "LLM.generate 100 x (1024 + 1024), tokenizer attached": ">= 40000, within 5% of the raw engine"},
    "LFM2-350M": {"LLM.chat, one conversation (512 new)": ">= 2000"},
}
GUIDE_GENERATE = "guide example: AutoModelForCausalLM + apply_chat_template + model.generate (512 new)"
GUIDE_PIPELINE = "guide example: pipeline('text-generation') on a chat (512 new)"
USER_GOALS["LFM2-1.2B"].update({GUIDE_GENERATE: ">= 900", GUIDE_PIPELINE: ">= 900"})


def bench_user_paths(name, folder, args, notes, raw_thr: float) -> dict[str, tuple[float, str]]:
    """What users run, as they call it, with the checkpoint's full-size tokenizer attached: LLM.chat on one
    conversation, model.generate on one prompt (the same engine, shared), LLM.generate on 100 x 1k/1k.
    Returns {metric: (tok/s, which transformers row is its peer)}."""
    from fastlfm import LLM

    greedy = dict(temperature=0.0, ignore_eos=True)
    t = sync_time()
    llm = LLM(str(folder), dtype=bench_dtype(), device=DEV,
              engine_options=dict(max_num_seqs=args.max_num_seqs, max_model_len=4096, max_num_batched_tokens=16384,
                                  gpu_memory_utilization=0.3, compile=args.compile and DEV == "cuda",
                                  enable_prefix_caching=False))  # warm-ups repeat the measured prompts
    loaded = sync_time() - t
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
    llm.chat(messages, max_new_tokens=16, **greedy)  # builds the engine: compile + CUDA graphs
    ready = sync_time() - t
    notes.append(f"{name}: LLM(folder) loaded in {loaded:.1f} s, first chat (engine built, compiled, graphs "
                 f"captured) done after {ready:.1f} s")
    log(notes[-1])
    out = {}
    t = sync_time()
    res = llm.chat(messages, max_new_tokens=512, **greedy)
    dt = sync_time() - t
    assert len(res.token_ids) == 512 and isinstance(res.text, str)
    out["LLM.chat, one conversation (512 new)"] = (512 / dt, "b1")
    ids = torch.tensor([llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)], device=DEV)
    llm.model.generate(ids, max_new_tokens=16, do_sample=False)  # warm-up of the shared engine
    t = sync_time()
    gen = llm.model.generate(ids, max_new_tokens=512, do_sample=False, ignore_eos=True)
    dt = sync_time() - t
    assert gen.shape[1] == ids.shape[1] + 512
    out["model.generate, one prompt (512 new)"] = (512 / dt, "b1")
    if name == "LFM2-1.2B" or args.tiny:
        reqs = prompts(100, 1024, 3) if not args.tiny else [[t % 1000 + 14 for t in r] for r in prompts(4, 24, 3)]
        params = SamplingParams(max_new_tokens=1024 if not args.tiny else 8, **greedy)
        llm.generate(reqs, params)  # cold run of these shapes, as for the raw engine
        t = sync_time()
        results = llm.generate(reqs, params)
        dt = sync_time() - t
        assert all(len(r.token_ids) == params.max_new_tokens and isinstance(r.text, str) for r in results)
        thr = len(reqs) * params.max_new_tokens / dt
        out["LLM.generate 100 x (1024 + 1024), tokenizer attached"] = (thr, "thr")
        notes.append(f"{name}: LLM.generate 100 x 1k/1k with the text of every request: {thr:,.0f} tok/s, "
                     f"{thr / raw_thr:.3f} of the raw engine's {raw_thr:,.0f} in the same run")
        log(notes[-1])
    for metric, (value, _) in out.items():
        log(f"{name}: {metric}: {value:,.0f} tok/s")
    llm.engine.check_no_leaks()
    del llm, res, gen
    free_device_memory()
    return out


def bench_guide(name, folder, notes) -> dict[str, tuple[float, str]]:
    """Liquid AI's transformers guide as its users run it on fastlfm (its code with `from fastlfm import`): the
    basic example (AutoModelForCausalLM with device_map="auto", torch_dtype="bfloat16" (bench_dtype), AutoTokenizer,
    apply_chat_template(return_tensors="pt"), model.generate) and the pipeline call, each with the model's own
    engine (default options) and the full-size tokenizer. Timed after a first call that builds the engine
    (its time is in the notes). The random weights would soon draw an eos: ignore_eos=True, fastlfm's keyword,
    keeps 512 new tokens (the guide's max_new_tokens); the pipeline samples, as transformers' does by default."""
    from fastlfm import AutoModelForCausalLM, AutoTokenizer, pipeline

    model_id = str(folder)
    t = sync_time()
    model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto", torch_dtype=bench_dtype())
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    input_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is C. elegans?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        tokenize=True,
    ).to(model.device)
    model.generate(input_ids, max_new_tokens=16)  # the first call builds the engine (compile, CUDA graphs)
    first = sync_time() - t
    t = sync_time()
    output = model.generate(input_ids, max_new_tokens=512, ignore_eos=True)
    dt = sync_time() - t
    response = tokenizer.decode(output[0][len(input_ids[0]):], skip_special_tokens=True)
    assert output.shape[1] == input_ids.shape[1] + 512 and isinstance(response, str)
    out = {GUIDE_GENERATE: (512 / dt, "b1")}
    del model, output
    free_device_memory()

    t = sync_time()
    generator = pipeline("text-generation", model_id, torch_dtype="auto", device_map="auto")
    messages = [{"role": "user", "content": "Give me a short introduction to large language models."}]
    generator(messages, max_new_tokens=16)  # builds the engine
    first_pipeline = sync_time() - t
    t = sync_time()
    messages = generator(messages, max_new_tokens=512, ignore_eos=True)[0]["generated_text"]
    dt = sync_time() - t
    assert [m["role"] for m in messages] == ["user", "assistant"]
    out[GUIDE_PIPELINE] = (512 / dt, "b1")
    notes.append(f"{name}: guide example: load + first generate (engine built) {first:.1f} s, pipeline(...) + first "
                 f"call {first_pipeline:.1f} s")
    log(notes[-1])
    for metric, (value, _) in out.items():
        log(f"{name}: {metric}: {value:,.0f} tok/s")
    del generator
    free_device_memory()
    return out


def bench_guide_only(name, args, rows, notes) -> bool:
    """--device cpu --tiny (a smoke run: the user paths and the guide's example at a tiny width), or --guide-only on
    the GPU (the guide's example alone on the real shape); transformers' batch-1 generate is the peer (16 new tokens
    on CPU, --hf-b1-tokens on the GPU)."""
    tiny = DEV != "cuda"
    if tiny:
        folder = Path(f"/tmp/ckpt-{name}-tiny")
        if not (folder / "config.json").exists():
            write_checkpoint(folder, tiny_config(name, vocab_size=real_config(name)["vocab_size"]))  # full-size tokenizer
        user = bench_user_paths(name, folder, args, notes, raw_thr=float("nan"))
    else:
        folder, user = bench_checkpoint(name), {}
    user.update(bench_guide(name, folder, notes))
    hf_b1 = float("nan")
    if not args.no_hf:
        hf_b1 = hf_generate_tps(hf_peer(folder), 1, 128, 16 if tiny else args.hf_b1_tokens)
        free_device_memory()
    user_rows(name, user, rows, hf_b1, float("nan"), float("nan"), float("nan"))
    return True


_START_SCRIPT = """
import sys, time, torch
t0 = time.perf_counter()
from fastlfm import LLM
llm = LLM(sys.argv[1], dtype="bfloat16", device="cuda", engine_options=dict(max_num_seqs=128, max_model_len=4096,
          gpu_memory_utilization=0.3))
t1 = time.perf_counter()
llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, temperature=0.0, ignore_eos=True)
torch.cuda.synchronize()
print(f"START {t1 - t0:.2f} {time.perf_counter() - t0:.2f}", flush=True)
"""


def engine_start_times(name, folder, notes) -> None:
    """Seconds from `python` to the first chat reply (model load, engine build, torch.compile, CUDA graphs), in a
    fresh process with empty compile caches, then again in another fresh process with the caches the first one
    left (inductor's FX graph / autograd caches and Triton's kernel cache, on disk)."""
    import subprocess
    import tempfile

    cache = tempfile.mkdtemp(prefix="fastlfm-compile-cache-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
    times = []
    for run in ("empty caches", "warm caches"):
        p = subprocess.run([sys.executable, "-c", _START_SCRIPT, str(folder)], env=env, capture_output=True,
                           text=True, timeout=400)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("START ")), None)
        if line is None:
            notes.append(f"{name}: engine start ({run}) failed: {p.stderr[-400:]}")
            log(notes[-1])
            return
        load_s, total_s = map(float, line.split()[1:])
        times.append(f"{run}: {total_s:.1f} s to the first reply ({load_s:.1f} s of it import + load)")
    notes.append(f"{name}: engine start in a fresh process, " + "; ".join(times) + " (goal: second start < 20 s)")
    log(notes[-1])


# ----------------------------------------------------------------------------- LFM2-MoE (issue 17)


@dataclass
class MoeSizes:
    """Workload of the MoE benchmark: the real one on a GPU, a tiny one for a CPU smoke run (--tiny)."""
    b1_prompt: int = 128
    b1_new: int = 512
    thr_requests: int = 100
    thr_prompt: int = 1024
    thr_new: int = 1024
    pre_requests: int = 32
    pre_len: int = 2048
    check_new: int = 32
    max_model_len: int = 4096
    batched_tokens: int = 16384


TINY_MOE = MoeSizes(b1_prompt=16, b1_new=24, thr_requests=4, thr_prompt=24, thr_new=8, pre_requests=2, pre_len=48,
                    check_new=6, max_model_len=128, batched_tokens=64)


def moe_config(name: str, tiny: bool) -> dict:
    """The released layout; --tiny: the same layer pattern, experts and top-k at a small width."""
    if not tiny:
        return real_moe_config(name)
    return real_moe_config(name, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")


def moe_weight_bytes(model) -> tuple[float, float, int, int]:
    """(bytes of all non-expert weights, bytes of all expert weights, experts per layer, top-k); tied weights once."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    expert = sum(p.numel() * p.element_size() for n, p in params if ".experts." in n)
    dense = sum(p.numel() * p.element_size() for n, p in params if ".experts." not in n)
    return dense, expert, model.config.num_experts, model.config.num_experts_per_tok


def experts_read_fraction(batch: int, num_experts: int, top_k: int) -> float:
    """Expected fraction of a layer's experts that a decode step of `batch` tokens reads (uniform routing)."""
    return 1.0 if batch > 1000 else 1 - (1 - top_k / num_experts) ** batch


def timed(fn):
    t = sync_time()
    out = fn()
    return out, sync_time() - t


def free_device_memory():
    """Drop what a deleted engine or model left: compiled graphs hold their tensors until dynamo forgets them."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def fp32_copy(model):
    """The model's weights in float32 (the exact-arithmetic judge), made in place on the device: no bf16 copy."""
    with torch.device("meta"):
        model32 = type(model)(model.config)
    model32.to_empty(device=DEV)
    model32.load_state_dict(model.state_dict())  # copy_ converts bf16 -> fp32 tensor by tensor
    for module in model32.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(torch.device(DEV))
    model32.tie_weights()
    return model32.eval()


def hf_moe_peer(model, config: dict):
    """transformers' Lfm2MoeForCausalLM on the same weights (our tensors assigned: no second copy once built)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device(DEV):
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    ours = model.state_dict()
    missing = set(hf.state_dict()) ^ set(ours)
    if missing:
        raise RuntimeError(f"parameter names differ from transformers {transformers.__version__}: {sorted(missing)[:6]}")
    hf.load_state_dict(ours, assign=True, strict=True)
    hf.tie_weights()
    return hf.eval()


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for both MoE kernels
MOE_TILE_TRIALS = ((16, 32, 128, 4, 4), (16, 64, 128, 4, 3), (16, 16, 256, 4, 3), (32, 64, 128, 4, 3),
                   (32, 32, 128, 4, 4), (64, 64, 64, 4, 3))


def time_moe_layer(model, bw, notes, tokens=(1, 16, 128, 4096)) -> None:
    """One MoE layer's experts at the real shape: the Triton kernels (graph-captured, as in a decode step)
    vs the model's grouped_mm path, and the weight-read floor of the experts the routing chose."""
    import triton.testing

    from fastlfm.engine.kernels.moe import fused_moe
    from fastlfm.ops import moe_swiglu_experts

    block = next(l.feed_forward for l in model.model.layers if hasattr(l.feed_forward, "experts"))
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    per_expert = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    for T in tokens:
        x = torch.randn(T, gate_up.shape[2], device=DEV, dtype=gate_up.dtype)
        with torch.no_grad():
            ids, w = block.route(x)
            hit = int(ids.unique().numel())
            triton_moe = lambda: fused_moe(x, ids, w, gate_up, down)  # noqa: E731
            graph_us = 1e3 * triton.testing.do_bench_cudagraph(triton_moe)  # as in the engine's decode graphs
            triton_us = 1e3 * triton.testing.do_bench(triton_moe)
            # (grouped_mm is timed without a graph: it is not the engine's path, and a capture it cannot
            # take would leave this process's CUDA state in doubt for the models after this one)
            grouped_us = 1e3 * triton.testing.do_bench(lambda: moe_swiglu_experts(x, ids, w, gate_up, down))
        notes.append(f"MoE layer {tuple(gate_up.shape)} / {tuple(down.shape)}, {T} tokens ({hit} experts hit): "
                     f"Triton {graph_us:.1f} us in a CUDA graph, {triton_us:.1f} us launched; torch grouped_mm path "
                     f"{grouped_us:.1f} us launched; weight-read floor {1e6 * hit * per_expert / bw:.1f} us")
        log(notes[-1])
        if T in (1, 128):  # other tiles for the next session's tuning (kernels/moe.default_config is untuned)
            tried = []
            for bm, bn, bk, warps, stages in MOE_TILE_TRIALS:
                tiles = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                cfg = dict(BLOCK_M=bm, gate_up=tiles, down=tiles)
                try:
                    us = 1e3 * triton.testing.do_bench_cudagraph(lambda: fused_moe(x, ids, w, gate_up, down, cfg))
                    tried.append(f"M{bm} N{bn} K{bk} w{warps} s{stages}: {us:.1f}")
                except Exception as e:  # e.g. out of shared memory
                    tried.append(f"M{bm} N{bn} K{bk} w{warps} s{stages}: {type(e).__name__}")
            notes.append(f"MoE layer, {T} tokens, other tiles (us, CUDA graph): " + "; ".join(tried))
            log(notes[-1])


def llm_throughput(model, config, engine_kw, reqs, params, name, notes) -> float:
    """Output tok/s of LLM(model, tokenizer).generate(reqs) (warm: after a cold run of the same shapes)."""
    from fastlfm.llm import LLM
    from fastlfm.testing.tokenizer_files import write_tokenizer_files

    tok_dir = Path(f"/tmp/fastlfm-moe-tokenizer-{config['vocab_size']}")
    if not (tok_dir / "tokenizer.json").exists():
        write_tokenizer_files(tok_dir, vocab_size=config["vocab_size"])
    t = time.perf_counter()
    llm = LLM(model, tokenizer=str(tok_dir), engine_options=engine_kw)
    greedy = dict(temperature=0.0, ignore_eos=True)
    llm.generate(reqs[:2], SamplingParams(max_new_tokens=4, **greedy))  # builds the engine (compile, graphs)
    notes.append(f"{name}: LLM ready in {time.perf_counter() - t:.1f}s")
    log(notes[-1])
    llm.generate(reqs, params)  # cold run of these shapes
    results, dt = timed(lambda: llm.generate(reqs, params))
    assert all(len(r.token_ids) == params.max_new_tokens and isinstance(r.text, str) for r in results)
    notes.append(f"{name}: LLM.generate throughput run {dt:.2f} s warm (text detokenized for every request)")
    log(notes[-1])
    return len(reqs) * params.max_new_tokens / dt


def bench_moe_model(name, bw, flops, args, rows, notes) -> bool:
    """LFM2-MoE at the real shape (random bf16 weights made on the GPU): engine correctness, batch-1
    decode + TTFT, 100 x 1k/1k throughput through LLM.generate with the tokenizer attached and through
    the raw engine, prefill, memory; transformers on the same weights; limits from the weights the
    *active* experts read. LFM2-24B-A2B: batch 1, TTFT and memory only (--moe-full for all)."""
    from fastlfm.testing import random_model

    tiny = args.tiny
    sizes = TINY_MOE if tiny else MoeSizes()
    full = name == "LFM2-8B-A1B" or args.moe_full
    greedy = dict(temperature=0.0, ignore_eos=True)
    config = moe_config(name, tiny)
    dtype = torch.float32 if tiny else torch.bfloat16
    t = time.perf_counter()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = random_model(config, DEV, dtype)
    dense_b, expert_b, E, k = moe_weight_bytes(model)
    active_params = sum(p.numel() for n, p in {id(p): (n, p) for n, p in model.named_parameters()}.values()
                        if ".experts." not in n) + (expert_b / model.dtype.itemsize) * k / E
    log(f"{name}: random {dtype} weights on {DEV} in {time.perf_counter() - t:.1f}s: {(dense_b + expert_b) / 1e9:.2f} GB, "
        f"active per token {(dense_b + expert_b * k / E) / 1e9:.2f} GB ({active_params / 1e9:.2f}B params)")
    # batch 1 only (24B-A2B without --moe-full): a short ladder of decode graphs to capture and compile
    engine_kw = dict(max_num_seqs=args.max_num_seqs if full else min(args.max_num_seqs, 8), max_model_len=sizes.max_model_len,
                     max_num_batched_tokens=sizes.batched_tokens, compile=args.compile and DEV == "cuda",
                     pack_cpu_weights=False,  # (CPU smoke run) plain nn.Linear: the transformers peer takes the same state dict
                     enable_prefix_caching=False)  # runs repeat their prompts: measure work, not cache hits
    if DEV == "cuda":  # the weights + a KV pool of about args.moe_kv_gib (100 x 2k tokens of 8B-A1B: 2.4 GiB)
        total = torch.cuda.get_device_properties(0).total_memory
        engine_kw["gpu_memory_utilization"] = min(0.9, (dense_b + expert_b + args.moe_kv_gib * 2**30) / total)

    # raw engine (token ids in and out)
    t = time.perf_counter()
    engine = LLMEngine(model, **engine_kw)
    notes.append(f"{name}: engine ready in {time.perf_counter() - t:.1f}s ({'graphs+compile' if engine_kw['compile'] else 'graphs' if DEV == 'cuda' else 'eager'}); "
                 f"{engine.block_manager.num_blocks} KV blocks of {engine.block_manager.block_size}")
    log(notes[-1])
    ok = check_correctness(engine, model, notes, judge=(lambda: fp32_copy(model)) if not tiny and name == "LFM2-8B-A1B" else None,
                           n_new=sizes.check_new, max_len=sizes.max_model_len)
    if args.correctness_only:
        return ok
    if DEV == "cuda":  # the peak of the measured runs (not of the fp32 judge's copy)
        torch.cuda.reset_peak_memory_stats()
    p = prompts(1, sizes.b1_prompt, 2)[0]
    ttft, b1 = batch1_decode(engine, p, sizes.b1_new)
    floor_b1 = bw / (dense_b + expert_b * k / E)
    if DEV == "cuda":
        replay_ms = graph_replay_ms(engine.runner.graphs[1], 100)
        notes.append(f"{name}: batch-1 step {1e3 / b1:.3f} ms wall, graph replay alone {replay_ms:.3f} ms, "
                     f"active-weight read floor {1e3 / floor_b1:.3f} ms")
        log(notes[-1])
        if args.profile_decode:
            notes.append(f"{name}: batch-1 graph replay, GPU time by kernel: "
                         + kernel_profile(engine.runner.graphs[1].replay, name, "b1"))
            log(notes[-1])
    reqs = prompts(sizes.thr_requests, sizes.thr_prompt, 3)
    n_out = sizes.thr_requests * sizes.thr_new
    thr_params = SamplingParams(max_new_tokens=sizes.thr_new, **greedy)
    thr_raw = pre = pre_grouped = float("nan")
    if full:
        _, cold = timed(lambda: engine.generate(reqs, thr_params))
        outs, dt = timed(lambda: engine.generate(reqs, thr_params))
        assert all(len(o.token_ids) == sizes.thr_new for o in outs)
        thr_raw = n_out / dt
        notes.append(f"{name}: raw-engine throughput run {dt:.2f} s warm, {cold:.2f} s cold")
        log(notes[-1])
        pre_reqs = prompts(sizes.pre_requests, sizes.pre_len, 4)
        one = SamplingParams(max_new_tokens=1, **greedy)
        engine.generate(pre_reqs[:2], one)
        _, dt = timed(lambda: engine.generate(pre_reqs, one))
        pre = sizes.pre_requests * sizes.pre_len / dt
        if DEV == "cuda":  # A/B: the prefill's experts through torch's grouped GEMM instead of the Triton kernels
            engine.runner.moe_backend = "grouped_mm"
            engine.generate(pre_reqs[:2], one)
            _, dt = timed(lambda: engine.generate(pre_reqs, one))
            pre_grouped = sizes.pre_requests * sizes.pre_len / dt
            engine.runner.moe_backend = "triton"
            notes.append(f"{name}: prefill {sizes.pre_requests} x {sizes.pre_len}: experts in Triton {pre:,.0f} tok/s, "
                         f"in torch grouped_mm {pre_grouped:,.0f} tok/s")
            log(notes[-1])
    engine.check_no_leaks()
    kv_gb = sum(kc.numel() * kc.element_size() * 2 for kc, _ in engine.runner.kv_caches) / 2**30
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    del engine
    free_device_memory()

    # the user path: LLM.generate with the tokenizer attached
    thr_user = float("nan")
    if full:
        try:
            thr_user = llm_throughput(model, config, engine_kw, reqs, thr_params, name, notes)
        except Exception as e:  # keep the run's other numbers
            notes.append(f"{name}: LLM.generate throughput failed: {type(e).__name__}: {str(e)[:300]}")
            log(notes[-1])
        free_device_memory()

    # transformers on the same weights
    hf_b1 = hf_thr = hf_pre = float("nan")
    if not args.no_hf:
        try:
            hf = hf_moe_peer(model, config)
            log(f"transformers experts implementation: {getattr(hf.config, '_experts_implementation', None)}")
            hf_b1 = hf_generate_tps(hf, 1, sizes.b1_prompt, args.hf_moe_tokens)
            if full:
                hf_thr = hf_generate_tps(hf, sizes.thr_requests, sizes.thr_prompt, args.hf_moe_tokens)
                hf_pre = hf_prefill_tps(hf, sizes.pre_requests, sizes.pre_len)
            del hf
        except Exception as e:  # keep the run's own numbers
            notes.append(f"{name}: transformers peer failed: {type(e).__name__}: {str(e)[:300]}")
            log(notes[-1])
        free_device_memory()

    # limits: weight reads of the experts a step touches (+ the KV of the histories), bf16 FLOPs of the active params
    kv_per_tok = (2 * sum(config["layer_types"][i] == "full_attention" for i in range(len(config["layer_types"])))
                  * config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"])
                  * model.dtype.itemsize)
    step_bytes = dense_b + expert_b * experts_read_fraction(sizes.thr_requests, E, k)
    mean_hist = sizes.thr_prompt + sizes.thr_new // 2
    thr_floor_s = sizes.thr_new * (step_bytes + sizes.thr_requests * mean_hist * kv_per_tok) / bw \
        + 2 * active_params * n_out / flops
    ttft_floor = (dense_b + expert_b * experts_read_fraction(sizes.b1_prompt, E, k)) / bw \
        + 2 * active_params * sizes.b1_prompt / flops

    def row(metric, ours, peer, limit, unit, goal=""):
        rows.append((name, metric, ours, peer, limit, unit, goal))

    is_8b = name == "LFM2-8B-A1B"
    row(f"batch-1 decode ({sizes.b1_prompt} + {sizes.b1_new})", b1, hf_b1, floor_b1, "tok/s", ">= 600" if is_8b else "")
    if full:
        row(f"throughput {sizes.thr_requests} x ({sizes.thr_prompt} + {sizes.thr_new}), LLM.generate + tokenizer",
            thr_user, hf_thr, n_out / thr_floor_s, "out tok/s", ">= 20000" if is_8b else "")
        row(f"throughput {sizes.thr_requests} x ({sizes.thr_prompt} + {sizes.thr_new}), raw engine", thr_raw,
            float("nan"), n_out / thr_floor_s, "out tok/s")
        row(f"prefill {sizes.pre_requests} x {sizes.pre_len}", pre, hf_pre, flops / (2 * active_params), "tok/s")
    row(f"TTFT batch 1 (prompt {sizes.b1_prompt})", ttft * 1e3, float("nan"), ttft_floor * 1e3, "ms")
    if DEV == "cuda":
        row("peak GPU memory (engine)", peak, float("nan"), torch.cuda.get_device_properties(0).total_memory / 2**30,
            f"GiB (weights {(dense_b + expert_b) / 2**30:.1f}, KV pool {kv_gb:.1f})")
    notes.append(f"{name}: transformers peer: generate() of {args.hf_moe_tokens} new tokens at batch 1 and at batch "
                 f"{sizes.thr_requests} ({sizes.thr_prompt}-token prompts), experts as transformers chooses them")
    if DEV == "cuda" and is_8b and not args.no_moe_kernel_ab:
        time_moe_layer(model, bw, notes)
    del model
    free_device_memory()
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["LFM2-1.2B", "LFM2-350M"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile-prefill", action="store_true")
    ap.add_argument("--profile-decode", action="store_true", help="kernel breakdown of the batch-1 and batch-100 decode graphs")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--hf-b1-tokens", type=int, default=512)
    ap.add_argument("--hf-thr-tokens", type=int, default=64)
    ap.add_argument("--correctness-only", action="store_true", help="build each engine, check its tokens, stop")
    ap.add_argument("--hf-moe-tokens", type=int, default=32, help="new tokens per transformers generate() of an MoE model")
    ap.add_argument("--moe-full", action="store_true", help="LFM2-24B-A2B: also throughput and prefill")
    ap.add_argument("--moe-kv-gib", type=float, default=24, help="MoE engines: GiB of memory for the KV pool + activations")
    ap.add_argument("--no-moe-kernel-ab", action="store_true", help="skip timing one MoE layer (Triton vs grouped_mm)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (with --tiny): MoE benchmark, dense user paths")
    ap.add_argument("--tiny", action="store_true", help="models at a tiny width and workload (CPU smoke run)")
    ap.add_argument("--table", default="gpu_table.md", help="file name of the table under $OUT")
    ap.add_argument("--start-time", action="store_true", help="LFM2-1.2B: engine start in fresh processes (cold/warm caches)")
    ap.add_argument("--start-only", action="store_true", help="only the engine start times of the models, then stop")
    ap.add_argument("--guide-only", action="store_true", help="dense models: only the guide's example rows (issue 15)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device != "cuda":  # smoke run: the code paths, not the speed
        global DEV
        DEV = args.device
        if not args.tiny:
            ap.error("--device cpu is a smoke run at --tiny size")
        dev, bw, flops = f"{DEV} (smoke run)", 1e10, 1e11
    else:
        dev = torch.cuda.get_device_name(0)
        bw, flops = copy_bandwidth(), matmul_rate()
    log(f"{dev}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; torch {torch.__version__}")
    rows, notes = [], []
    all_ok = True
    if args.start_only:
        for name in args.models:
            folder = Path(f"/tmp/ckpt-{name}")
            if not (folder / "config.json").exists():
                write_checkpoint(folder, real_config(name), dtype=torch.bfloat16)
            engine_start_times(name, folder, notes)
        return
    for name in args.models:
        if name in MOE_SHAPES:
            try:
                all_ok &= bench_moe_model(name, bw, flops, args, rows, notes)
            except Exception as e:  # the next model still runs (its memory: freed below)
                import traceback

                traceback.print_exc()
                notes.append(f"{name}: FAILED: {type(e).__name__}: {str(e)[:300]}")
                all_ok = False
            free_device_memory()
        elif DEV != "cuda" or args.guide_only:
            all_ok &= bench_guide_only(name, args, rows, notes)
        else:
            all_ok &= bench_model(name, bw, flops, args, rows, notes)
        # The table so far after each model: a run cut short at its time limit keeps what it measured.
        table = render_table(dev, bw, flops, args, rows, notes)
        print("\n" + table, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], args.table).write_text(table + "\n")
    sys.exit(0 if all_ok else 1)


def render_table(dev, bw, flops, args, rows, notes) -> str:
    lines = [f"Device: {dev}; {time.strftime('%Y-%m-%d')}; copy bandwidth {bw / 1e12:.2f} TB/s, "
             f"bf16 matmul {flops / 1e12:.0f} TFLOP/s; torch {torch.__version__}",
             "", "| model | metric | fastlfm | transformers | limit | fastlfm / limit | fastlfm / transformers | unit | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, metric, ours, peer, limit, unit, goal in rows:
        fmt = (lambda v: f"{v:,.1f}") if ours < 100 else (lambda v: f"{v:,.0f}")
        ratio = ours / limit if "TTFT" not in metric else limit / ours
        vs = f"{ours / peer:.1f}x" if peer == peer else "-"
        lines.append(f"| {name} | {metric} | {fmt(ours)} | {fmt(peer) if peer == peer else '-'} | {fmt(limit)} | "
                     f"{ratio:.2f} | {vs} | {unit} | {goal} |")
    lines += ["", f"transformers peer: generate() at batch 1 for {args.hf_b1_tokens} new tokens; at batch 100 for "
              f"{args.hf_thr_tokens} new tokens (1024-token prompts); prefill forward in batches of 8 with logits_to_keep=1."]
    lines += ["", *notes]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
