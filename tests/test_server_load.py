"""Load test of ``fastlfm serve`` in its own process (started through the CLI), on 127.0.0.1 only.

240 concurrent streaming requests (chat and completions, random lengths, some with n=2 and
usage), 10% of whose clients hang up mid-stream, interleaved with a stream of malformed
bodies.  Checked: no 5xx, every finished stream well-formed (ids, one finish reason per
choice, token counts within max_tokens, [DONE] last), every malformed body an OpenAI-shaped
4xx, and afterwards no KV block, conv slot or server slot left in use (read from /metrics).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import pytest

from fastlfm.testing import tiny_config, write_checkpoint
from server_helpers import free_port, parse_metrics

MODEL = "tiny-load"
NUM_STREAMS = 240
DISCONNECT_FRACTION = 0.1
MAX_NUM_SEQS = 64  # fewer than the streams: requests also wait in the engine's queue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_checkpoint(tmp_path_factory.mktemp("load_ckpt"), tiny_config())
    port = free_port()
    # The console script's code path: `fastlfm serve MODEL ...`.
    cmd = [sys.executable, "-m", "fastlfm.cli", "serve", str(folder), "--port", str(port), "--served-model-name", MODEL, "--max-num-seqs", str(MAX_NUM_SEQS),
           "--max-model-len", "512", "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"  # the default --host
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{proc.stdout.read()}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log = proc.stdout.read()
    assert "Traceback" not in log, log


def _request(rng: random.Random, i: int) -> tuple[str, dict]:
    chat = rng.random() < 0.6
    body: dict = {"model": MODEL, "stream": True, "max_tokens": rng.randint(1, 48),
                  "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 1000)}
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    if rng.random() < 0.15:
        body["n"] = 2
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "the", "fox", "runs", "café", "42"])
                     for _ in range(rng.randint(1, 40)))
    if chat:
        body["messages"] = [{"role": "user", "content": f"{i}: {words}"}]
        return "/v1/chat/completions", body
    body["prompt"] = f"{i}: {words}"
    return "/v1/completions", body


def _check_stream(lines: list[str], path: str, body: dict) -> None:
    events = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    obj = "chat.completion.chunk" if path.endswith("chat/completions") else "text_completion"
    assert {c["object"] for c in chunks} == {obj}
    assert len({c["id"] for c in chunks}) == 1
    n = body.get("n", 1)
    finish: dict[int, str] = {}
    usage = None
    for c in chunks:
        if c.get("usage"):
            assert c["choices"] == []
            usage = c["usage"]
        for ch in c["choices"]:
            assert 0 <= ch["index"] < n
            if ch["finish_reason"] is not None:
                assert ch["index"] not in finish
                finish[ch["index"]] = ch["finish_reason"]
            text = ch["delta"].get("content") if obj.startswith("chat") else ch["text"]
            assert text is None or isinstance(text, str)
    assert sorted(finish) == list(range(n))
    assert set(finish.values()) <= {"stop", "length"}
    if body.get("stream_options", {}).get("include_usage"):
        assert usage is not None
        assert 1 <= usage["completion_tokens"] <= n * body["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("ignore_eos"):
            assert usage["completion_tokens"] == n * body["max_tokens"]
            assert set(finish.values()) == {"length"}
    else:
        assert usage is None


MALFORMED: list[tuple[str, bytes | dict, dict]] = [
    ("/v1/chat/completions", b'{"model": "tiny-load", "messages": [', {}),
    ("/v1/chat/completions", b"\xff\xfe not utf-8", {}),
    ("/v1/chat/completions", b"", {}),
    ("/v1/chat/completions", b"[]", {}),
    ("/v1/chat/completions", b'{"model": "tiny-load", "messages": "hi"}', {"content-type": "text/plain"}),
    ("/v1/chat/completions", {"model": MODEL}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}], "max_tokens": -3}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 1000}, {}),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, {}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 600}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": float("nan")}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, {}),
    ("/v1/completions", {"model": MODEL, "prompt": {"nested": [[[[[]]]]]}}, {}),
]


async def _load(url: str) -> dict:
    rng = random.Random(1234)
    disconnecting = set(rng.sample(range(NUM_STREAMS), int(NUM_STREAMS * DISCONNECT_FRACTION)))
    results = {"completed": 0, "disconnected": 0, "malformed": 0}
    limits = httpx.Limits(max_connections=NUM_STREAMS + 50, max_keepalive_connections=NUM_STREAMS + 50)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def stream_client(i: int) -> None:
            path, body = _request(rng, i)
            leave = i in disconnecting
            if leave:  # long enough to be mid-generation when the client goes
                body.update(max_tokens=120, ignore_eos=True)
            async with http.stream("POST", path, json=body) as r:
                assert r.status_code == 200, await r.aread()
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if leave and len(lines) >= 4:
                        results["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
            _check_stream(lines, path, body)
            results["completed"] += 1

        async def malformed_client(k: int) -> None:
            await asyncio.sleep(rng.random() * 0.5)  # spread over the streaming load
            path, body, headers = MALFORMED[k % len(MALFORMED)]
            if isinstance(body, bytes):
                r = await http.post(path, content=body, headers={"content-type": "application/json", **headers})
            else:
                r = await http.post(path, content=json.dumps(body),
                                    headers={"content-type": "application/json", **headers})
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            results["malformed"] += 1

        tasks = [stream_client(i) for i in range(NUM_STREAMS)] + [malformed_client(k) for k in range(60)]
        await asyncio.gather(*tasks)
    return results


def test_concurrent_streams_disconnects_and_malformed_bodies(server):
    start = time.monotonic()
    results = asyncio.run(_load(server))
    assert results == {"completed": NUM_STREAMS - len(range(int(NUM_STREAMS * DISCONNECT_FRACTION))),
                       "disconnected": int(NUM_STREAMS * DISCONNECT_FRACTION), "malformed": 60}
    # Everything is released once the engine has processed the aborts.
    deadline = time.monotonic() + 30
    while True:
        m = parse_metrics(httpx.get(server + "/metrics").text)
        idle = m["fastlfm_num_requests_running"] == 0 and m["fastlfm_num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert m["fastlfm_num_requests_running"] == 0 and m["fastlfm_num_requests_waiting"] == 0
    assert m["fastlfm_kv_blocks_used"] == 0, "leaked KV blocks"
    assert m["fastlfm_conv_slots_used"] == 0, "leaked conv slots"
    assert m["fastlfm_server_requests_in_flight"] == 0
    assert m["fastlfm_request_success_total{finished_reason=abort}"] >= results["disconnected"]
    assert not any(k.startswith("fastlfm_request_errors_total{status=5") for k in m), m
    assert m["fastlfm_generation_tokens_total"] > NUM_STREAMS
    print(f"load test: {results} in {time.monotonic() - start:.1f}s")
