"""Float weights on 2 MB vs 4 KB pages, paired in one process (a diagnostic for issue 19: fastlfm
against itself, no peer; this host's speed drifts by 10-20% from minute to minute, so the two are
timed alternately and compared pair by pair).

- products: fastlfm's dense batch-1 product over 16 weights of the fused w1|w3 shape of LFM2-350M
  (9216 x 1024), one set in torch's memory (4 KB pages), one collapsed onto huge pages;
- engine: two `LLM`s on the same checkpoint, one with FASTLFM_HUGE_PAGES=0, one whose engine moved
  its weights (cpu_linear.HugePageMove, waited for after a warm-up); decode tok/s of
  `LLM.generate(128-token prompt, 32 new tokens)`, alternating.

    python bench/cpu_huge_pages.py FOLDER [--dtype bfloat16|float32] [--pairs 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def paired(name: str, run_a, run_b, pairs: int, unit: str) -> None:
    a, b = [], []
    for i in range(pairs):  # alternate which goes first
        if i % 2:
            b.append(run_b()), a.append(run_a())
        else:
            a.append(run_a()), b.append(run_b())
    r = sorted(y / x for x, y in zip(a, b))
    print(f"| {name} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | {statistics.median(r):.3f} "
          f"({r[len(r) // 4]:.3f}-{r[3 * len(r) // 4]:.3f}) | {unit} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--pairs", type=int, default=12)
    args = ap.parse_args()
    from fastlfm import LLM, cpu_gemv

    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    print(f"| {args.dtype} | 4 KB pages | 2 MB pages | 2 MB / 4 KB, median of {args.pairs} pairs (quartiles) | unit |")
    print("|---|---|---|---|---|")
    if cpu_gemv.available():
        small = [torch.randn(9216, 1024).to(dtype) for _ in range(16)]
        huge = [torch.randn(9216, 1024).to(dtype) for _ in range(16)]
        assert cpu_gemv.collapse_onto_huge_pages(huge) > 0, "the kernel did not collapse (no THP here?)"
        x, nbytes = torch.randn(1, 1024).to(dtype), sum(w.nbytes for w in small)

        def products(ws):
            def run():
                t = time.perf_counter()
                for w in ws:
                    cpu_gemv.gemv_dense(x, w, dtype)
                return nbytes / (time.perf_counter() - t) / 1e9
            return run

        paired("products (16 x 9216x1024)", products(small), products(huge), 3 * args.pairs, "GB/s")
        del small, huge
    prompt = list(range(1000, 1128))

    def make(huge_pages: str):
        os.environ["FASTLFM_HUGE_PAGES"] = huge_pages
        llm = LLM(args.folder, dtype=args.dtype)
        llm.generate([prompt], max_new_tokens=8)
        if llm.engine.huge_page_move is not None:
            llm.engine.huge_page_move.thread.join()
        llm.generate([prompt], max_new_tokens=2)  # the engine takes the copies between these steps
        return llm

    def decode(llm):
        def run():
            t0 = time.perf_counter()
            llm.generate([prompt], max_new_tokens=1)
            t1 = time.perf_counter()
            llm.generate([prompt], max_new_tokens=33)
            return 32 / ((time.perf_counter() - t1) - (t1 - t0))
        return run

    paired("engine decode (LLM.generate)", decode(make("0")), decode(make("1")), args.pairs, "tok/s")


if __name__ == "__main__":
    main()
