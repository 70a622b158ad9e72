"""Opt-in hooks for `fastlfm serve` (a server spawned by bench/prefix_cache.py, bench/serve.py): where a
request's time to first token goes, and what the host costs when the forward is (nearly) free.

Put this folder on PYTHONPATH (it is a sitecustomize, imported by every Python of that run; it acts only
in the `fastlfm.cli` process, and only when one of these is set):

  FASTLFM_TRACE=FILE     JSON lines per request (joined by request id: the engine may run in its own process): monotonic
                         times `submit` (AsyncLLMEngine.generate called, after preparation), `add` (the
                         engine thread took it), `sched` (first scheduled; `cached`: its computed tokens
                         then, `chunk`: tokens in that step), `tok` (its first token processed), `deliv`
                         (handed to the stream), `n` (prompt tokens); and one line per chat body with
                         `prep0` / `prep1` (JSON, template, tokenizer). bench/host_trace/report.py sums it up.
  FASTLFM_TRACE_STEPS=1 with FASTLFM_TRACE: also one line per engine step (start, host seconds, rows, decode
                         rows, tokens): report.py --steps sums the timeline up.
  FASTLFM_FAKE_FORWARD=1 the model runner's execute is replaced by a sleep of 1.5 ms + tokens / 165k
                         (an H200 on LFM2-1.2B; the GIL is free meanwhile), logits all on token 1000.
  FASTLFM_FAKE_HOST=B,R  with the fake forward: a step that is not pure decode first holds the GIL
                         (Python spin) for B s + R s per prefill row that starts past token 0 (what an
                         eager step's op-by-op dispatch costs; a pure decode step holds it 0.3 ms).
  FASTLFM_ENGINE_KWARGS  JSON defaults for LLMEngine (e.g. the CUDA ones on CPU:
                         '{"max_num_batched_tokens": 16384, "block_size": 64, "async_scheduling": true}').
"""

import os
import sys

_ARGV = " ".join(getattr(sys, "orig_argv", []))
# the server, and its engine process (spawned by multiprocessing, with the server's environment)
_ACTIVE = ("fastlfm.cli" in _ARGV or "spawn_main" in _ARGV and os.environ.get("_FASTLFM_HOST_TRACE")) and any(
    os.environ.get(k) for k in ("FASTLFM_TRACE", "FASTLFM_FAKE_FORWARD", "FASTLFM_ENGINE_KWARGS"))

if _ACTIVE:
    os.environ["_FASTLFM_HOST_TRACE"] = "1"
    import json
    import time

    from fastlfm.engine import async_engine, llm_engine, model_runner, scheduler
    from fastlfm.server import serving

    if os.environ.get("FASTLFM_ENGINE_KWARGS"):
        _defaults = json.loads(os.environ["FASTLFM_ENGINE_KWARGS"])
        _init = llm_engine.LLMEngine.__init__

        def __init__(self, *args, **kwargs):
            for k, v in _defaults.items():
                kwargs.setdefault(k, v)
            _init(self, *args, **kwargs)

        llm_engine.LLMEngine.__init__ = __init__

    if os.environ.get("FASTLFM_FAKE_FORWARD"):
        import torch

        _host = os.environ.get("FASTLFM_FAKE_HOST")
        _base, _per_row = map(float, _host.split(",")) if _host else (0.0, 0.0)

        def execute(self, batch, in_flight=None):
            seqs, counts = batch.seqs, batch.num_tokens
            rows = [i for i, (s, n) in enumerate(zip(seqs, counts)) if s.num_computed_tokens + n == s.num_tokens]
            device = 0.0015 + sum(counts) / 165000
            host = 0.0
            if _host:
                host = 0.0003 if batch.num_decode == len(seqs) else \
                    _base + _per_row * sum(1 for s in seqs[batch.num_decode:] if s.num_computed_tokens > 0)
                end = time.perf_counter() + host
                while time.perf_counter() < end:  # holds the GIL, as op-by-op dispatch does
                    pass
            if device > host:
                time.sleep(device - host)
            logits = torch.zeros(len(rows), self.model.config.vocab_size)
            logits[:, 1000] = 1.0
            return rows, logits, None

        model_runner.ModelRunner.execute = execute
        print("host_trace: fake forward", file=sys.stderr)

    if os.environ.get("FASTLFM_TRACE"):
        # One JSON line per event, each process its own lines (the engine may run in another process):
        # bench/host_trace/report.py joins them by request id. CLOCK_MONOTONIC is shared by processes.
        _out = open(os.environ["FASTLFM_TRACE"], "a", buffering=1)
        _seen: dict[str, set] = {"add": set(), "sched": set(), "tok": set()}

        def _event(kind: str, rid: str, **fields) -> None:
            if rid not in _seen[kind]:
                _seen[kind].add(rid)
                _out.write(json.dumps({"rid": rid, kind: time.monotonic(), **fields}) + "\n")

        _generate = async_engine.StreamingFrontend.generate

        async def generate(self, prompt_token_ids, params, request_id, **kwargs):
            rec = {"rid": request_id, "n": len(prompt_token_ids), "submit": time.monotonic()}
            first = True
            async for out in _generate(self, prompt_token_ids, params, request_id, **kwargs):
                if first:
                    first = False
                    rec["deliv"] = time.monotonic()
                    _out.write(json.dumps(rec) + "\n")
                yield out

        async_engine.StreamingFrontend.generate = generate
        _add = llm_engine.LLMEngine.add_request

        def add_request(self, prompt, params=None, request_id=None, **kwargs):
            _event("add", request_id)
            return _add(self, prompt, params, request_id, **kwargs)

        llm_engine.LLMEngine.add_request = add_request
        _schedule = scheduler.Scheduler.schedule

        _last_batch: list = [None]

        def schedule(self):
            batch = _schedule(self)
            _last_batch[0] = batch
            for seq, n in zip(batch.seqs, batch.num_tokens):
                _event("sched", seq.request_id, cached=seq.num_computed_tokens, chunk=n)
            return batch

        scheduler.Scheduler.schedule = schedule
        _process = llm_engine.LLMEngine._process

        def _process_traced(self, step):
            outputs = _process(self, step)
            for out in outputs:
                _event("tok", out.request_id)
                if out.finished:
                    for kind in _seen:
                        _seen[kind].discard(out.request_id)
            return outputs

        llm_engine.LLMEngine._process = _process_traced
        _prepare = serving.OpenAIServing.prepare_chat_body

        async def prepare_chat_body(self, body):
            t0 = time.monotonic()
            result = await _prepare(self, body)
            _out.write(json.dumps({"prep0": t0, "prep1": time.monotonic()}) + "\n")
            return result

        serving.OpenAIServing.prepare_chat_body = prepare_chat_body
        _prepare_completion = serving.OpenAIServing.prepare_completion_body

        async def prepare_completion_body(self, body):
            t0 = time.monotonic()
            result = await _prepare_completion(self, body)
            _out.write(json.dumps({"prep0": t0, "prep1": time.monotonic(), "kind": "completion"}) + "\n")
            return result

        serving.OpenAIServing.prepare_completion_body = prepare_completion_body
        _step = llm_engine.LLMEngine._step

        _every_step = bool(os.environ.get("FASTLFM_TRACE_STEPS"))

        def _step_traced(self):  # steps whose host part took over 30 ms: what they held
            t0 = time.monotonic()
            _last_batch[0] = None
            outputs = _step(self)
            dt = time.monotonic() - t0
            batch = _last_batch[0]
            if _every_step and batch is not None and not batch.is_empty:
                # one line per step: its rows, decode rows and tokens (a timeline: bench/host_trace/report.py --steps)
                _out.write(json.dumps({"step": t0, "s": dt, "rows": len(batch.seqs), "dec": batch.num_decode,
                                       "ntok": sum(batch.num_tokens)}) + "\n")
            if dt > 0.03:
                _out.write(json.dumps({"slow_step": t0, "s": dt, "running": len(self.scheduler.running)}) + "\n")
            return outputs

        llm_engine.LLMEngine._step = _step_traced
        import gc

        _gc_start = [0.0]

        def _gc_event(phase: str, info: dict) -> None:  # collections of 5 ms or more, in either process
            if phase == "start":
                _gc_start[0] = time.monotonic()
            elif time.monotonic() - _gc_start[0] >= 0.005:
                _out.write(json.dumps({"gc": _gc_start[0], "s": time.monotonic() - _gc_start[0],
                                       "generation": info.get("generation"), "pid": os.getpid()}) + "\n")

        gc.callbacks.append(_gc_event)
        try:  # every Triton JIT compile while serving (each stalls the engine thread)
            from triton.runtime import jit as _jit

            if hasattr(_jit.JITFunction, "_do_compile"):
                _compile = _jit.JITFunction._do_compile

                def _do_compile(self, key, *args, **kwargs):
                    t0 = time.monotonic()
                    try:
                        return _compile(self, key, *args, **kwargs)
                    finally:
                        _out.write(json.dumps({"jit": t0, "s": time.monotonic() - t0,
                                               "kernel": getattr(self, "__name__", "?"), "key": str(key)[:2000]}) + "\n")

                _jit.JITFunction._do_compile = _do_compile
        except ImportError:
            pass
