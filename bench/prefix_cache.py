"""Prefix caching over HTTP (issue 18): a multi-turn chat load against `fastlfm serve`, run twice on
the same conversations, with the prefix cache and without it (`--no-prefix-caching`).

    PYTHONPATH=src python bench/prefix_cache.py LFM2-1.2B --server-args=--no-compile   # GPU: 64 conversations x 10 turns, 2k-token system prompt
    PYTHONPATH=src python bench/prefix_cache.py CKPT --device cpu --dtype float32 \\
        --conversations 4 --turns 3 --system-len 128 --user-len 16 --output-len 8   # CPU smoke run

The load: `--conversations` conversations at once, all with the same system prompt of
`--system-len` tokens of random text; each sends `--turns` user messages of `--user-len` tokens,
one turn after the other, every turn the whole history (system prompt, earlier messages, the
server's own answers) as a streamed chat completion (greedy, ignore_eos, `--output-len` tokens).
Reported per server run: TTFT p50 / p99 of the first turns and of the later turns, output and
prompt tok/s, the cached tokens the server reported in usage, its /metrics hit rate. Goal (issue
18): TTFT p50 of later turns with the cache <= 25% of the value without it. Clients, prompts and
the server process come from fastlfm.server.benchmark (`fastlfm bench serve`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from fastlfm.server import benchmark
from fastlfm.server.benchmark import (RequestResult, SpawnedServer, _device_name, _fmt, _p50_p99, _wait_idle,
                                      exit_on_sigterm, free_port, metrics_delta, prepare_checkpoint, random_prompts,
                                      scrape, stream_completion)

GOAL_TTFT_RATIO = 0.25


async def _conversation(http, url: str, model: str, system: str, users: list[str], output_len: int
                        ) -> list[RequestResult]:
    messages = [{"role": "system", "content": system}]
    results = []
    for user in users:
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, "max_tokens": output_len, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        result = await stream_completion(http, url, body, "/v1/chat/completions", keep_text=True)
        results.append(result)
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": result.text})
    return results


async def _conversations(url: str, model: str, system: str, convs: list[list[str]], output_len: int):
    import httpx

    limits = httpx.Limits(max_connections=len(convs) + 4, max_keepalive_connections=len(convs) + 4)
    timeout = httpx.Timeout(connect=30, read=600, write=60, pool=600)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        return await asyncio.gather(*(_conversation(http, url, model, system, users, output_len) for users in convs))


def _client_process(url: str, model: str, system: str, convs: list[list[str]], output_len: int) -> list[list[dict]]:
    return [[asdict(r) for r in conv] for conv in asyncio.run(_conversations(url, model, system, convs, output_len))]


def run_load(url: str, model: str, system: str, convs: list[list[str]], output_len: int, processes: int
             ) -> list[list[RequestResult]]:
    """All conversations at once, spread over `processes` client processes (so that parsing the
    streams does not make the client the bottleneck)."""
    shares = [convs[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        done = list(pool.map(_client_process, *zip(*[(url, model, system, s, output_len) for s in shares])))
    return [[RequestResult(**r) for r in conv] for share in done for conv in share]


def summarize(convs: list[list[RequestResult]], turns: int) -> dict:
    flat = [r for conv in convs for r in conv]
    ok = [r for r in flat if r.ok]
    first = [conv[0] for conv in convs if conv and conv[0].ok]
    later = [r for conv in convs for r in conv[1:] if r.ok]
    common = {k: v for k, v in benchmark.summarize(flat, len(convs)).items()
              if k in ("completed", "errors", "duration_s", "output_tok_s")}
    ms = 1000.0
    return {
        **common, "requests": len(convs) * turns, "failed": len(convs) * turns - len(ok),
        "prompt_tok_s": sum(r.prompt_tokens for r in ok) / common["duration_s"],
        "ttft_first_ms": _p50_p99([r.ttft * ms for r in first]),
        "ttft_later_ms": _p50_p99([r.ttft * ms for r in later]),
        "later_prompt_tokens_mean": sum(r.prompt_tokens for r in later) / max(len(later), 1),
        "later_cached_tokens_mean": sum(r.cached_tokens for r in later) / max(len(later), 1),
        "first_cached_tokens_mean": sum(r.cached_tokens for r in first) / max(len(first), 1),
    }


def render(report: dict) -> str:
    lines = [f"### Multi-turn chat over HTTP, prefix cache on / off: {report['model']} ({report['device']})",
             "",
             f"{report['conversations']} conversations at once x {report['turns']} turns, a shared system prompt of "
             f"{report['system_len']} tokens, {report['user_len']}-token user messages, {report['output_len']}-token "
             "answers (greedy, ignore_eos, streamed chat completions)",
             "",
             "| prefix cache | TTFT turn 1 p50 / p99 ms | TTFT later turns p50 / p99 ms | later turns: prompt / cached "
             "tokens (mean) | server hit rate | output tok/s | prompt tok/s | wall s | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, run in report["runs"].items():
        m = run["server_metrics"]
        queries = m.get("fastlfm_prefix_cache_queries_total", 0)
        rate = f"{m.get('fastlfm_prefix_cache_hits_total', 0) / queries:.1%}" if queries else "—"
        lines.append(
            f"| {mode} | {_fmt(run['ttft_first_ms']['p50'])} / {_fmt(run['ttft_first_ms']['p99'])} | "
            f"{_fmt(run['ttft_later_ms']['p50'])} / {_fmt(run['ttft_later_ms']['p99'])} | "
            f"{_fmt(run['later_prompt_tokens_mean'], 0)} / {_fmt(run['later_cached_tokens_mean'], 0)} | {rate} | "
            f"{_fmt(run['output_tok_s'], 0)} | {_fmt(run['prompt_tok_s'], 0)} | {_fmt(run['duration_s'])} | "
            f"{run['failed']} |")
    runs = report["runs"]
    if {"on", "off"} <= set(runs):
        ratio = runs["on"]["ttft_later_ms"]["p50"] / runs["off"]["ttft_later_ms"]["p50"]
        report["ttft_later_p50_ratio"] = ratio
        lines += ["", f"Goal (issue 18): TTFT p50 of later turns with the cache <= {GOAL_TTFT_RATIO:.0%} of without: "
                      f"{ratio:.1%}, {'met' if ratio <= GOAL_TTFT_RATIO else 'NOT met'}."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder or hub id, or a shape (LFM2-350M, LFM2-1.2B, ...: random bf16 "
                                 "weights with the full-size test tokenizer)")
    p.add_argument("--conversations", type=int, default=64, help="conversations at once")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-len", type=int, default=2048, help="tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=64, help="tokens of each user message")
    p.add_argument("--output-len", type=int, default=64, help="tokens of each answer")
    p.add_argument("--modes", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="server runs: with the prefix cache (on), with --no-prefix-caching (off)")
    p.add_argument("--client-processes", type=int, default=None, help="default: 1 per 16 conversations, up to 4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="passed to fastlfm serve")
    p.add_argument("--dtype", default=None, help="passed to fastlfm serve")
    p.add_argument("--server-args", default="", help="more flags for fastlfm serve, as one string")
    p.add_argument("--checkpoint-dir", default=os.environ.get("FASTLFM_BENCH_CKPT", "/tmp"))
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--output-dir", default=os.environ.get("OUT", "."), help="JSON + markdown go here (default $OUT or .)")
    return p


def main(argv: list[str] | None = None) -> int:
    import httpx

    from fastlfm.loading import resolve_model_dir
    from fastlfm.tokenizer import Tokenizer

    args = build_parser().parse_args(argv)
    if min(args.conversations, args.turns, args.system_len, args.user_len, args.output_len) < 1:
        build_parser().error("--conversations, --turns and the lengths must be positive")
    exit_on_sigterm()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = prepare_checkpoint(args.model, args.checkpoint_dir)
    tokenizer = Tokenizer.from_pretrained(resolve_model_dir(folder))
    system = random_prompts(tokenizer, 1, args.system_len, seed=args.seed)[0]
    users = random_prompts(tokenizer, args.conversations * args.turns, args.user_len, seed=args.seed + 1)
    convs = [users[i * args.turns:(i + 1) * args.turns] for i in range(args.conversations)]
    # Warm-up: 2 one-turn conversations as long as a first turn of the load, sharing nothing with it
    # (a system prompt of --system-len tokens, user messages of --user-len).
    warm_system = random_prompts(tokenizer, 1, args.system_len, seed=args.seed + 99)[0]
    warm_users = random_prompts(tokenizer, 2, args.user_len, seed=args.seed + 99)
    processes = args.client_processes or min(4, -(-args.conversations // 16))
    base_args = shlex.split(args.server_args)
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value:
            base_args += [flag, value]
    report = {"model": args.model, "device": _device_name(args.device), "conversations": args.conversations,
              "turns": args.turns, "system_len": args.system_len, "user_len": args.user_len,
              "output_len": args.output_len, "server_args": base_args, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "runs": {}}
    for mode in args.modes:
        server_args = base_args + ([] if mode == "on" else ["--no-prefix-caching"])
        server = SpawnedServer(folder, free_port(), server_args, out_dir / f"prefix_cache_server_{mode}.log",
                               args.startup_timeout)
        try:
            model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            warmup = [r for conv in run_load(server.url, model, warm_system, [[u] for u in warm_users], 4, 1)
                      for r in conv]  # not measured
            failed = [r.error for r in warmup if not r.ok]
            if failed:
                raise RuntimeError(f"the warm-up failed ({len(failed)} of {len(warmup)} requests): {failed[0]}")
            _wait_idle(server.url)
            before = scrape(server.url)
            results = run_load(server.url, model, system, convs, args.output_len, processes)
            _wait_idle(server.url)
            run = summarize(results, args.turns)
            run["server_metrics"] = metrics_delta(before, scrape(server.url))
            run["startup_s"] = server.startup_s
            run["warmup_completed"] = len(warmup)
        finally:
            server.stop()
        report["runs"][mode] = run
        print(f"prefix cache {mode}: TTFT later turns p50 {_fmt(run['ttft_later_ms']['p50'])} ms, "
              f"{run['output_tok_s']:,.0f} output tok/s, failed {run['failed']}", file=sys.stderr)
    table = render(report)
    (out_dir / "prefix_cache.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "prefix_cache.md").write_text(table + "\n")
    print(table)
    return 0 if all(run["failed"] == 0 for run in report["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
