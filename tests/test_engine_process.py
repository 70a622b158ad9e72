"""The server's engine in its own process (fastlfm.engine.engine_process): the same streams, tokens,
texts, aborts and counters as the engine on a thread (AsyncLLMEngine, the oracle here, itself tested
against transformers' greedy tokens), over the pipe; start-up errors, shutdown and the death of the
engine process reported, never hung on."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
import torch

from fastlfm.engine import AsyncLLMEngine
from fastlfm.engine.engine_process import EngineProcessClient
from fastlfm.sampling import SamplingParams
from fastlfm.server.app import create_app
from fastlfm.testing import tiny_config, write_checkpoint
from fastlfm.tokenizer import Tokenizer

from server_helpers import openai_client, parse_metrics, running_server

OPTIONS = dict(device="cpu", dtype=torch.float32, max_num_seqs=4, max_model_len=256)
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("engine_process"), tiny_config(vocab_size=65536))


@pytest.fixture(scope="module")
def prompts(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    return [tok.encode(t) for t in ("hello there", "the quick brown fox jumps", "a b c d e f g", "é ü ø ß")]


async def _collect(engine, prompt, params, rid, stop_after=None):
    outs = []
    async for out in engine.generate(prompt, params, rid):
        outs.append(out)
        if stop_after is not None and len(out.token_ids) >= stop_after:
            break
    return outs


def _run_all(engine, prompts, params):
    async def main():
        got = await asyncio.gather(*(_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)))
        early = await _collect(engine, prompts[0], params, "early", stop_after=2)
        for _ in range(200):  # the abort reaches the engine between steps
            if engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.02)
        stats = engine.stats()
        await engine.shutdown()
        return got, early, stats

    return asyncio.run(main())


def test_streams_equal_the_engine_thread(ckpt, prompts):
    """Per request: the same deltas' tokens, the same final token_ids, text and finish reason as the
    in-process engine; an iteration left early aborts its request; the counters come back."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    want, _, _ = _run_all(AsyncLLMEngine.from_pretrained(str(ckpt), **OPTIONS), prompts, params)
    client = EngineProcessClient(str(ckpt), **OPTIONS)
    # Its start-up heap is hidden from later full collections (each walked it all: 0.4 s stalls of
    # the decode loop on the GPU). torch's import alone leaves ~170k tracked objects.
    assert client.frozen_objects > 100_000
    got, early, stats = _run_all(client, prompts, params)
    for outs, ref in zip(got, want):
        final, ref_final = outs[-1], ref[-1]
        assert final.finished and not any(o.finished for o in outs[:-1])
        assert [t for o in outs for t in o.new_token_ids] == ref_final.token_ids == final.token_ids
        assert len(final.token_ids) == 12 and final.finish_reason == ref_final.finish_reason == "length"
        assert final.text == ref_final.text == "".join(o.new_text for o in outs)
        assert [lp.token_id for o in outs for lp in o.logprobs] == final.token_ids
    assert [o.token_ids for o in early] == [got[0][-1].token_ids[:1], got[0][-1].token_ids[:2]]
    assert stats.num_running == 0 and stats.kv_blocks_used == 0 and stats.conv_slots_used == 0
    assert stats.generation_tokens_total >= 4 * 12 + 2


def test_request_errors_come_back_and_the_engine_goes_on(ckpt, prompts):
    async def main():
        engine = EngineProcessClient(str(ckpt), **OPTIONS)
        try:
            with pytest.raises(ValueError, match="max_model_len"):  # refused before it crosses
                await _collect(engine, list(range(10, 300)), GREEDY, "long")
            with pytest.raises(ValueError, match="stop_token_ids"):  # refused by the engine, over there
                await _collect(engine, prompts[0], SamplingParams(max_new_tokens=4, stop_token_ids=[10 ** 9]), "bad")
            with pytest.raises(ValueError, match="already in use"):
                await asyncio.gather(_collect(engine, prompts[0], GREEDY, "same"),
                                     _collect(engine, prompts[1], GREEDY, "same"))
            return await _collect(engine, prompts[1], GREEDY, "after")
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].token_ids) == 12


def test_a_bad_checkpoint_fails_the_start_with_its_own_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json"):
        EngineProcessClient(str(tmp_path), **OPTIONS)


def test_server_over_the_engine_process_and_its_death(ckpt, prompts):
    """Through HTTP: the text of a completion equals the engine thread's; after the engine process is
    killed, open streams end with an error, new requests fail cleanly and /health says 503."""
    want = _run_all(AsyncLLMEngine.from_pretrained(str(ckpt), **OPTIONS), prompts[:1], GREEDY)[0][0][-1].text
    engine = EngineProcessClient(str(ckpt), **OPTIONS)
    app = create_app(engine, "tiny", shutdown_engine=True)
    with running_server(app) as url:
        client = openai_client(url)
        done = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=12, temperature=0.0,
                                         extra_body={"ignore_eos": True})
        assert done.choices[0].text == want
        assert httpx.get(url + "/health").status_code == 200
        stream = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=200, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(Exception):
            for _ in stream:
                pass
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
        scrape = httpx.get(url + "/metrics")  # still served, from the engine's last snapshot
        metrics = parse_metrics(scrape.text)
        assert scrape.status_code == 200
        assert metrics["fastlfm_generation_tokens_total"] >= 12  # the completion above
