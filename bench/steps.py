"""What an engine step costs on the GPU, and where its time goes (issue 16: at c=100 each wave of
100 x 1k prompts is ~0.4-0.6 s of prefill, then 1,024 decode steps at batch 100; a 1k-token prefill is
half of the TTFT at c=1).

One engine (LLMEngine.from_pretrained on a random-weight checkpoint of the shape, the engine's
defaults), greedy, `ignore_eos`:
- prefill throughput: 32 new prompts of 1,024 tokens, one new token each (two steps of the 16k-token
  budget), prompt tok/s; transformers' forward on the same weights (8 x 1,024, logits of the last
  position) as the peer;
- one 1,024-token prompt alone to its first token (the engine side of TTFT at c=1), ms;
- GPU time by kernel of a 16 x 1,024 prefill;
- `--decode-batch B [B ...]`: B prompts of 1,024 tokens prefilled, then decode steps at batch B: wall time per
  step and GPU time by kernel of 20 steps (the kernels inside the CUDA graph replays).
Each prompt is new (random ids), so the prefix cache serves nothing.

    python bench/steps.py [--model LFM2-1.2B] [--label new] [--no-hf] [--no-profile] [--decode-batch 1 100]

Compare code versions by running it with another PYTHONPATH (e.g. an older src/).
"""

from __future__ import annotations

import argparse
import time

import torch

from fastlfm.engine import LLMEngine
from fastlfm.sampling import SamplingParams
from fastlfm.server.benchmark import prepare_checkpoint
from fastlfm.testing import MOE_SHAPES


# 128 rows and a 4,096-token context, as bench/gpu.py's MoE engine; 60% of the GPU's memory for the
# weights and the KV pool together (gpu.py sizes it from the weights instead).
MOE_ENGINE_OPTIONS = dict(max_num_seqs=128, max_model_len=4096, gpu_memory_utilization=0.6)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def activities() -> list:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]  # CPU: smoke runs


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="LFM2-1.2B", help="a shape (random bf16 weights: dense ones through a "
                    "checkpoint, LFM2-MoE ones made on the device) or a checkpoint folder")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script (with a tiny checkpoint)")
    ap.add_argument("--label", default="")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--checkpoint-dir", default="/tmp")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--decode-batch", type=int, nargs="*", default=[], help="also profile decode steps at these "
                    "batch sizes")
    args = ap.parse_args()

    if args.model in MOE_SHAPES:  # 16-48 GB of weights: made on the device, no checkpoint (and no transformers peer)
        from fastlfm.testing import random_model, real_moe_config

        folder, args.no_hf = None, True
        model = random_model(real_moe_config(args.model), args.device, torch.bfloat16)
        engine = LLMEngine(model, enable_prefix_caching=False, **MOE_ENGINE_OPTIONS)
    else:
        folder = prepare_checkpoint(args.model, args.checkpoint_dir)
        engine = LLMEngine.from_pretrained(folder, device=args.device)
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)

    def fresh(n: int) -> list[list[int]]:  # new random prompts every call: no prefix-cache hits
        return torch.randint(100, vocab, (n, args.prompt_len), generator=g).tolist()

    batch = timed(lambda: engine.generate(fresh(32), params), reps=3)
    one = timed(lambda: engine.generate(fresh(1), params), reps=9)
    rows = [("prefill 32 x %d, prompt tok/s" % args.prompt_len, 32 * args.prompt_len / batch),
            ("one %d-token prompt to its first token, ms" % args.prompt_len, one * 1e3)]
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        peer = AutoModelForCausalLM.from_pretrained(folder, dtype=engine.model.dtype).to(args.device).eval()
        with torch.inference_mode():
            ids = torch.randint(100, vocab, (8, args.prompt_len), generator=g).to(args.device)
            hf = timed(lambda: peer(input_ids=ids, logits_to_keep=1), reps=5)
        del peer
        rows.append(("transformers forward 8 x %d, prompt tok/s" % args.prompt_len, 8 * args.prompt_len / hf))
    label = f" ({args.label})" if args.label else ""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{args.model}{label}, {device_name}")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:,.1f} |")
    if hf is not None:
        print(f"fastlfm / transformers (prompt tok/s): {rows[0][1] / rows[2][1]:.2f}x")
    if not args.no_profile:
        from torch.profiler import profile

        prompts = fresh(16)
        with profile(activities=activities()) as prof:
            engine.generate(prompts, params)
            sync()
        print_kernels(prof, f"a 16 x {args.prompt_len} prefill")
    for batch in args.decode_batch:
        profile_decode(engine, fresh(batch))


def print_kernels(prof, what: str, steps: int = 1) -> None:
    key = "device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    print(f"GPU time of {what}: {total / 1e3 / steps:.3f} ms{' a step' if steps > 1 else ''}; top kernels "
          f"(ms{' a step' if steps > 1 else ''}, calls):")
    for e in events[:20]:
        print(f"  {getattr(e, key) / 1e3 / steps:7.3f} {e.count:6d}  {e.key[:90]}")


def profile_decode(engine: LLMEngine, prompts: list[list[int]], steps: int = 20) -> None:
    """Prefill `prompts` (each to 1,536 new tokens at most), step until all of them decode, then time
    and profile `steps` decode steps."""
    from torch.profiler import profile

    params = SamplingParams(max_new_tokens=1536, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while any(s.num_computed_tokens < len(p) for s, p in zip(seqs, prompts)):
        engine.step()
    for _ in range(20):  # warm: every row decoding, graphs captured
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall = (time.perf_counter() - start) / steps
    with profile(activities=activities()) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    print(f"decode at batch {len(prompts)} (context ~{len(prompts[0]) + 40} tokens): {wall * 1e3:.3f} ms a step (wall)")
    print_kernels(prof, f"a decode step at batch {len(prompts)}", steps)
    for s in seqs:
        engine.abort(s.request_id)


if __name__ == "__main__":
    main()
