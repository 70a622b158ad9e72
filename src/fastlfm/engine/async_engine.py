"""AsyncLLMEngine: the engine loop on a background thread, streams for asyncio consumers.

The step loop runs in one daemon thread that owns the LLMEngine; the event loop only
queues submissions/aborts and receives outputs through `call_soon_threadsafe`, so it
stays responsive while the GPU works.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, AsyncIterator

from .llm_engine import EngineStats, LLMEngine, RequestOutput
from .multimodal import check_image_inputs


# With many streams, handing every token to the event loop costs it one SSE event per request
# per step, and that Python competes with the engine thread for the GIL: on an H200 100 streams
# of LFM2-350M stepped every ~6 ms instead of ~1.6 ms. So above STREAM_EVERY_STEP live streams a
# request's outputs are held and merged until its interval has passed since its last delivery:
# `stream_interval_s`, or longer where the streams would together get more than
# `stream_events_per_s` deliveries a second (each costs the loop ~0.1 ms of Python: the budget
# keeps it to a fraction of the GIL however many streams there are). First tokens, finishes and
# errors always go at once.
STREAM_EVERY_STEP = 8
DEFAULT_STREAM_INTERVAL_S = 0.01
DEFAULT_STREAM_EVENTS_PER_S = 2000.0


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
                 stream_every_step: int = STREAM_EVERY_STEP,
                 stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S):
        if not stream_interval_s >= 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        if not stream_events_per_s > 0:
            raise ValueError(f"stream_events_per_s must be > 0, got {stream_events_per_s}")
        self.engine = engine
        self.stream_interval_s, self.stream_every_step = stream_interval_s, stream_every_step
        self.stream_events_per_s = stream_events_per_s
        # engine thread only: outputs not yet handed out, and when each request last got one
        self._held: dict[str, RequestOutput] = {}
        self._last_sent: dict[str, float] = {}
        self.tokenizer = engine.tokenizer
        self.processor = engine.processor  # LFM2-VL: images -> pixel tensors + expanded prompt
        self.max_model_len = engine.max_model_len
        self.generation_config = engine.generation_config
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._submissions: deque = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fastlfm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, model: str, *, device=None, dtype="auto", max_num_seqs: int = 256,
                        max_model_len: int | None = None, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
                        stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S,
                        **engine_kwargs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_pretrained(model, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                                             max_model_len=max_model_len, **engine_kwargs),
                   stream_interval_s=stream_interval_s, stream_events_per_s=stream_events_per_s)

    # -- public API ---------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params, request_id: str, *,
                       image_inputs: Mapping[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs; stopping the iteration aborts it.
        `image_inputs`: the LFM2-VL processor's tensors for the prompt's `<image>` runs."""
        self._validate(prompt_token_ids, request_id)
        check_image_inputs(self.engine.config, [int(t) for t in prompt_token_ids], image_inputs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, queue)
            self._submissions.append((list(prompt_token_ids), params, request_id, image_inputs))
            self._wake.notify()
        finished = False
        held = None  # an error that arrived behind outputs not yet handed out
        try:
            while True:
                item, held = (held, None) if held is not None else (await queue.get(), None)
                # A consumer that fell behind gets what it missed as one output (one SSE event, not many).
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    later = queue.get_nowait()
                    if isinstance(later, BaseException):
                        held = later
                        break
                    item = item.merged(later)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._request_abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()  # plain counters; a snapshot at most one step old

    async def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    # -- internals ----------------------------------------------------------------------
    def _validate(self, prompt: list[int], request_id: str) -> None:
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, more than max_model_len={self.max_model_len}")
        vocab = self.engine.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})")

    def _request_abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams, holding back (merged) what may wait: see STREAM_EVERY_STEP."""
        now = time.monotonic()
        every_step = len(self._streams) <= self.stream_every_step
        interval = self.stream_interval(len(self._streams))
        send: list[tuple[str, Any]] = []
        for out in outputs:
            rid = out.request_id
            if out.error is not None:
                send.append((rid, out.error))
                continue
            held = self._held.pop(rid, None)
            if held is not None:
                out = held.merged(out)
            if every_step or out.finished or rid not in self._last_sent or now - self._last_sent[rid] >= interval:
                send.append((rid, out))
            else:
                self._held[rid] = out
        # held outputs of requests that had no token this step (preempted, waiting) still go on time
        for rid in [rid for rid in self._held if now - self._last_sent[rid] >= interval]:
            send.append((rid, self._held.pop(rid)))
        self._deliver_all(send)

    def stream_interval(self, num_streams: int) -> float:
        """Seconds a stream's outputs may be held (above `stream_every_step` live streams)."""
        return max(self.stream_interval_s, num_streams / self.stream_events_per_s)

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Hand (request id, output or exception) pairs to their streams: one callback per event
        loop for all of them (a step of 100 requests wakes the loop once, not 100 times)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for request_id, item in items:
            held = self._held.pop(request_id, None)
            if held is not None and not isinstance(item, BaseException):
                item = held.merged(item)
            stream = self._streams.get(request_id)
            if stream is None:
                self._last_sent.pop(request_id, None)
                continue
            if isinstance(item, BaseException) or item.finished:
                self._streams.pop(request_id, None)
                self._last_sent.pop(request_id, None)
            else:
                self._last_sent[request_id] = now
            loop, queue = stream
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not (self._stopping or self._submissions or self._aborts or engine.has_unfinished()):
                    self._wake.wait()
                if self._stopping:
                    break
                submissions, aborts = self._drain(self._submissions), self._drain(self._aborts)
            # Engine state is touched only by this thread; the lock guards the queues alone,
            # so the event loop never waits for a step.
            for prompt, params, rid, images in submissions:
                try:
                    engine.add_request(prompt, params, rid, image_inputs=images)
                except Exception as e:  # bad params: fail this request only
                    self._deliver(rid, e)
            for rid in aborts:
                out = engine.abort(rid)
                if out is not None:
                    self._deliver(rid, out)
                else:
                    self._streams.pop(rid, None)
                    self._held.pop(rid, None)
                    self._last_sent.pop(rid, None)
            try:
                outputs = engine.step() if engine.has_unfinished() else []
            except Exception as e:  # the engine aborted the step's requests: they fail, the loop goes on
                for out in engine.failed_outputs:
                    self._deliver(out.request_id, e)
                continue
            self._deliver_step(outputs)
        for rid in list(engine.requests):
            self._deliver(rid, engine.abort(rid))

    @staticmethod
    def _drain(q: deque) -> list:
        items = list(q)
        q.clear()
        return items


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)
