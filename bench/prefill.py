"""What a prefill costs on the GPU, and where its time goes (issue 16: each wave of 100 x 1k prompts
is ~0.4-0.6 s of prefill at c=100; a 1k-token prefill is half of the TTFT at c=1).

One engine (LLMEngine.from_pretrained on a random-weight checkpoint of the shape, the engine's
defaults), greedy, one new token per prompt (the prefill and its first token):
- prefill throughput: 32 prompts of 1,024 tokens (two steps of the 16k-token budget), prompt tok/s;
- one 1,024-token prompt alone (the engine side of TTFT at c=1), ms;
- transformers' forward on the same weights (8 x 1,024 tokens, logits of the last position) as the peer;
- GPU time by kernel of one 16k-token step (16 x 1,024), top rows.
Each prompt is new (random ids), so the prefix cache serves nothing.

    python bench/prefill.py [--model LFM2-1.2B] [--label new] [--no-hf] [--no-profile]

Compare code versions by running it with another PYTHONPATH (e.g. an older src/).
"""

from __future__ import annotations

import argparse
import time

import torch

from fastlfm.engine import LLMEngine
from fastlfm.sampling import SamplingParams
from fastlfm.server.benchmark import prepare_checkpoint


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="LFM2-1.2B")
    ap.add_argument("--label", default="")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--checkpoint-dir", default="/tmp")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()

    folder = prepare_checkpoint(args.model, args.checkpoint_dir)
    engine = LLMEngine.from_pretrained(folder, device="cuda")
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

        peer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        with torch.inference_mode():
            ids = torch.randint(100, vocab, (8, args.prompt_len), generator=g).cuda()
            hf = timed(lambda: peer(input_ids=ids, logits_to_keep=1), reps=5)
        del peer
        rows.append(("transformers forward 8 x %d, prompt tok/s" % args.prompt_len, 8 * args.prompt_len / hf))
    label = f" ({args.label})" if args.label else ""
    print(f"\n{args.model}{label}, {torch.cuda.get_device_name()}")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:,.1f} |")
    if hf is not None:
        print(f"fastlfm / transformers (prompt tok/s): {rows[0][1] / rows[2][1]:.2f}x")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        prompts = fresh(16)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(prompts, params)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events)
        print(f"GPU time of a 16 x {args.prompt_len} prefill: {total / 1e3:.1f} ms; top kernels (ms, calls):")
        for e in events[:14]:
            print(f"  {e.device_time_total / 1e3:7.2f} {e.count:5d}  {e.key[:90]}")


if __name__ == "__main__":
    main()
