"""Where the server's engine process loses time against a plain engine loop (issue 16).

One engine (the server's options: CUDA graphs, compiled decode step, every graph captured at start),
one load of N requests (random prompt ids, greedy, `ignore_eos`), run three ways in turn:

- `engine.step` in a loop, outputs dropped: what `LLM.generate` does (the peer);
- `EngineLoop` with the engine process's sink: outputs merged per stream interval, made into wire
  deltas, pickled and written to a pipe that a reader thread drains (the server's engine process
  minus the server);
- the same under cProfile (the loop's thread only), whose top functions are printed.

Output tok/s, the decode step time in the steady state (all N running) and the ratio. A diagnostic,
not a product number: bench/serve.py measures the server over HTTP.

    python bench/loop_overhead.py [--model LFM2-1.2B] [--num 100] [--input-len 1024] [--output-len 1024]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pickle
import pstats
import threading
import time

import torch

from fastlfm.engine import LLMEngine
from fastlfm.engine.async_engine import EngineLoop
from fastlfm.engine.engine_process import delivery_message
from fastlfm.sampling import SamplingParams
from fastlfm.server.benchmark import prepare_checkpoint


def run_direct(engine: LLMEngine, prompts, params) -> tuple[float, list[float]]:
    """Seconds for the load through engine.step, and the times at which the steps started."""
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"direct-{i}-{time.monotonic_ns()}")
    starts, start = [], time.perf_counter()
    while engine.has_unfinished():
        starts.append(time.perf_counter())
        engine.step()
    return time.perf_counter() - start, starts


def run_loop(engine: LLMEngine, prompts, params, profile: bool) -> tuple[float, list[float], str]:
    """Seconds for the load through EngineLoop + the engine process's sink, the times at which the
    loop's steps started (so a step's interval includes the delivery after it), and (profile) the
    loop thread's top functions."""
    read_fd, write_fd = os.pipe()
    reader, writer = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")

    def drain() -> None:  # the server's reading end: keeps the pipe from filling
        while reader.read1(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    finished, done = [0], threading.Event()

    def sink(items):  # as engine_process.run_engine_process's, into a pipe drained by a thread
        writer.write(pickle.dumps(delivery_message(engine, items), protocol=pickle.HIGHEST_PROTOCOL))
        writer.flush()
        finished[0] += sum(1 for _, item in items if getattr(item, "finished", True))
        if finished[0] == len(prompts):
            done.set()

    starts, profiler = [], cProfile.Profile() if profile else None
    inner = engine.step

    def timed_step():
        if profiler is not None and not starts:
            profiler.enable()  # on the loop's thread
        starts.append(time.perf_counter())
        return inner()

    engine.step = timed_step
    loop = EngineLoop(engine, sink)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        loop.submit(p, params, f"loop-{i}-{time.monotonic_ns()}")
    done.wait()
    elapsed = time.perf_counter() - start
    loop.stop()
    loop.join()
    engine.step = inner
    writer.close()
    text = ""
    if profiler is not None:
        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
    return elapsed, starts, text


def steady(starts: list[float]) -> float:
    """Median interval between step starts over the middle half of the run (all requests decoding)."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    body = sorted(gaps[len(gaps) // 4: len(gaps) * 3 // 4]) or sorted(gaps)
    return body[len(body) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="LFM2-1.2B")
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--checkpoint-dir", default="/tmp")
    ap.add_argument("--warmup-full", action="store_true", help="run the whole load once before timing (first "
                    "prefills of these shapes compile and tune)")
    args = ap.parse_args()
    folder = prepare_checkpoint(args.model, args.checkpoint_dir)
    engine = LLMEngine.from_pretrained(folder, dtype="bfloat16", max_num_seqs=256, lazy_graphs=False)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.config.vocab_size
    prompts = [torch.randint(500, vocab, (args.input_len,), generator=gen).tolist() for _ in range(args.num)]
    params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    run_direct(engine, prompts if args.warmup_full else prompts[:8],
               params if args.warmup_full else SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))
    rows, profile_text = [], ""
    for name in ("engine.step loop", "EngineLoop + sink", "EngineLoop + sink, profiled"):
        if name == "engine.step loop":
            elapsed, steps = run_direct(engine, prompts, params)
        else:
            elapsed, steps, text = run_loop(engine, prompts, params, profile="profiled" in name)
            profile_text = text or profile_text
        rows.append((name, args.num * args.output_len / elapsed, steady(steps) * 1e3, len(steps)))
        engine.check_no_leaks()
    base = rows[0][1]
    print(f"\n{args.model}, {args.num} x ({args.input_len} in + {args.output_len} out), "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}\n")
    print("| run | output tok/s | steady step interval ms | steps | tok/s vs engine.step loop |")
    print("|---|---|---|---|---|")
    for name, tps, step_ms, n in rows:
        print(f"| {name} | {tps:,.0f} | {step_ms:.3f} | {n} | {tps / base:.3f} |")
    print("\nThe loop thread's top functions (profiled run):\n" + profile_text)


if __name__ == "__main__":
    main()
