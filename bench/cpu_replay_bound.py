"""What a replayed batch-1 CPU decode step could take (a diagnostic for issue 19, not a product number).

A decode step of `LLM.generate` on the CPU is ~90 calls into fastlfm's kernel library (products, attention,
conv step, QK-norm + RoPE, argmax) with Python around them: the model's modules, the forward context,
the engine. This records the library calls of one decode step (op and argument tensors), then times
(a) the engine's steps of a 64-token generation (median) and (b) the recorded calls alone, replayed in a
loop on the same tensors (their outputs are overwritten: the numbers, not the text, are the point).
(a) - (b) bounds what a CPU analogue of a CUDA graph (the step's op sequence recorded once on fixed
buffers, replayed with only the token / position / slot changing) would save.

    python bench/cpu_replay_bound.py FOLDER [--quantization int4|int8] [--dtype bfloat16|float32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

OPS = ("gemv_q8", "gemv_q4", "gemv_dense", "argmax_rows", "conv_step", "qk_norm_rope", "paged_decode_attention")


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

    if not cpu_gemv.available():
        raise SystemExit(f"fastlfm's CPU kernels do not run here: {cpu_gemv.unavailable_reason()}")
    llm = LLM(args.folder, dtype=args.dtype, quantization=args.quantization)
    engine, ids = llm.engine, list(range(1000, 1128))
    llm.generate(ids, max_new_tokens=4, ignore_eos=True)

    library = torch.ops.fastlfm_cpu
    calls: list[tuple] = []

    class Recording:  # stands in for torch.ops.fastlfm_cpu while one step runs
        def __getattr__(self, name):
            op = getattr(library, name)
            if name not in OPS:
                return op

            def record(*a):
                calls.append((op.default, a))
                return op.default(*a)

            record.default = record  # (the kernel modules call the `.default` overload)
            return record

    def unbind():  # the kernel modules bind their op once: make them look it up again
        for m in llm.model.modules():
            m.__dict__.pop("_bound", None)

    steps: list[float] = []
    inner = engine.step

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        steps.append(time.perf_counter() - t)
        return out

    def record_third(*a, **k):
        if len(steps) == 2:  # the third step: a decode step
            torch.ops.fastlfm_cpu, _ = Recording(), unbind()
            try:
                return timed(*a, **k)
            finally:
                torch.ops.fastlfm_cpu, _ = library, unbind()
        return timed(*a, **k)

    engine.step = record_third
    llm.generate(ids, max_new_tokens=6, ignore_eos=True)
    engine.step = timed
    print(f"{args.folder} {args.dtype} {args.quantization or ''}: {len(calls)} library calls in one decode step")
    print("| round | engine step, ms (median of 64) | its library calls replayed alone, ms | share that is not the calls |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        steps.clear()
        llm.generate(ids, max_new_tokens=65, ignore_eos=True)
        step = sorted(steps[1:])[len(steps) // 2]
        replay = []
        for _ in range(64):
            t = time.perf_counter()
            for op, a in calls:
                op(*a)
            replay.append(time.perf_counter() - t)
        alone = sorted(replay)[32]
        print(f"| {r + 1} | {step * 1e3:.2f} | {alone * 1e3:.2f} | {1 - alone / step:.0%} |", flush=True)


if __name__ == "__main__":
    main()
