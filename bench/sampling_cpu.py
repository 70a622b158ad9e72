"""Sampling one token per row on the CPU: fastlfm's `sample` vs transformers' logits processors +
torch.multinomial, on the same logits (LFM2's recommended settings: temperature 0.3, min_p 0.15,
repetition_penalty 1.05; a 65,536-token vocabulary, 64 tokens of history a row).

    PYTHONPATH=src python bench/sampling_cpu.py [--batches 1 8 32] [--threads 2]

Prints ms per step (median of 50) and the ratio. fastlfm's draw is a pure function of (seed,
step, token id), so a request draws the same tokens alone or batched; transformers' is torch's
global generator.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper)

from fastlfm.sampling import SamplingParams, SamplingTensors, sample

V, HISTORY = 65536, 64


def median_ms(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, vocabulary {V:,}, history {HISTORY} tokens a row; "
          f"temperature 0.3, min_p 0.15, repetition_penalty 1.05; ms per step, median of 50\n")
    print("| batch | fastlfm sample | transformers processors + multinomial | ratio (transformers / fastlfm) |")
    print("|---:|---:|---:|---:|")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        logits = torch.randn(batch, V, generator=g) * 3
        history = torch.randint(0, V, (batch, HISTORY), generator=g)
        params = [SamplingParams(temperature=0.3, min_p=0.15, repetition_penalty=1.05, seed=i, max_new_tokens=8)
                  for i in range(batch)]
        tensors = SamplingTensors.from_requests(params, history.tolist(), [[]] * batch, V, torch.device("cpu"),
                                                steps=[0] * batch)
        ours = median_ms(lambda: sample(logits, tensors))
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.05), TemperatureLogitsWarper(0.3),
                                          MinPLogitsWarper(0.15)])
        theirs = median_ms(lambda: torch.multinomial(processors(history, logits.clone()).softmax(-1), 1))
        print(f"| {batch} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
