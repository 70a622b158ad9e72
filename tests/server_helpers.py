"""Shared helpers of the server tests: a fixture checkpoint that can call a tool, and a
real uvicorn server on 127.0.0.1 with a free port.

Tool-calling fixture (``write_tool_calling_checkpoint``)
--------------------------------------------------------
A random-weight model never writes a tool call, so the fixture checkpoint is edited to
contain a deterministic "chain": once the model emits ``<|tool_call_start|>`` (id 10), greedy
*and* sampled decoding continue with the tokens of
``[get_weather(location= "Paris")]``, then ``<|tool_call_end|>`` and the eos ``<|im_end|>``.
Requests start the chain with ``logit_bias={"10": 30}`` (enough to beat the random logits on
the first step, far below the chain's margin afterwards), so the server's real
template -> engine -> detokenizer -> parser path runs end to end.

How: the last ``m`` hidden dimensions form a channel that only the token embeddings write.
Every layer's output projections (attention/conv ``out_proj``, MLP ``w2``) have zero rows
there, so the channel of the final hidden state is exactly the current token's embedding
channel.  Chain token ``j`` has embedding channel ``GAMMA * e_j`` and the untied lm_head row
of its successor reads ``LAMBDA * e_j``: a bigram lookup that dominates the random part of
the logits.  All other tokens have a zero channel, so elsewhere the model is random.  The
chain's tokens are chosen so that each appears once (a bigram has one successor per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlfm.testing import tiny_config, write_checkpoint
from fastlfm.tokenizer import Tokenizer

TOOL_CALL_TEXT = '[get_weather(location= "Paris")]'
TOOL_CALL_START_ID = 10
TOOL_CALL_END_ID = 11
EOS_ID = 7
GAMMA = 4.0
LAMBDA = 8.0


def _unique_segmentation(text: str, pieces: dict[str, int]) -> list[int] | None:
    """Token ids spelling `text` with no id used twice (depth-first, longest piece first)."""

    def search(rest: str, used: frozenset[int]) -> list[int] | None:
        if not rest:
            return []
        for n in range(min(len(rest), 16), 0, -1):
            tid = pieces.get(rest[:n])
            if tid is not None and tid not in used:
                tail = search(rest[n:], used | {tid})
                if tail is not None:
                    return [tid, *tail]
        return None

    return search(text, frozenset())


def write_tool_calling_checkpoint(folder: str | Path, hidden: int = 128) -> dict:
    """Write the chain-edited fixture checkpoint; returns {'chain': ids, 'text': call text}."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    write_checkpoint(folder, tiny_config(hidden=hidden, tie_embedding=False))
    tok = Tokenizer.from_pretrained(folder)
    pieces: dict[str, int] = {}
    for tid in range(tok.vocab_size):
        if tok.backend.get_added_tokens_decoder().get(tid) is None:
            piece = tok.decode([tid])
            if piece and "\ufffd" not in piece:
                pieces.setdefault(piece, tid)
    body = _unique_segmentation(TOOL_CALL_TEXT, pieces)
    assert body is not None, "the fixture tokenizer cannot spell the tool call with distinct tokens"
    assert tok.decode(body) == TOOL_CALL_TEXT
    chain = [TOOL_CALL_START_ID, *body, TOOL_CALL_END_ID, EOS_ID]

    path = folder / "model.safetensors"
    sd = {k: v.clone() for k, v in load_file(path).items()}
    m = len(chain) - 1  # one channel dimension per state that has a successor
    assert m < hidden // 2
    channel = torch.arange(hidden - m, hidden)
    emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    emb[:, channel] = 0
    head[:, channel] = 0
    for j, (cur, nxt) in enumerate(zip(chain[:-1], chain[1:])):
        emb[cur, channel[j]] = GAMMA
        head[nxt, channel[j]] = LAMBDA
    for name, w in sd.items():
        if name.endswith(("out_proj.weight", "feed_forward.w2.weight")):
            w[channel] = 0  # layers never write into the channel
    sd["model.embedding_norm.weight"][channel] = 1.0
    save_file(sd, str(path), metadata={"format": "pt"})
    return {"chain": chain, "text": TOOL_CALL_TEXT}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0, **server_options):
    """Run `app` under a real uvicorn server on 127.0.0.1 (own thread), configured as `fastlfm serve`
    configures it (`fastlfm.server.http.make_server`; `server_options` are its limits); yields the base URL."""
    from fastlfm.server.http import make_server

    port = free_port()
    server_options.setdefault("shutdown_timeout", 5)
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning", **server_options)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@dataclass
class SpawnedServer:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def spawned_server(folder, *flags: str, log_path: Path, timeout: float = 120.0,
                   preexec_fn=None):
    """`fastlfm serve FOLDER` in its own process (the console script's code path) on 127.0.0.1, CPU, fp32,
    output to `log_path`; yields a SpawnedServer once /health answers. On exit: SIGTERM, then kill."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "fastlfm.cli", "serve", str(folder), "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning", *flags]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{Path(log_path).read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield SpawnedServer(url, port, proc, Path(log_path))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()


@contextlib.contextmanager
def cpu_engine(folder, **engine_kwargs):
    """An AsyncLLMEngine over the checkpoint `folder`, on CPU in fp32; shut down on exit."""
    from fastlfm.engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_pretrained(str(folder), device="cpu", dtype=torch.float32, **engine_kwargs)
    try:
        yield engine
    finally:
        asyncio.run(engine.shutdown())


def openai_client(base_url: str, api_key: str = "unused", **kwargs):
    """The official client against a test server (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, **kwargs)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (and {'name': value} for unlabelled samples)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
