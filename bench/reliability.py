"""Reliability load test of ``fastlfm serve`` (issue 16): the server under a mix of normal and
hostile traffic, against the same server under normal traffic alone.

    PYTHONPATH=src python bench/reliability.py LFM2-1.2B                     # GPU, 1,000 requests
    PYTHONPATH=src python bench/reliability.py --url http://127.0.0.1:8000 --tokenizer CKPT ...
    PYTHONPATH=src python bench/reliability.py CKPT --device cpu --requests 150 --max-tokens 16 ...

Two runs with the same number of request slots (``--concurrency``), so the engine batches about
as many generations in both:
1. clean: normal requests only (chat and text completions, streaming or not, ``--max-tokens``
   tokens with ignore_eos);
2. mixed, ``--requests`` in all: normal requests; streams the client drops mid-way; invalid
   bodies (bad JSON, wrong types, malformed numbers, a 5,000-digit logit_bias key); bodies over
   ``--max-request-bytes``; huge requests within it (a prompt of up to 10 MB, 100k messages);
   slow clients that trickle or stop sending their headers or body
   (they run beside the slots, each until the server's timeout cuts it off); and adversarial
   generations whose logit_bias forces lone UTF-8 continuation bytes, output that never
   completes a character, for ``--adversarial-tokens`` tokens.

Checks (the exit status is 1 if one fails): every request got the answer its kind calls for
(normal: 200 and all its tokens; invalid: a 4xx in the OpenAI error schema; oversized: 413; slow:
408 or disconnected; adversarial: 200 and all its tokens); no 5xx, seen by the clients or counted
by the server; no KV block, conv slot or request left in use afterwards (the /metrics gauges
return to 0); normal requests' p99 latency in the mixed run within ``--max-latency-ratio`` (2x)
of the clean run. /health is probed every 50 ms during the mixed run: its latency is reported
(the goal: under 100 ms throughout). The report (markdown table + JSON) goes to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from fastlfm.server.benchmark import (SpawnedServer, exit_on_sigterm, free_port, metrics_delta, percentile,
                                      prepare_checkpoint, scrape)

KINDS = ("normal", "disconnect", "invalid", "oversized", "huge", "slow", "adversarial")
# Shares of the mixed run (slow clients are extra connections, beside the request slots).
MIX = {"normal": 0.45, "disconnect": 0.10, "invalid": 0.14, "oversized": 0.05, "huge": 0.01, "slow": 0.05,
       "adversarial": 0.20}
WORDS = "alpha beta gamma delta the quick brown fox jumps over lazy dog café naïve 42 2026 über".split()


@dataclass
class Outcome:
    kind: str
    variant: str
    ok: bool = False
    status: int | None = None
    latency: float = math.nan
    detail: str = ""
    tokens: int = 0


@dataclass
class Config:
    url: str
    model: str
    concurrency: int
    max_tokens: int
    adversarial_tokens: int
    max_request_bytes: int
    header_timeout: float
    body_timeout: float
    continuation_ids: list[int] = field(default_factory=list)
    request_timeout: float = 300.0  # a request still running after this is dropped (and failed)
    deadline: float = math.inf  # time.monotonic() after which no new request is started


# ----------------------------------------------------------------------------- request kinds


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))


async def normal(http: httpx.AsyncClient, cfg: Config, rng: random.Random, max_tokens: int | None = None,
                 logit_bias: dict | None = None, kind: str = "normal") -> Outcome:
    n = max_tokens or cfg.max_tokens
    chat, stream = rng.random() < 0.5, rng.random() < 0.6
    body: dict = {"model": cfg.model, "max_tokens": n, "ignore_eos": True, "temperature": rng.choice([0, 0.8]),
                  "seed": rng.randint(0, 10**6), "stream": stream}
    if logit_bias:
        body["logit_bias"] = logit_bias
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
    else:
        body["prompt"] = _prompt(rng)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    out = Outcome(kind, ("chat" if chat else "text") + ("-stream" if stream else ""))
    started = time.monotonic()
    if not stream:
        r = await http.post(cfg.url + path, json=body)
        out.latency, out.status = time.monotonic() - started, r.status_code
        if r.status_code == 200:
            data = r.json()
            out.tokens = data["usage"]["completion_tokens"]
            reasons = {c["finish_reason"] for c in data["choices"]}
            out.ok = out.tokens == n and reasons == {"length"}
            out.detail = "" if out.ok else f"tokens {out.tokens}/{n}, finish {reasons}"
        else:
            out.detail = r.text[:200]
        return out
    finish = []
    async with http.stream("POST", cfg.url + path, json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.detail = (await r.aread())[:200].decode(errors="replace")
            return out
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out.detail = json.dumps(event["error"])[:200]
                return out
            if event.get("usage"):
                out.tokens = event["usage"]["completion_tokens"]
            finish += [c["finish_reason"] for c in event["choices"] if c.get("finish_reason")]
    out.latency = time.monotonic() - started
    out.ok = done and out.tokens == n and finish == ["length"]
    out.detail = "" if out.ok else f"done={done} tokens {out.tokens}/{n} finish {finish}"
    return out


async def disconnect(http: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    """A stream the client drops after a moment (the server must abort its generation)."""
    body = {"model": cfg.model, "prompt": _prompt(rng), "max_tokens": max(4 * cfg.max_tokens, 512),
            "ignore_eos": True, "stream": True}
    out = Outcome("disconnect", "mid-stream")
    started = time.monotonic()
    async with http.stream("POST", cfg.url + "/v1/completions", json=body) as r:
        out.status = r.status_code

        async def read_until_done() -> None:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    out.variant = "finished-first"  # too fast to drop: nothing to abort
                    return

        try:
            await asyncio.wait_for(read_until_done(), timeout=rng.uniform(0.05, 0.5))
        except asyncio.TimeoutError:
            pass  # leaving the block closes the connection mid-stream
    out.latency = time.monotonic() - started
    out.ok = out.status == 200
    return out


@functools.lru_cache(maxsize=4)
def invalid_bodies(model: str) -> list[tuple[str, str, bytes, dict]]:
    """(variant, path, raw body, headers) of requests the server must refuse with a 4xx."""
    chat = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %%s}' % model
    cmpl = '{"model": "%s", "prompt": "hi", %%s}' % model
    cases = [
        ("bad-json", "/v1/chat/completions", '{"model": "%s", "messages": [' % model),
        ("not-an-object", "/v1/chat/completions", "[1, 2, 3]"),
        ("empty", "/v1/completions", ""),
        ("not-utf8", "/v1/completions", "\udcff"),
        ("missing-messages", "/v1/chat/completions", '{"model": "%s"}' % model),
        ("wrong-model", "/v1/chat/completions", chat.replace(model, "no-such-model") % '"n": 1'),
        ("string-temperature", "/v1/chat/completions", chat % '"temperature": "0.5"'),
        ("nan-temperature", "/v1/completions", cmpl % '"temperature": NaN'),
        ("huge-max-tokens", "/v1/completions", cmpl % ('"max_tokens": ' + "9" * 5000)),
        ("long-logit-bias-key", "/v1/chat/completions", chat % ('"logit_bias": {"%s": 1}' % ("9" * 5000))),
        ("float-n", "/v1/chat/completions", chat % '"n": 1.5'),
        ("negative-token-id", "/v1/completions", '{"model": "%s", "prompt": [1, -2]}' % model),
        ("deep-nesting", "/v1/completions", '{"model": "%s", "prompt": %s}' % (model, "[" * 100_000 + "]" * 100_000)),
        ("over-context", "/v1/completions", '{"model": "%s", "prompt": [%s]}' % (model, ", ".join(["5"] * 200_000))),
        ("top-p-zero", "/v1/chat/completions", chat % '"top_p": 0'),
    ]
    out = [(v, p, b.encode("utf-8", "surrogateescape"), {"content-type": "application/json"}) for v, p, b in cases]
    out.append(("text-plain", "/v1/completions", (cmpl % '"n": 1').encode(), {"content-type": "text/plain"}))
    return out


async def invalid(http: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    variant, path, body, headers = rng.choice(invalid_bodies(cfg.model))
    out = Outcome("invalid", variant)
    started = time.monotonic()
    r = await http.post(cfg.url + path, content=body, headers=headers)
    out.latency, out.status = time.monotonic() - started, r.status_code
    try:
        err = r.json()["error"]
        shaped = set(err) == {"message", "type", "param", "code"} and bool(err["message"])
    except Exception:
        shaped = False
    out.ok = 400 <= r.status_code < 500 and shaped
    out.detail = "" if out.ok else r.text[:200]
    return out


async def oversized(http: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    size = cfg.max_request_bytes + 1 + rng.randint(0, cfg.max_request_bytes)
    chunked = rng.random() < 0.5
    out = Outcome("oversized", "chunked" if chunked else "content-length")
    async def chunks():
        for _ in range(-(-size // 65536)):
            yield b" " * 65536

    content = chunks() if chunked else b" " * size
    started = time.monotonic()
    try:
        r = await http.post(cfg.url + "/v1/completions", content=content, headers={"content-type": "application/json"})
        out.status = r.status_code
        out.ok = r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError as e:  # the server closes once it has answered: a client may see that first
        out.detail = f"{type(e).__name__}"
        out.ok = True
    out.latency = time.monotonic() - started
    return out


async def huge(http: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    """A request as large as the body cap allows (up to 10 MB), far over the context: refused with
    a 400 (or a 413 past the cap), while /health and the other clients go on."""
    variant = rng.choice(["prompt", "messages"])
    if variant == "prompt":
        size = min(10_000_000, cfg.max_request_bytes - 200)
        body = json.dumps({"model": cfg.model, "prompt": "word " * (size // 5)})
        path = "/v1/completions"
    else:
        count = min(100_000, (cfg.max_request_bytes - 200) // 40)
        body = json.dumps({"model": cfg.model, "messages": [{"role": "user", "content": "hi"}] * count})
        path = "/v1/chat/completions"
    out = Outcome("huge", variant)
    started = time.monotonic()
    r = await http.post(cfg.url + path, content=body.encode(), headers={"content-type": "application/json"})
    out.latency, out.status = time.monotonic() - started, r.status_code
    code = r.json().get("error", {}).get("code") if r.headers.get("content-type", "").startswith("application/json") \
        else None
    out.ok = (r.status_code, code) in ((400, "context_length_exceeded"), (413, "request_too_large"))
    out.detail = "" if out.ok else r.text[:200]
    return out


async def probe_health(url: str, stop: asyncio.Event, latencies: list[float]) -> None:
    """/health every 50 ms on its own connection until `stop`."""
    async with httpx.AsyncClient(timeout=60) as http:
        while not stop.is_set():
            started = time.monotonic()
            r = await http.get(url + "/health")
            latencies.append(time.monotonic() - started if r.status_code == 200 else math.inf)
            await asyncio.sleep(0.05)


async def slow(cfg: Config, rng: random.Random) -> Outcome:
    """A client that trickles or stops sending its request: the server must cut it off (408 or
    close) within its header/body timeout, never hold it."""
    variant = rng.choice(["silent-head", "partial-head", "trickle-head", "partial-body"])
    out = Outcome("slow", variant)
    host, port = cfg.url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    drip = None
    try:
        if variant == "partial-head":
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        elif variant == "partial-body":
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"model\": ")
        elif variant == "trickle-head":
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")

            async def trickle() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    writer.write(b"x")
                    await writer.drain()

            drip = asyncio.ensure_future(trickle())
        await writer.drain()
        limit = (cfg.body_timeout if variant == "partial-body" else cfg.header_timeout) + 15
        try:
            data = await asyncio.wait_for(reader.read(), timeout=limit)
        except ConnectionResetError:
            data = b""
        out.latency = time.monotonic() - started
        out.status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
        out.ok = out.status in (408, None)  # a 408, or closed without a word (nothing was sent)
        out.detail = "" if out.ok else data[:200].decode(errors="replace")
    except asyncio.TimeoutError:
        out.detail = "the server held the connection"
    finally:
        if drip is not None:
            drip.cancel()
        writer.close()
    return out


async def adversarial(http: httpx.AsyncClient, cfg: Config, rng: random.Random) -> Outcome:
    bias = {str(i): 100 for i in cfg.continuation_ids}
    return await normal(http, cfg, rng, max_tokens=cfg.adversarial_tokens, logit_bias=bias, kind="adversarial")


# ----------------------------------------------------------------------------- runs


async def run(cfg: Config, kinds: list[str], seed: int, health: list[float] | None = None
              ) -> tuple[list[Outcome], float]:
    """Run `kinds` in order with `cfg.concurrency` request slots (slow clients run beside them);
    with `health`, /health latencies are appended to it meanwhile."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency + 8)
    outcomes: list[Outcome] = []
    side: list[asyncio.Task] = []
    queue = list(reversed(kinds))
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as http:
        handlers = {"normal": normal, "disconnect": disconnect, "invalid": invalid, "oversized": oversized,
                    "huge": huge, "adversarial": adversarial}
        stop = asyncio.Event()
        prober = asyncio.ensure_future(probe_health(cfg.url, stop, health)) if health is not None else None

        async def slot() -> None:
            while queue:
                kind = queue.pop()
                if time.monotonic() > cfg.deadline:  # out of time: reported as failed, not run
                    outcomes.append(Outcome(kind, "not-run", detail="the run's --time-limit passed first"))
                    continue
                job_rng = random.Random(rng.random())
                if kind == "slow":
                    side.append(asyncio.ensure_future(slow(cfg, job_rng)))
                    continue
                try:
                    outcomes.append(await asyncio.wait_for(handlers[kind](http, cfg, job_rng), cfg.request_timeout))
                except asyncio.TimeoutError:  # dropped: the connection closes, the server aborts it
                    outcomes.append(Outcome(kind, "timed-out", latency=cfg.request_timeout,
                                            detail=f"still running after --request-timeout {cfg.request_timeout:g} s"))
                except Exception as e:  # a transport error is a failed request, reported with the rest
                    outcomes.append(Outcome(kind, "error", detail=f"{type(e).__name__}: {e}"[:200]))

        await asyncio.gather(*(slot() for _ in range(cfg.concurrency)))
        outcomes += await asyncio.gather(*side)
        stop.set()
        if prober is not None:
            await prober
    return outcomes, time.monotonic() - started


def mixed_kinds(n: int, rng: random.Random, adversarial: bool) -> list[str]:
    mix = dict(MIX)
    if not adversarial:
        mix["normal"] += mix.pop("adversarial")
    kinds = [k for k, share in mix.items() for _ in range(round(n * share))]
    kinds += ["normal"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds[:n]


def continuation_byte_tokens(tokenizer) -> list[int]:
    """Ids of the single-byte tokens of bytes 0x80-0xBF (a UTF-8 continuation byte alone never
    completes a character), in a byte-level BPE vocabulary."""
    # GPT-2's printable stand-ins for bytes, as byte-level BPE vocabularies spell them.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in, extra = {}, 0
    for b in range(256):
        if b in printable:
            stand_in[b] = chr(b)
        else:
            stand_in[b] = chr(256 + extra)
            extra += 1
    ids = [tokenizer.token_to_id(stand_in[b]) for b in range(0x80, 0xC0)]
    return [i for i in ids if i is not None]


def wait_released(url: str, timeout: float = 120) -> dict[str, float]:
    """The gauges once nothing is in use (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    keys = ("fastlfm_num_requests_running", "fastlfm_num_requests_waiting", "fastlfm_kv_blocks_used",
            "fastlfm_conv_slots_used", "fastlfm_server_requests_in_flight")
    while True:
        m = scrape(url)
        gauges = {k: m.get(k, 0.0) for k in keys}
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


def reliability(cfg: Config, requests: int, clean_requests: int, seed: int = 0,
                max_latency_ratio: float = 2.0, time_limit: float = math.inf) -> dict:
    """Both runs and the checks; returns the report. After `time_limit` seconds no new request
    starts (the rest fail as not run), so the run ends in bounded time whatever the server does."""
    cfg.deadline = time.monotonic() + time_limit
    rng = random.Random(seed)
    asyncio.run(run(cfg, ["normal"] * min(4, cfg.concurrency), seed + 7))  # warm-up
    wait_released(cfg.url)
    before = scrape(cfg.url)
    clean, clean_s = asyncio.run(run(cfg, ["normal"] * clean_requests, seed + 1))
    gauges_clean = wait_released(cfg.url)
    health: list[float] = []
    mixed, mixed_s = asyncio.run(run(cfg, mixed_kinds(requests, rng, bool(cfg.continuation_ids)), seed + 2, health))
    gauges = wait_released(cfg.url)
    server = metrics_delta(before, scrape(cfg.url))

    def latencies(outcomes: list[Outcome]) -> list[float]:
        return [o.latency for o in outcomes if o.kind == "normal" and o.ok]

    clean_p = {q: percentile(latencies(clean), q) for q in (50, 99)}
    mixed_p = {q: percentile(latencies(mixed), q) for q in (50, 99)}
    ratio = mixed_p[99] / clean_p[99] if clean_p[99] > 0 else math.nan
    by_kind: dict[str, dict] = {}
    for kind in KINDS:
        group = [o for o in mixed if o.kind == kind]
        if group:
            by_kind[kind] = {"count": len(group), "ok": sum(o.ok for o in group),
                             "statuses": dict(Counter(str(o.status) for o in group)),
                             "latency_p50_s": percentile([o.latency for o in group if not math.isnan(o.latency)], 50),
                             "latency_p99_s": percentile([o.latency for o in group if not math.isnan(o.latency)], 99),
                             "failures": [asdict(o) for o in group if not o.ok][:5]}
    server_5xx = {k: v for k, v in server.items() if k.startswith("fastlfm_request_errors_total{status=5")}
    aborted = server.get("fastlfm_request_success_total{finished_reason=abort}", 0)
    checks = {
        "every request answered as its kind calls for": all(o.ok for o in clean + mixed),
        "no 5xx seen by clients": not any((o.status or 0) >= 500 for o in clean + mixed),
        "no 5xx counted by the server": not server_5xx,
        "nothing left in use (KV blocks, conv slots, requests)": not any(gauges.values())
                                                                  and not any(gauges_clean.values()),
        "dropped streams aborted in the engine": aborted >= sum(o.kind == "disconnect" and o.variant == "mid-stream"
                                                                for o in mixed),
        f"normal p99 latency within {max_latency_ratio:g}x of the clean run": ratio <= max_latency_ratio,
    }
    return {
        "requests": requests, "clean_requests": clean_requests, "concurrency": cfg.concurrency,
        "max_tokens": cfg.max_tokens, "adversarial_tokens": cfg.adversarial_tokens,
        "adversarial_token_ids": len(cfg.continuation_ids), "clean_s": clean_s, "mixed_s": mixed_s,
        "normal_latency_clean_s": clean_p, "normal_latency_mixed_s": mixed_p, "p99_ratio": ratio,
        "kinds": by_kind, "gauges_after": gauges, "server_metrics": server, "checks": checks,
        "health_ms": {"probes": len(health), "p50": percentile(health, 50) * 1000, "p99": percentile(health, 99) * 1000,
                      "max": max(health, default=math.nan) * 1000},
        "clean_failures": [asdict(o) for o in clean if not o.ok][:5],
    }


def render(report: dict, title: str) -> str:
    def f(x: float, d: int = 2) -> str:
        return "—" if x is None or isinstance(x, float) and math.isnan(x) else f"{x:,.{d}f}"

    lines = [f"### Reliability: {title}", "",
             f"{report['requests']} mixed requests beside {report['clean_requests']} clean ones, "
             f"{report['concurrency']} request slots, normal requests {report['max_tokens']} tokens, adversarial "
             f"{report['adversarial_tokens']} tokens (logit_bias on {report['adversarial_token_ids']} continuation-byte "
             f"tokens); clean run {f(report['clean_s'], 1)} s, mixed run {f(report['mixed_s'], 1)} s.", "",
             "| kind | requests | answered as expected | statuses | latency p50 / p99 s |", "|---|---|---|---|---|"]
    for kind, k in report["kinds"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(k["statuses"].items()))
        lines.append(f"| {kind} | {k['count']} | {k['ok']} | {statuses} | {f(k['latency_p50_s'])} / "
                     f"{f(k['latency_p99_s'])} |")
    c, m = report["normal_latency_clean_s"], report["normal_latency_mixed_s"]
    lines += ["", f"Normal requests' latency p50 / p99: clean {f(c[50])} / {f(c[99])} s, mixed {f(m[50])} / "
                  f"{f(m[99])} s: p99 ratio {f(report['p99_ratio'])}x.",
              f"/health during the mixed run ({report['health_ms']['probes']} probes): p50 "
              f"{f(report['health_ms']['p50'], 1)} ms, p99 {f(report['health_ms']['p99'], 1)} ms, max "
              f"{f(report['health_ms']['max'], 1)} ms (goal: < 100 ms).",
              f"Gauges after: {report['gauges_after']}.", "", "Checks:"]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in report["checks"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder, hub id, or a shape (LFM2-1.2B, ...)")
    p.add_argument("--url", default=None, help="test a running server instead of starting one")
    p.add_argument("--tokenizer", default=None, help="the served model's tokenizer folder (needed with --url)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clean-requests", type=int, default=None, help="default: the mixed run's normal requests")
    p.add_argument("--concurrency", type=int, default=64, help="request slots in both runs")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of a normal request")
    p.add_argument("--adversarial-tokens", type=int, default=1024, help="tokens of an adversarial request")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="the server's body cap (passed to it)")
    p.add_argument("--header-timeout", type=float, default=5.0, help="the server's header timeout (passed to it)")
    p.add_argument("--body-timeout", type=float, default=10.0, help="the server's body timeout (passed to it)")
    p.add_argument("--max-latency-ratio", type=float, default=2.0)
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds before a request still running is dropped and counted as failed")
    p.add_argument("--time-limit", type=float, default=float("inf"),
                   help="seconds for both runs; requests not started by then fail as not run")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--server-args", default="", help="more flags for fastlfm serve, as one string")
    p.add_argument("--checkpoint-dir", default=os.environ.get("FASTLFM_BENCH_CKPT", "/tmp"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=os.environ.get("OUT", "."))
    return p


def main(argv: list[str] | None = None) -> int:
    from fastlfm.loading import resolve_model_dir
    from fastlfm.tokenizer import Tokenizer

    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.url is None):
        build_parser().error("give a MODEL to serve or --url of a running server (one of them)")
    exit_on_sigterm()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    server, folder = None, None
    try:
        if args.url is None:
            folder = prepare_checkpoint(args.model, args.checkpoint_dir)
            flags = ["--max-request-bytes", str(args.max_request_bytes), "--header-timeout", str(args.header_timeout),
                     "--body-timeout", str(args.body_timeout), "--max-num-seqs", str(max(args.concurrency, 8)),
                     *shlex.split(args.server_args)]
            flags += ["--device", args.device] if args.device else []
            flags += ["--dtype", args.dtype] if args.dtype else []
            server = SpawnedServer(folder, free_port(), flags, out_dir / "reliability_server.log", 900)
            url = server.url
        else:
            url = args.url.rstrip("/")
        if args.tokenizer is None and folder is None:
            build_parser().error("--url needs --tokenizer FOLDER (the served model's tokenizer)")
        tokenizer = Tokenizer.from_pretrained(resolve_model_dir(args.tokenizer or folder))
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        cfg = Config(url, model, args.concurrency, args.max_tokens, args.adversarial_tokens, args.max_request_bytes,
                     args.header_timeout, args.body_timeout, continuation_byte_tokens(tokenizer),
                     request_timeout=args.request_timeout)
        if not cfg.continuation_ids:
            print("warning: the tokenizer has no single-byte tokens: no adversarial requests", file=sys.stderr)
        clean = args.clean_requests or round(args.requests * MIX["normal"])
        report = reliability(cfg, args.requests, clean, args.seed, args.max_latency_ratio, args.time_limit)
        if server is not None:
            report["sigterm_exit_s"] = server.stop()
            server = None
        table = render(report, args.model or args.url)
        (out_dir / "reliability.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / "reliability.md").write_text(table + "\n")
        print(table)
        return 0 if all(report["checks"].values()) else 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
