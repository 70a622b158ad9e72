"""``fastlfm bench serve``: the OpenAI server's speed over HTTP, measured as ``vllm bench serve``
and SGLang's ``bench_serving`` measure it.

The run: start ``fastlfm serve MODEL`` in a subprocess (or target ``--url``), send random-token
prompts (1024 tokens in, 1024 out with ``ignore_eos`` by default) to /v1/completions, streaming,
greedy, at each ``--concurrency`` (1, 16, 100 by default: that many requests in flight, the next
sent as soon as one finishes). The clients are asyncio + httpx, spread over several processes at
high concurrency so that parsing 40k server-sent events a second does not make the client the
bottleneck.

The report, per concurrency: output tok/s (completion tokens / wall time of the level), TTFT,
inter-token latency (time between streamed chunks), time per output token ((e2e - TTFT) /
(tokens - 1)) and end-to-end latency, p50 and p99; the server's own /metrics before and after
(counter deltas: tokens, finished requests by reason, errors by status, preemptions; gauges
after: KV blocks and conv slots in use). It prints a markdown table, with SGLang's published
figures for LFM2-1.2B on one H200 beside ours (published numbers, not measured in this run:
SGLang cannot run here), and writes it with the raw results as JSON.

MODEL: a checkpoint folder or hub id, or ``LFM2-350M`` / ``LFM2-1.2B`` / ``LFM2-700M`` /
``LFM2-2.6B`` for a checkpoint of that shape with random bf16 weights and the full-size
(65,536-token) test tokenizer, written once to ``--checkpoint-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# SGLang's published figures for LFM2-1.2B on one H200, 1k-token prompts and 1k-token outputs,
# measured with its bench_serving: output tok/s by concurrency.
SGLANG_PUBLISHED = {"LFM2-1.2B": {1: 445.0, 100: 14_900.0}}
# The goals for fastlfm on the H200 with LFM2-1.2B.
GOALS = {"LFM2-1.2B": {"c1_output_tps": 1000.0, "c100_output_tps": 40_000.0, "c1_ttft_p50_ms": 15.0}}
SHAPES = ("LFM2-350M", "LFM2-700M", "LFM2-1.2B", "LFM2-2.6B")


# ----------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # time.monotonic(), comparable across processes (Linux: CLOCK_MONOTONIC)
    end: float = 0.0
    ttft: float = math.nan
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    text: str = ""          # the streamed text (kept with `keep_text`)

    @property
    def e2e(self) -> float:
        return self.end - self.start


def parse_sse_line(line: str) -> Any:
    """The JSON of one ``data:`` line of a stream, "[DONE]", or None for other lines."""
    if not line.startswith("data: "):
        return None
    payload = line[6:]
    return payload if payload == "[DONE]" else json.loads(payload)


async def stream_completion(http, url: str, body: dict, path: str = "/v1/completions",
                            keep_text: bool = False) -> RequestResult:
    """POST one streaming completion (or chat completion: `path`) and time it."""
    result = RequestResult(ok=False, start=time.monotonic())
    done = False
    parts: list[str] = []
    try:
        async with http.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                now = time.monotonic()
                if event == "[DONE]":
                    done = True
                    break
                if "error" in event:
                    result.error = json.dumps(event["error"])[:300]
                    return result
                if event.get("usage"):
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                    result.output_tokens = event["usage"]["completion_tokens"]
                    result.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                               for c in event.get("choices", ()))
                if text:
                    if not result.chunk_times:
                        result.ttft = now - result.start
                    result.chunk_times.append(now)
                    if keep_text:
                        parts.append(text)
    except Exception as e:  # a transport error is a failed request, reported with the rest
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    finally:
        result.end = time.monotonic()
        result.text = "".join(parts)
    result.ok = done and not result.error
    if result.ok and not result.output_tokens:
        result.ok, result.error = False, "no usage in the stream"
    return result


# ----------------------------------------------------------------------------- a level of concurrency


async def _run_clients(url: str, bodies: list[dict], concurrency: int, progress=None) -> list[RequestResult]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(connect=30, read=600, write=60, pool=600)
    queue = list(reversed(bodies))
    results: list[RequestResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def worker() -> None:
            while queue:
                result = await stream_completion(http, url, queue.pop())
                results.append(result)
                if progress is not None:
                    progress()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _client_process(url: str, bodies: list[dict], concurrency: int, barrier, counter, out) -> None:
    """One client process: once imported, waits for the others so that all start together."""
    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    barrier.wait()
    out.put([asdict(r) for r in asyncio.run(_run_clients(url, bodies, concurrency, tick))])


def split_load(num_requests: int, concurrency: int, processes: int) -> list[tuple[int, int, int]]:
    """(first request, requests, concurrency) of each client process: the slots dealt as evenly as they
    go, and the requests in proportion to the slots (largest remainders first), so that every process
    runs as many waves as the others. Dealing the requests evenly instead leaves a process with fewer
    slots a last wave of a few requests that the others have no share of (100 slots over 8 processes,
    200 requests: four processes of 12 slots ran 12 + 12 + 1, and the run took a third wave's time)."""
    slots = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    exact = [num_requests * c / concurrency for c in slots]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(processes), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:num_requests - sum(counts)]:
        counts[i] += 1
    starts = [sum(counts[:i]) for i in range(processes)]
    return list(zip(starts, counts, slots))


def run_level(url: str, bodies: list[dict], concurrency: int, processes: int, show_progress: bool = True,
              desc: str = "") -> list[RequestResult]:
    """Send `bodies` with at most `concurrency` in flight, from `processes` client processes."""
    from tqdm.auto import tqdm

    processes = max(1, min(processes, concurrency, len(bodies)))
    bar = tqdm(total=len(bodies), desc=desc, disable=not show_progress, file=sys.stderr, leave=True)
    if processes == 1:
        results = asyncio.run(_run_clients(url, bodies, concurrency, lambda: bar.update()))
        bar.close()
        return results
    ctx = mp.get_context("spawn")  # no forked event loop or threads
    counter, out, barrier = ctx.Value("i", 0), ctx.Queue(), ctx.Barrier(processes + 1)
    shares = [(bodies[start:start + count], slots) for start, count, slots in split_load(len(bodies), concurrency,
                                                                                      processes)]
    procs = [ctx.Process(target=_client_process, args=(url, b, c, barrier, counter, out), daemon=True)
             for b, c in shares]
    for p in procs:
        p.start()
    barrier.wait(timeout=300)
    results: list[RequestResult] = []
    while len(results) < len(bodies):
        try:
            results += [RequestResult(**r) for r in out.get(timeout=0.5)]
        except Exception:  # queue.Empty: update the bar, check the processes
            if not any(p.is_alive() for p in procs) and out.empty():
                break
        if bar.n != counter.value:
            bar.n = counter.value
            bar.refresh()
    for p in procs:
        p.join(30)
    bar.n = counter.value
    bar.close()
    return results


# ----------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _p50_p99(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def summarize(results: list[RequestResult], concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    duration = (max(r.end for r in results) - min(r.start for r in results)) if results else math.nan
    out_tokens = sum(r.output_tokens for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.chunk_times]
    ms = 1000.0
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in ok) / len(ok) if ok else math.nan,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration if ok else 0.0,
        "request_per_s": len(ok) / duration if ok else 0.0,
        # requests in flight on average over the run: below `concurrency`, slots stood empty (ramp,
        # tail, or time between a request's end and the next one's start)
        "mean_in_flight": sum(r.end - r.start for r in results) / duration if results and duration > 0 else 0.0,
        "ttft_ms": _p50_p99([r.ttft * ms for r in ok if r.chunk_times]),
        "itl_ms": _p50_p99([x * ms for x in itl]),
        "tpot_ms": _p50_p99([x * ms for x in tpot]),
        "e2e_s": _p50_p99([r.e2e for r in ok]),
    }


# ----------------------------------------------------------------------------- the server's /metrics


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {'name{labels}': value} (model_name label dropped)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


_COUNTERS = ("fastlfm_prompt_tokens_total", "fastlfm_prefix_cache_queries_total", "fastlfm_prefix_cache_hits_total",
             "fastlfm_generation_tokens_total", "fastlfm_num_preemptions_total",
             "fastlfm_request_success_total", "fastlfm_request_errors_total",
             "fastlfm_time_to_first_token_seconds_sum", "fastlfm_time_to_first_token_seconds_count",
             "fastlfm_e2e_request_latency_seconds_sum", "fastlfm_e2e_request_latency_seconds_count")
_GAUGES = ("fastlfm_kv_blocks_used", "fastlfm_kv_blocks_total", "fastlfm_conv_slots_used", "fastlfm_conv_slots_total",
           "fastlfm_num_requests_running", "fastlfm_num_requests_waiting", "fastlfm_server_requests_in_flight")


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counter deltas and gauges after, for the names above."""
    out = {}
    for key in sorted(set(before) | set(after)):
        if key.startswith(_COUNTERS):
            delta = after.get(key, 0.0) - before.get(key, 0.0)
            if delta:
                out[key] = delta
        elif key.startswith(_GAUGES):
            out[key] = after.get(key, 0.0)
    return out


# ----------------------------------------------------------------------------- prompts


def random_prompts(tokenizer, n: int, length: int, seed: int = 0, as_text: bool = True) -> list:
    """`n` prompts of random tokens, `length` tokens each once the server tokenizes them (text:
    decoded, re-encoded and trimmed or extended until they round-trip to `length` with the BOS the
    server adds; ids: exactly `length` ids). Special tokens are never drawn."""
    rng = random.Random(seed)
    special = set(tokenizer.backend.get_added_tokens_decoder())
    vocab = tokenizer.vocab_size
    pool = [i for i in range(vocab) if i not in special]
    prompts = []
    for _ in range(n):
        if not as_text:
            prompts.append(rng.choices(pool, k=length))
            continue
        target = length - int(bool(tokenizer.add_bos_token))
        ids = rng.choices(pool, k=target)
        text = tokenizer.decode(ids)
        for _ in range(10):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == target:
                break
            ids = ids[:target] if len(ids) > target else ids + rng.choices(pool, k=target - len(ids))
            text = tokenizer.decode(ids)
        prompts.append(text)
    return prompts


# ----------------------------------------------------------------------------- the server


def prepare_checkpoint(model: str, checkpoint_dir: str | os.PathLike) -> str:
    """A local folder for MODEL: a shape name writes (once) random bf16 weights with the full-size
    test tokenizer; anything else is passed to the server as is."""
    if model not in SHAPES:
        return model
    import torch

    from ..testing import real_config, write_checkpoint
    from ..testing.tokenizer_files import write_tokenizer_files

    folder = Path(checkpoint_dir) / f"ckpt-{model}"
    if not (folder / "config.json").exists():
        print(f"writing a random-weight {model} checkpoint to {folder}", file=sys.stderr)
        write_checkpoint(folder, real_config(model), dtype=torch.bfloat16)
    elif not (folder / "tokenizer.json").exists():  # e.g. written by bench/gpu.py without one
        write_tokenizer_files(folder, vocab_size=real_config(model)["vocab_size"])
    return str(folder)


class SpawnedServer:
    """`fastlfm serve` in a subprocess on 127.0.0.1; stopped with SIGTERM."""

    def __init__(self, model: str, port: int, server_args: list[str], log_path: Path, startup_timeout: float):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "fastlfm.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "bench", "--log-level", "warning", *server_args]
        print("starting:", " ".join(cmd), file=sys.stderr)
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() - started > startup_timeout:
                self.stop()
                raise RuntimeError(f"fastlfm serve did not start; its log ({log_path}):\n"
                                   f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - started
        print(f"server up in {self.startup_s:.0f} s", file=sys.stderr)

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM; returns the seconds it took to exit."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return time.monotonic() - started


def exit_on_sigterm() -> None:
    """SIGTERM (a stage's time limit) raises SystemExit, so that `finally` stops the server we started."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- report


def _fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def render_table(report: dict) -> str:
    shape = report.get("shape")
    peer = SGLANG_PUBLISHED.get(shape, {})
    goals = GOALS.get(shape, {})
    lines = [f"### fastlfm serve over HTTP: {report['model']} ({report['device']}), "
             f"{report['input_len']} in / {report['output_len']} out, greedy, ignore_eos, streaming",
             "",
             "| concurrency | requests | output tok/s | SGLang (published) | ratio | TTFT p50 / p99 ms | "
             "ITL p50 / p99 ms | TPOT p50 ms | E2E p50 / p99 s | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lvl in report["levels"]:
        c = lvl["concurrency"]
        sg = peer.get(c)
        ratio = f"{lvl['output_tok_s'] / sg:.2f}x" if sg else "—"
        lines.append(
            f"| {c} | {lvl['completed']}/{lvl['requests']} | {_fmt(lvl['output_tok_s'], 0)} | {_fmt(sg, 0)} | {ratio} | "
            f"{_fmt(lvl['ttft_ms']['p50'])} / {_fmt(lvl['ttft_ms']['p99'])} | {_fmt(lvl['itl_ms']['p50'], 2)} / "
            f"{_fmt(lvl['itl_ms']['p99'], 2)} | {_fmt(lvl['tpot_ms']['p50'], 2)} | {_fmt(lvl['e2e_s']['p50'], 2)} / "
            f"{_fmt(lvl['e2e_s']['p99'], 2)} | {lvl['failed']} |")
    if peer:
        lines += ["", "SGLang: its published figures for LFM2-1.2B on one H200 (1k/1k, bench_serving), not measured "
                      "in this run."]
    by_c = {lvl["concurrency"]: lvl for lvl in report["levels"]}
    if goals and (1 in by_c or 100 in by_c):
        checks = []
        if 1 in by_c:
            checks.append(f"c=1 output >= {goals['c1_output_tps']:,.0f} tok/s: {_fmt(by_c[1]['output_tok_s'], 0)} "
                          f"{'met' if by_c[1]['output_tok_s'] >= goals['c1_output_tps'] else 'NOT met'}")
            ttft = by_c[1]["ttft_ms"]['p50']
            checks.append(f"c=1 TTFT p50 <= {goals['c1_ttft_p50_ms']:g} ms: {_fmt(ttft)} "
                          f"{'met' if ttft <= goals['c1_ttft_p50_ms'] else 'NOT met'}")
        if 100 in by_c:
            checks.append(f"c=100 output >= {goals['c100_output_tps']:,.0f} tok/s: "
                          f"{_fmt(by_c[100]['output_tok_s'], 0)} "
                          f"{'met' if by_c[100]['output_tok_s'] >= goals['c100_output_tps'] else 'NOT met'}")
        lines += ["", "Goals (issue 16): " + "; ".join(checks) + "."]
    for lvl in report["levels"]:
        m = lvl.get("server_metrics", {})
        gen = m.get("fastlfm_generation_tokens_total", 0)
        leaks = {k: v for k, v in m.items() if k.endswith(("_used", "in_flight", "running", "waiting")) and v}
        errs = {k: v for k, v in m.items() if k.startswith("fastlfm_request_errors_total")}
        lines.append(f"- c={lvl['concurrency']}: server counted {gen:,.0f} generated tokens (clients: "
                     f"{lvl['output_tokens']:,}), errors {errs or 'none'}, in use after: {leaks or 'nothing'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_parser(prog: str = "fastlfm bench serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder or hub id to serve, or a shape: " + ", ".join(SHAPES))
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--label", default=None,
                   help="the model's name in the report (default: MODEL or the URL); a shape name (LFM2-1.2B...) "
                        "puts that shape's published peer figures beside ours")
    p.add_argument("--tokenizer", default=None,
                   help="folder (or hub id) with tokenizer.json for the prompts (default: the model's; needed with "
                        "--url)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 100])
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: max(4, 2 x concurrency))")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--prompt-format", choices=["text", "ids"], default="text",
                   help="random text that tokenizes to --input-len tokens, or the token ids themselves")
    p.add_argument("--client-processes", type=int, default=None,
                   help="client processes (default: 1 up to concurrency 16, then up to 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="passed to fastlfm serve")
    p.add_argument("--dtype", default=None, help="passed to fastlfm serve")
    p.add_argument("--server-args", default="", help="more flags for fastlfm serve, as one string")
    p.add_argument("--checkpoint-dir", default=os.environ.get("FASTLFM_BENCH_CKPT", "/tmp"),
                   help="where shape checkpoints are written (default /tmp)")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--output-dir", default=os.environ.get("OUT", "."), help="JSON + markdown go here (default $OUT or .)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex

    import httpx

    from ..loading import resolve_model_dir
    from ..tokenizer import Tokenizer

    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.url is None):
        build_parser().error("give a MODEL to serve or --url of a running server (one of them)")
    if min(args.concurrency) < 1 or args.input_len < 2 or args.output_len < 1:
        build_parser().error("--concurrency, --input-len (>= 2) and --output-len must be positive")
    exit_on_sigterm()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server = None
    folder = None
    name = args.label or args.model or args.url
    try:
        if args.url is None:
            folder = prepare_checkpoint(args.model, args.checkpoint_dir)
            server_args = shlex.split(args.server_args)
            if args.device:
                server_args += ["--device", args.device]
            if args.dtype:
                server_args += ["--dtype", args.dtype]
            log = out_dir / f"serve_{Path(name).name}.log"
            server = SpawnedServer(folder, free_port(), server_args, log, args.startup_timeout)
            url = server.url
        else:
            url = args.url.rstrip("/")
        served = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        tok_source = args.tokenizer or folder
        if tok_source is None:
            build_parser().error("--url needs --tokenizer FOLDER (the served model's tokenizer, for the prompts)")
        tokenizer = Tokenizer.from_pretrained(resolve_model_dir(tok_source))
        as_text = args.prompt_format == "text"
        # Warm-up (first requests compile shapes, fill caches): not measured.
        warm = random_prompts(tokenizer, 2, args.input_len, seed=args.seed + 99, as_text=as_text)
        run_level(url, [_body(served["id"], p, 8) for p in warm], 2, 1, show_progress=False)
        report: dict[str, Any] = {
            "model": name, "shape": name if name in SHAPES else None, "url": url,
            "device": _device_name(args.device), "input_len": args.input_len, "output_len": args.output_len,
            "prompt_format": "text" if as_text else "ids", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "startup_s": server.startup_s if server else None, "levels": [],
        }
        for i, c in enumerate(args.concurrency):
            n = args.num_prompts or max(4, 2 * c)
            prompts = random_prompts(tokenizer, n, args.input_len, seed=args.seed + i, as_text=as_text)
            bodies = [_body(served["id"], p, args.output_len) for p in prompts]
            procs = args.client_processes or (1 if c <= 16 else min(8, max(1, (os.cpu_count() or 2) // 2)))
            before = scrape(url)
            results = run_level(url, bodies, c, procs, show_progress=not args.quiet, desc=f"concurrency {c}")
            _wait_idle(url)
            level = summarize(results, c)
            level["server_metrics"] = metrics_delta(before, scrape(url))
            level["client_processes"] = procs
            report["levels"].append(level)
            print(f"concurrency {c}: {level['output_tok_s']:,.0f} output tok/s, TTFT p50 "
                  f"{_fmt(level['ttft_ms']['p50'])} ms, failed {level['failed']}, requests in flight on average "
                  f"{level['mean_in_flight']:.1f}", file=sys.stderr)
        if server is not None:
            report["sigterm_exit_s"] = server.stop()
            server = None
        table = render_table(report)
        stem = f"serve_{Path(name).name if args.url is None or args.label else 'url'}"
        (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / f"{stem}.md").write_text(table + "\n")
        print(table)
        return 0 if all(lvl["failed"] == 0 for lvl in report["levels"]) else 1
    finally:
        if server is not None:
            server.stop()


def _body(model: str, prompt, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def _wait_idle(url: str, timeout: float = 60) -> None:
    """Until the server holds no request (so the next level and the metrics start clean)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(url)
        if not m.get("fastlfm_num_requests_running") and not m.get("fastlfm_num_requests_waiting"):
            return
        time.sleep(0.1)


def _device_name(device: str | None) -> str:
    try:
        import torch

        if (device or "cuda").startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return "CPU"


def bench_main(argv: list[str] | None = None) -> int:
    """`fastlfm bench SUBCOMMAND`: only `serve` for now."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve",):
        print("usage: fastlfm bench serve [MODEL | --url URL] [options]  (fastlfm bench serve --help)",
              file=sys.stderr)
        return 2
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
