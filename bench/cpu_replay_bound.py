"""Where a batch-1 CPU decode step's time goes beyond the kernel library (a diagnostic for issue 19, not a
product number).

A decode step of `LLM.generate` on the CPU replays the step recorded once (engine/cpu_graph.py): ~90
calls into fastlfm's kernel library (products, attention, conv step, QK-norm + RoPE, argmax) and ~40
small torch ops, with the engine's scheduling and sampling around the replay. This times, on the same
tensors: (a) the engine's steps of a 64-token generation (median), (b) the recorded step's replay alone,
(c) only its kernel-library calls (the other ops skipped: the numbers, not the text, are the point).
(a) - (b) is the engine around the step, (b) - (c) the small ops and the replay's Python.

    python bench/cpu_replay_bound.py FOLDER [--quantization int4|int8] [--dtype bfloat16|float32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def median_ms(run, n: int = 64) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fastlfm import LLM, cpu_gemv
    from fastlfm.engine.cpu_graph import StepGraph

    if not cpu_gemv.available():
        raise SystemExit(f"fastlfm's CPU kernels do not run here: {cpu_gemv.unavailable_reason()}")
    llm = LLM(args.folder, dtype=args.dtype, quantization=args.quantization)
    engine, ids = llm.engine, list(range(1000, 1128))
    llm.generate(ids, max_new_tokens=4, ignore_eos=True)
    graph = engine.runner.graphs.get(1)
    if not isinstance(graph, StepGraph):
        raise SystemExit(f"the batch-1 decode step was not recorded here ({type(graph).__name__})")
    library = [c for c in graph.program if str(getattr(c, "func", "")).startswith("fastlfm_cpu.")]

    steps: list[float] = []
    inner = engine.step

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        steps.append(time.perf_counter() - t)
        return out

    engine.step = timed
    print(f"{args.folder} {args.dtype} {args.quantization or ''}: {graph.num_recorded} ops recorded, "
          f"{len(graph.program)} replayed, {len(library)} of them kernel-library calls")
    print("| round | engine step, ms (median of 64) | the recorded step's replay, ms | its library calls alone, ms |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for r in range(args.rounds):
            steps.clear()
            llm.generate(ids, max_new_tokens=65, ignore_eos=True)
            step = sorted(steps[1:])[len(steps) // 2] * 1e3
            replay = median_ms(graph.replay)

            def calls_alone():
                for call in library:
                    call()

            alone = median_ms(calls_alone)
            print(f"| {r + 1} | {step:.2f} | {replay:.2f} | {alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
