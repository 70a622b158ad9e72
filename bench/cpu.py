"""CPU benchmark: fastlfm vs llama.cpp in the same run, on the same weights, batch 1.

For each model (LFM2-350M / LFM2-1.2B shapes, random bf16 weights written once) and each
precision class (fastlfm fp32 / bf16 / int8 / int4 against llama.cpp F32 / BF16 / Q8_0 / Q4_0),
the two runtimes alternate, repeat by repeat, so both see the same machine state:

- llama.cpp: `llama-bench -t THREADS -r 1` on GGUF files made from the same safetensors by
  llama.cpp's converter (bench/convert_gguf.py) and llama-quantize (Q8_0 / Q4_0 from F32):
  prefill = pp128 (`-p 128 -n 0`), decode = tg128 after a 128-token prompt (`-p 0 -n 128 -d 128`).
- fastlfm: `LLM(folder, dtype=..., quantization=...)` (the public API; the checkpoint's full-size
  tokenizer attached), `llm.generate(prompt ids, greedy, 128 new tokens)` with the engine's
  `step` timed inside it: prefill = the first step (128-token prefill + first token), decode =
  127 / the other 127 steps. What the call costs beyond its steps (setting the request up, the
  result) is printed beside the table. The engine moves fp32 / bf16 weights onto huge pages in the
  background from its first decode step on, at the lowest priority; the warm-up waits for that (the
  log gives its seconds), so decode is measured in steady state, as in a long-running process. `--gguf` also runs fastlfm on llama.cpp's Q8_0 / Q4_0 files.
- cold start (350M): a fresh `python -c` process, from its launch to the first token of
  `LLM(folder, ...).generate(prompt, max_new_tokens=1)`.

Reported: the median of the repeats and the min-max spread, the ratio fastlfm / llama.cpp, the
machine's CPU flags (lscpu) and load average. Building llama.cpp (the `llama-cpp-python` sdist
vendors it):

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d dl
    tar xzf dl/llama_cpp_python-0.3.36.tar.gz && cp -r llama_cpp_python-0.3.36/vendor/llama.cpp LLAMA
    cmake -S LLAMA -B LLAMA/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
          -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
          -DLLAMA_BUILD_SERVER=OFF
    cmake --build LLAMA/build -j2 --target llama-bench llama-quantize

    python bench/cpu.py --llama-cpp LLAMA [--work /tmp/fastlfm-cpu-bench] [--models LFM2-350M LFM2-1.2B]
                        [--classes fp32 bf16 int8 int4] [--repeats 3] [--threads 2] [--gguf]

One decoding loop (issue 14), A/B: `--one-loop-ab [COMMIT]` (no llama.cpp needed) runs
`LLM(folder, dtype).generate(one prompt of 128 ids, 128 new tokens)` through this checkout (the
engine) and through COMMIT's source (default 54557df: the last commit whose single-prompt path
was the separate HF-style loop over Lfm2Cache), each in its own process, interleaved repeat by
repeat; decode tok/s = 127 / (time of 128 new tokens - time of 1). `--engine-packs auto packed
plain` runs the engine once per choice of its fp32/bf16 kernels (FASTLFM_CPU_PACK: the choice
measured at load, all pre-packed, all plain F.linear); default: auto alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLASSES = {  # fastlfm (dtype, quantization) -> llama.cpp type
    "fp32": ("float32", None, "F32"),
    "bf16": ("bfloat16", None, "BF16"),
    "int8": ("bfloat16", "int8", "Q8_0"),
    "int4": ("bfloat16", "int4", "Q4_0"),
}
PROMPT, NEW = 128, 128


def run(cmd: list[str], **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res.stdout


def ensure_files(work: Path, model: str, llama: Path, types: list[str]) -> tuple[Path, dict[str, Path]]:
    """The safetensors checkpoint (random bf16 weights, full-size tokenizer) and its GGUF files."""
    import torch

    from fastlfm.testing import real_config, write_checkpoint

    folder = work / model.lower()
    if not (folder / "model.safetensors").is_file():
        print(f"writing {model} to {folder}", file=sys.stderr, flush=True)
        write_checkpoint(folder, real_config(model), dtype=torch.bfloat16, tokenizer=True)
    files = {}
    for t in types:
        path = work / f"{model.lower()}-{t}.gguf"
        if not path.is_file():
            if t in ("F32", "BF16", "F16"):
                run([sys.executable, str(Path(__file__).parent / "convert_gguf.py"), str(llama), str(folder),
                     "--outtype", t.lower(), "--outfile", str(path)])
            else:
                f32 = work / f"{model.lower()}-F32.gguf"
                if not f32.is_file():
                    run([sys.executable, str(Path(__file__).parent / "convert_gguf.py"), str(llama), str(folder),
                         "--outtype", "f32", "--outfile", str(f32)])
                run([str(llama / "build/bin/llama-quantize"), str(f32), str(path), t, "2"])
        files[t] = path
    return folder, files


NO_REPACK: set[Path] = set()  # GGUF files whose llama-bench run crashed with weight repacking on


def llama_bench(llama: Path, gguf: Path, threads: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one llama-bench repeat. Where llama.cpp crashes with its
    default weight repacking (Q8_0 on an AVX-512 + AMX Xeon, 2026-12-03: SIGSEGV), the file runs
    with `--repack 0` from then on, and the run says so."""
    exe = str(llama / "build/bin/llama-bench")

    def bench(args: list[str]) -> float:
        cmd = [exe, "-m", str(gguf), "-t", str(threads), *args, "-r", "1", "-o", "json"]
        if gguf not in NO_REPACK:
            try:
                return json.loads(run(cmd))[0]["avg_ts"]
            except RuntimeError as e:
                if "failed (-11)" not in str(e):
                    raise
                print(f"llama-bench crashed (SIGSEGV) on {gguf.name} with repacking: --repack 0 from now on",
                      flush=True)
                NO_REPACK.add(gguf)
        return json.loads(run(cmd + ["--repack", "0"]))[0]["avg_ts"]

    return bench(["-p", str(PROMPT), "-n", "0"]), bench(["-p", "0", "-n", str(NEW), "-d", str(PROMPT)])


class FastlfmRunner:
    """One loaded LLM; `once()` = one greedy `LLM.generate` of the prompt's ids (the public API, its
    text included), with the engine's steps timed inside it."""

    def __init__(self, source: str, dtype: str, quantization: str | None, threads: int, unpacked: bool = False):
        import torch

        import fastlfm.engine.llm_engine as llm_engine
        from fastlfm import LLM

        torch.set_num_threads(threads)
        t = time.perf_counter()
        self.llm = LLM(source, dtype=dtype, quantization=quantization, engine_options={"max_num_seqs": 8,
                       "enable_prefix_caching": False})  # runs repeat their prompts: measure work, not cache hits
        self.load_s = time.perf_counter() - t
        prepare = llm_engine.prepare_for_cpu
        if unpacked:  # A/B: the engine with torch's default nn.Linear path (no pre-packing)
            llm_engine.prepare_for_cpu = lambda model, **kw: model
        try:
            self.engine = self.llm.engine
        finally:
            llm_engine.prepare_for_cpu = prepare
        gen = torch.Generator().manual_seed(1234)
        self.prompt = torch.randint(500, self.llm.model.config.vocab_size, (PROMPT,), generator=gen).tolist()
        self.steps: list[float] = []
        self.outside_steps: list[float] = []  # seconds of each LLM.generate call outside the engine's steps
        inner = self.engine.step

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            self.steps.append(time.perf_counter() - t0)
            return out

        self.engine.step = timed
        self.once(8)  # warm-up
        # The engine moves float weights onto huge pages from its first decode step on, at the lowest
        # priority (cpu_linear.HugePageMove): measured here in steady state, the move's idle time apart.
        move, t = self.engine.huge_page_move, time.perf_counter()
        if move is not None:
            move.thread.join()
        self.huge_page_move_s = time.perf_counter() - t

    def once(self, new: int = NEW) -> tuple[float, float]:
        from fastlfm.sampling import SamplingParams

        self.steps.clear()
        t = time.perf_counter()
        out = self.llm.generate(self.prompt, SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True))
        self.outside_steps.append(time.perf_counter() - t - sum(self.steps))
        assert len(out[0].token_ids) == new and len(self.steps) == new, (len(out[0].token_ids), len(self.steps))
        return PROMPT / self.steps[0], (new - 1) / sum(self.steps[1:])


def cold_start(source: str, dtype: str, quantization: str | None, threads: int) -> float:
    """Seconds from launching a fresh Python process to the first generated token. fastlfm's
    modules are byte-compiled first, as `pip install` does (with PYTHONDONTWRITEBYTECODE set, as on
    some machines, every start would compile them again: ~0.15 s)."""
    import compileall

    import fastlfm

    compileall.compile_dir(os.path.dirname(fastlfm.__file__), quiet=1)
    code = ("import time, torch; torch.set_num_threads({t}); from fastlfm import LLM; "
            "llm = LLM({s!r}, dtype={d!r}, quantization={q!r}); "
            "out = llm.generate('Hello, how are you today?', max_new_tokens=1, ignore_eos=True); "
            "print('TOKEN', time.time())").format(t=threads, s=source, d=dtype, q=quantization)
    t = time.time()
    out = run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    end = float(next(line for line in out.splitlines() if line.startswith("TOKEN")).split()[1])
    return end - t


def cold_starts(folder: Path, args) -> list[tuple[str, list[float]]]:
    """args.repeats cold starts of the checkpoint in `folder` for its bf16 and int4 classes in args.classes,
    each once the CPU is quiet."""
    out = []
    for cls in [c for c in ("bf16", "int4") if c in args.classes]:
        dtype, quant, _ = CLASSES[cls]
        xs = []
        for _ in range(args.repeats):
            wait_quiet(args.quiet_limit, args.max_wait)
            xs.append(cold_start(str(folder), dtype, quant, args.threads))
        out.append((cls, xs))
    return out


def cpu_busy(seconds: float) -> float:
    """Share of the machine's CPU time that was busy over the next `seconds` (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until other processes leave the CPU < `limit` busy over 3 s (the
    machine is shared; a timing run next to a busy neighbour measures the neighbour). Returns
    the busy share last seen."""
    deadline = time.time() + max_wait
    busy = cpu_busy(3)
    while busy > limit and time.time() < deadline:
        busy = cpu_busy(3)
    return busy


def spread(xs: list[float], digits: int = 1) -> str:
    return f"{statistics.median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def cpu_flags() -> str:
    try:
        info = run(["lscpu"])
    except (OSError, RuntimeError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
    name = fields.get("Model name", "?").strip()
    return (f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs, L3 {fields.get('L3 cache', '?').strip()}; flags: "
            + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted))


_ONE_PROMPT = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from fastlfm import LLM
try:  # the prompt repeats: measure work, not cache hits
    llm = LLM(sys.argv[1], dtype=sys.argv[2], engine_options={"enable_prefix_caching": False})
except ValueError:  # a COMMIT from before the prefix cache
    llm = LLM(sys.argv[1], dtype=sys.argv[2])
prompt = torch.randint(500, llm.model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
kw = dict(do_sample=False, ignore_eos=True)
llm.generate([prompt], max_new_tokens=4, **kw)  # warm-up
t = time.perf_counter(); llm.generate([prompt], max_new_tokens=1, **kw); first = time.perf_counter() - t
t = time.perf_counter(); r = llm.generate([prompt], max_new_tokens=128, **kw); total = time.perf_counter() - t
assert len(r[0].token_ids) == 128
print(f"RESULT {128 / first:.2f} {127 / (total - first):.2f}")
try:  # the fp32/bf16 kernel choice measured at load (commits before it have none)
    from fastlfm.cpu_linear import float_kernel_decisions
    print("KERNELS", " ".join(f"{tuple(s)}:{'packed' if p else 'plain'}" for (d, s), p in float_kernel_decisions().items()))
except ImportError:
    pass
"""


def one_loop_ab(work: Path, models: list[str], classes: list[str], commit: str, repeats: int, threads: int,
                quiet_limit: float, max_wait: float, engine_packs: list[str] = ("auto",)) -> list[str]:
    """Batch 1 through LLM.generate: this checkout (the engine) vs COMMIT's single-prompt loop, interleaved."""
    import torch

    from fastlfm.testing import real_config, write_checkpoint

    repo = Path(__file__).resolve().parent.parent
    old_src = work / f"src-{commit}"
    if not old_src.exists():
        archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "src"], capture_output=True, check=True)
        old_src.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive.stdout, check=True)
    # label -> (PYTHONPATH, FASTLFM_CPU_PACK)
    srcs = {f"engine (this checkout{'' if packs == 'auto' else f', {packs}'})": (str(repo / "src"), packs)
            for packs in engine_packs}
    srcs[f"single-prompt loop ({commit})"] = (str(old_src / "src"), "auto")
    lines = ["| model | dtype | path | prefill tok/s (128-token prompt + first token) | decode tok/s |", "|---|---|---|---|---|"]
    for model in models:
        folder = work / model.lower()
        if not (folder / "config.json").exists():
            write_checkpoint(folder, real_config(model), dtype=torch.bfloat16)
        for cls in classes:
            dtype = CLASSES[cls][0]
            got: dict[str, list[tuple[float, float]]] = {k: [] for k in srcs}
            for _ in range(repeats):
                for label, (src, packs) in srcs.items():
                    wait_quiet(quiet_limit, max_wait)
                    out = run([sys.executable, "-c", _ONE_PROMPT, str(folder), dtype, str(threads)],
                              env={**os.environ, "PYTHONPATH": src, "FASTLFM_CPU_PACK": packs})
                    pf, dec = map(float, next(ln for ln in out.splitlines() if ln.startswith("RESULT")).split()[1:])
                    kernels = next((ln for ln in out.splitlines() if ln.startswith("KERNELS")), "")
                    print(f"{model} {dtype} {label}: prefill {pf:.1f} decode {dec:.2f} {kernels}", file=sys.stderr,
                          flush=True)
                    got[label].append((pf, dec))
            for label, xs in got.items():
                lines.append(f"| {model} | {dtype} | {label} | {spread([x[0] for x in xs])} | "
                             f"{spread([x[1] for x in xs])} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source dir with build/bin/llama-bench")
    ap.add_argument("--one-loop-ab", nargs="?", const="54557df", default=None, metavar="COMMIT",
                    help="only the A/B of batch-1 LLM.generate: the engine vs COMMIT's single-prompt loop")
    ap.add_argument("--engine-packs", nargs="+", default=["auto"], choices=["auto", "packed", "plain"],
                    help="--one-loop-ab: the engine's fp32/bf16 kernel choices to run (FASTLFM_CPU_PACK)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fastlfm-cpu-bench"), help="checkpoints and GGUF files")
    ap.add_argument("--models", nargs="+", default=["LFM2-350M", "LFM2-1.2B"])
    ap.add_argument("--classes", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", action="store_true", help="also run fastlfm on llama.cpp's Q8_0 / Q4_0 files")
    ap.add_argument("--no-cold-start", action="store_true")
    ap.add_argument("--cold-start-only", action="store_true",
                    help="only the 350M's cold starts (no llama.cpp needed); compare code versions by PYTHONPATH")
    ap.add_argument("--ab", action="store_true",
                    help="also run fp32 / bf16 through the engine without pre-packing (torch's default linear)")
    ap.add_argument("--json", type=Path, default=None, help="append the raw samples here (JSON lines)")
    ap.add_argument("--quiet-limit", type=float, default=0.15,
                    help="before each timed pair, wait until the CPU is less busy than this (0-1)")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for a quiet CPU at most")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one_loop_ab:
        print(f"# batch-1 LLM.generate on the CPU, {args.threads} threads, prompt {PROMPT}, {NEW} new tokens, greedy; "
              f"{time.strftime('%Y-%m-%d %H:%M')}; {cpu_flags()}; median (min-max) of {args.repeats} interleaved repeats\n")
        print("\n".join(one_loop_ab(args.work, args.models, [c for c in args.classes if c in ("fp32", "bf16")],
                                    args.one_loop_ab, args.repeats, args.threads, args.quiet_limit, args.max_wait,
                                    args.engine_packs)))
        return 0
    if args.cold_start_only:
        import torch

        from fastlfm.testing import real_config, write_checkpoint

        folder = args.work / "lfm2-350m"
        if not (folder / "model.safetensors").is_file():
            write_checkpoint(folder, real_config("LFM2-350M"), dtype=torch.bfloat16, tokenizer=True)
        print(f"# LFM2-350M cold start to first token, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}; "
              f"fastlfm from {os.path.dirname(__import__('fastlfm').__file__)}")
        for cls, xs in cold_starts(folder, args):
            print(f"LFM2-350M cold start to first token, {cls}: {spread(xs, 2)} s (goal < 2 s)")
        return 0
    if args.llama_cpp is None:
        ap.error("--llama-cpp is required (except with --one-loop-ab or --cold-start-only)")
    llama = args.llama_cpp.resolve()
    import torch

    print(f"# fastlfm vs llama.cpp, CPU, batch 1, {args.threads} threads, prompt {PROMPT}, {NEW} new tokens, greedy")
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__} (cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}); {cpu_flags()}")
    load0 = os.getloadavg()[0]
    rows = []
    for model in args.models:
        folder, files = ensure_files(args.work, model, llama, [CLASSES[c][2] for c in args.classes])
        for cls in args.classes:
            dtype, quant, ltype = CLASSES[cls]
            sources = [(f"fastlfm {cls}", str(folder), dtype, quant, False)]
            if args.ab and quant is None:
                sources.append((f"fastlfm {cls}, not packed (before)", str(folder), dtype, quant, True))
            if args.gguf and quant is not None:
                sources.append((f"fastlfm on {ltype}.gguf", str(files[ltype]), "auto", None, False))
            for label, source, d, q, unpacked in sources:
                runner = FastlfmRunner(source, d, q, args.threads, unpacked)
                ours_pf, ours_dec, peer_pf, peer_dec, busy = [], [], [], [], []
                for _ in range(args.repeats):  # interleaved: the same machine state for both
                    busy.append(wait_quiet(args.quiet_limit, args.max_wait))
                    p, t = llama_bench(llama, files[ltype], args.threads)
                    peer_pf.append(p), peer_dec.append(t)
                    p, t = runner.once()
                    ours_pf.append(p), ours_dec.append(t)
                row = dict(model=model, case=label, peer=f"llama.cpp {ltype}", load_s=runner.load_s,
                           huge_page_move_s=runner.huge_page_move_s, busy_before=busy,
                           prefill=ours_pf, decode=ours_dec, peer_prefill=peer_pf, peer_decode=peer_dec,
                           outside_steps_ms=[1e3 * x for x in runner.outside_steps[1:]])  # [0]: the warm-up
                rows.append(row)
                print(f"{model} {label}: prefill {spread(ours_pf)} vs {spread(peer_pf)}; decode {spread(ours_dec)} vs "
                      f"{spread(peer_dec)} tok/s (load {runner.load_s:.1f} s, then {runner.huge_page_move_s:.1f} s idle while "
                      f"the weights moved onto huge pages; CPU busy before each pair "
                      f"{', '.join(f'{b:.0%}' for b in busy)})", file=sys.stderr, flush=True)
                del runner
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    cold = []
    if not args.no_cold_start and "LFM2-350M" in args.models:
        cold = cold_starts(args.work / "lfm2-350m", args)
    load1 = os.getloadavg()[0]

    print(f"load average {load0:.2f} before, {load1:.2f} after; median of {args.repeats} interleaved repeats "
          f"(min-max in brackets); each pair started once other processes left the CPU < {args.quiet_limit:.0%} busy "
          f"(or after {args.max_wait:.0f} s; the busy shares seen are in the log)\n")
    # "paired": the ratio within each repeat's pair (run back to back), median (min-max): the host's drift
    # between repeats cancels there, where the ratio of the medians mixes repeats.
    print("| model | fastlfm | peer | prefill tok/s fastlfm | prefill tok/s peer | ratio | decode tok/s fastlfm "
          "| decode tok/s peer | ratio | decode ratio, paired |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pf = statistics.median(r["prefill"]) / statistics.median(r["peer_prefill"])
        dec = statistics.median(r["decode"]) / statistics.median(r["peer_decode"])
        paired = [a / b for a, b in zip(r["decode"], r["peer_decode"])]
        print(f"| {r['model']} | {r['case']} | {r['peer']} | {spread(r['prefill'])} | {spread(r['peer_prefill'])} | "
              f"{pf:.2f}x | {spread(r['decode'])} | {spread(r['peer_decode'])} | {dec:.2f}x | {spread(paired, 2)}x |")
    for r in rows:
        if r["case"] == "fastlfm bf16":  # against the llama.cpp BF16 runs interleaved with it
            print(f"\n{r['model']}: fastlfm bf16 prefill / llama.cpp BF16 prefill = "
                  f"{statistics.median(r['prefill']) / statistics.median(r['peer_prefill']):.2f}x (goal >= 1.5x)")
    print("\nLLM.generate beyond the engine's steps (setting the request up, its result), ms a call: " + "; ".join(
        f"{r['model']} {r['case']} {spread(r['outside_steps_ms'])}" for r in rows))
    for cls, xs in cold:
        print(f"LFM2-350M cold start to first token, {cls}: {spread(xs)} s (goal < 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
