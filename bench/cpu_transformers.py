"""CPU benchmark: fastlfm generate() vs transformers generate() on the same weights.

LFM2-350M shapes with random weights (written once to a folder and reused), 2 threads,
a 128-token prompt, 128 new tokens, greedy, eos ignored; batch 1 and 8; fp32 and bf16.

Both libraries run their own generate(). Each model's forward is wrapped to record when
it is called: prefill = the first forward; decode = from the second forward call to the
last one (so it includes sampling and each loop's own overhead), per token.

The machine this runs on is shared: other processes take a core now and then, and with 2
threads every parallel region then waits. The two libraries alternate between repeats, and
we report the fastest repeat of each (as timeit does: slower repeats measure interference,
not the code), plus the median repeat for reference.

    python bench/cpu_transformers.py [--folder /tmp/fastlfm-bench-350m] [--repeats 3] [--dtypes fp32 bf16] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ensure_checkpoint(folder: Path) -> Path:
    if not (folder / "model.safetensors").is_file():
        from fastlfm.testing import real_config, write_checkpoint

        print(f"writing random LFM2-350M weights to {folder} ...", file=sys.stderr)
        write_checkpoint(folder, real_config("LFM2-350M"), tokenizer=False)
    return folder


class ForwardClock:
    """Records the start and end time of every forward call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.starts: list[float] = []
        self.first_end: float | None = None
        inner = module.forward

        def timed(*args, **kwargs):
            self.starts.append(time.perf_counter())
            out = inner(*args, **kwargs)
            if self.first_end is None:
                self.first_end = time.perf_counter()
            return out

        module.forward = timed

    def reset(self) -> None:
        self.starts.clear()
        self.first_end = None

    def prefill_s(self) -> float:
        return self.first_end - self.starts[0]


def run_fastlfm(model, ids, new_tokens):
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)


def run_transformers(model, ids, new_tokens):
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def bench(folder: Path, dtype_name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import transformers

    from fastlfm import Lfm2ForCausalLM

    dtype = DTYPES[dtype_name]
    ours = Lfm2ForCausalLM.from_pretrained(folder, dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.randint(14, ours.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    runners = {"fastlfm": (ours, run_fastlfm), "transformers": (ref, run_transformers)}
    clocks = {name: ForwardClock(m) for name, (m, _) in runners.items()}
    prefill: dict[str, list[float]] = {n: [] for n in runners}
    decode: dict[str, list[float]] = {n: [] for n in runners}  # seconds per decode step
    with torch.inference_mode():
        for name, (m, fn) in runners.items():  # warm-up
            fn(m, ids, 4)
        for _ in range(repeats):
            for name, (m, fn) in runners.items():
                clock = clocks[name]
                clock.reset()
                fn(m, ids, new_tokens)
                assert len(clock.starts) == new_tokens, (name, len(clock.starts))
                prefill[name].append(clock.prefill_s())
                decode[name].append((clock.starts[-1] - clock.starts[1]) / (new_tokens - 2))
    row = {"dtype": dtype_name, "batch": batch}
    for name in runners:
        row[f"{name}_prefill"] = batch * prompt_len / min(prefill[name])
        row[f"{name}_decode"] = batch / min(decode[name])
        row[f"{name}_decode_median"] = batch / statistics.median(decode[name])
    del ours, ref
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path("/tmp/fastlfm-bench-350m"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    folder = ensure_checkpoint(args.folder)
    load_before = os.getloadavg()[0]
    rows = [bench(folder, d, b, args.prompt, args.new_tokens, args.repeats) for d in args.dtypes for b in args.batches]
    load_after = os.getloadavg()[0]

    print(f"\nLFM2-350M shapes, random weights, {args.threads} threads, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy; fastest of {args.repeats} runs (median in brackets); "
          f"load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")
    print()
    head = ("| dtype | batch | prefill tok/s fastlfm | prefill tok/s transformers | ratio "
            "| decode tok/s fastlfm | decode tok/s transformers | ratio |")
    print(head)
    print("|" + "---|" * 8)
    for r in rows:
        f, t = r["fastlfm_decode_median"], r["transformers_decode_median"]
        print(f"| {r['dtype']} | {r['batch']} | {r['fastlfm_prefill']:.0f} | {r['transformers_prefill']:.0f} | "
              f"{r['fastlfm_prefill'] / r['transformers_prefill']:.2f}x | {r['fastlfm_decode']:.1f} ({f:.1f}) | "
              f"{r['transformers_decode']:.1f} ({t:.1f}) | {r['fastlfm_decode'] / r['transformers_decode']:.2f}x "
              f"({f / t:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
