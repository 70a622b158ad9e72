"""GPU benchmark of the engine vs transformers on random bf16 weights (LFM2-1.2B / 350M shapes).

Run on a CUDA machine from the repo root:  PYTHONPATH=src python bench/gpu.py [--models ...]
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
from pathlib import Path

import torch

from fastlfm.engine import LLMEngine
from fastlfm.models import Lfm2ForCausalLM
from fastlfm.sampling import SamplingParams
from fastlfm.testing import real_config, write_checkpoint

DEV = "cuda"


def log(*a):
    print(*a, flush=True)


def sync_time():
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
def check_correctness(engine, model, folder, log_rows):
    """Engine greedy tokens vs the eager model's: 8 prompts as one batch, then the first two alone
    (batch-1 decode steps, which take the fused projection kernels where they are tuned). Where a
    sequence diverges, the fp32 model judges whether the step was a near-tie (`divergence`)."""
    ps = [p[:n] for p, n in zip(prompts(8, 300, 1), (17, 64, 128, 5, 300, 33, 250, 90))]
    n_new = 32
    params = SamplingParams(max_new_tokens=n_new, temperature=0.0, ignore_eos=True)
    refs = [eager_greedy(model, p, n_new) for p in ps]
    model32 = None
    ok = True
    for what, runs in (("batch 8", [ps]), ("batch 1", [[p] for p in ps[:2]])):
        outs = [o for run in runs for o in engine.generate(run, params)]
        exact, near_tie, bad = 0, [], []
        for i, (o, (ref, ref_logits)) in enumerate(zip(outs, refs)):
            if o.token_ids == ref:
                exact += 1
                continue
            k = next(j for j, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b)
            if model32 is None:
                model32 = Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.float32, device=DEV)
            tie, margins = divergence(model32, ps[i], ref, ref_logits, k, o.token_ids[k])
            (near_tie if tie else bad).append((i, k, *margins))
        log_rows.append(f"correctness ({what}): {exact}/{len(outs)} identical; diverged after a near-tie "
                        f"(seq, step, bf16 margin, fp32 margin, bf16 error): {near_tie}; real mismatches: {bad}")
        log(log_rows[-1])
        ok &= not bad
    del model32
    torch.cuda.empty_cache()
    return ok


def hf_peer(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV).eval()


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
    """Wall time of `run()` split into the engine's parts: scheduling, launching (metadata,
    graph launch, sampling), output processing, and waiting for a step's ids (GPU-bound time)."""
    from fastlfm.engine import llm_engine

    spent = dict(schedule=0.0, launch=0.0, process=0.0, wait=0.0)
    steps = [0]

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    fetch = llm_engine.StepInFlight.fetch
    saved = engine.scheduler.schedule, engine._launch, engine._process
    engine.scheduler.schedule = timed("schedule", saved[0])
    engine._launch = timed("launch", saved[1])
    engine._process = timed("process", saved[2])
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
        engine.scheduler.schedule, engine._launch, engine._process = saved
        llm_engine.StepInFlight.fetch = fetch
        del engine.step
    spent["process"] -= spent["wait"]  # fetch runs inside _process
    n = max(steps[0], 1)
    return (f"{n} steps, {1e3 * total / n:.2f} ms/step: " + ", ".join(f"{k} {1e3 * v / n:.2f}" for k, v in spent.items())
            + f", other {1e3 * (total - sum(spent.values())) / n:.2f} ms")


def batch1_decode(engine, prompt) -> tuple[float, float]:
    """One request of 512 new tokens after a warm-up: (time to first token s, decode tok/s after it)."""
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_new_tokens=16, **greedy))  # warm-up
    engine.add_request(prompt, SamplingParams(max_new_tokens=512, **greedy), "b1")
    t0 = sync_time()
    t_first = None
    while engine.has_unfinished():
        for o in engine.step():
            if t_first is None and o.new_token_ids:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, 511 / (t_end - t_first)


def bench_model(name, bw, flops, args, rows, notes):
    folder = Path(f"/tmp/ckpt-{name}")
    if not (folder / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(folder, real_config(name), dtype=torch.bfloat16, tokenizer=False)
        log(f"{name}: wrote checkpoint in {time.perf_counter() - t:.1f}s")
    model = Lfm2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device=DEV)
    params = {id(p): p for p in model.parameters()}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    n_params = sum(p.numel() for p in params.values())
    floor_tps = bw / weight_bytes
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_model_len=4096,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.3, compile=args.compile)
        mode = "graphs+compile" if args.compile else "graphs"
    except Exception as e:  # keep the run useful if inductor fails on this machine
        log(f"compile failed ({type(e).__name__}: {str(e)[:300]}); falling back to eager graphs")
        import gc

        torch._dynamo.reset()
        e = None
        gc.collect()
        torch.cuda.empty_cache()
        engine = LLMEngine(model, max_num_seqs=args.max_num_seqs, max_model_len=4096,
                           max_num_batched_tokens=16384, gpu_memory_utilization=0.3)
        mode = "graphs"
    log(f"{name}: engine ready in {time.perf_counter() - t:.1f}s ({mode}); "
        f"{engine.block_manager.num_blocks} KV blocks of {engine.block_manager.block_size}")
    ok = check_correctness(engine, model, folder, notes)
    if args.correctness_only:
        return ok
    greedy = dict(temperature=0.0, ignore_eos=True)

    # batch-1 decode + TTFT
    p = prompts(1, 128, 2)[0]
    ttft, b1 = batch1_decode(engine, p)
    ttft_floor = weight_bytes / bw + 2 * n_params * 128 / flops
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
    torch.cuda.empty_cache()

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
    del model
    torch.cuda.empty_cache()
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
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0)
    bw, flops = copy_bandwidth(), matmul_rate()
    log(f"{dev}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; torch {torch.__version__}")
    rows, notes = [], []
    all_ok = True
    for name in args.models:
        all_ok &= bench_model(name, bw, flops, args, rows, notes)
        # The table so far after each model: a run cut short at its time limit keeps what it measured.
        table = render_table(dev, bw, flops, args, rows, notes)
        print("\n" + table, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "gpu_table.md").write_text(table + "\n")
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
