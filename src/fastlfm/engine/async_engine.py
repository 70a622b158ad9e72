"""AsyncLLMEngine: the engine loop on a background thread, streams for asyncio consumers.

The step loop (EngineLoop) runs in one daemon thread that owns the LLMEngine; the event loop
only queues submissions/aborts and receives outputs through `call_soon_threadsafe`, so it
stays responsive while the GPU works. StreamingFrontend is the asyncio side, shared with the
server's engine process client (engine_process.py), where the loop runs in another process.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, AsyncIterator

from .llm_engine import EngineStats, LLMEngine, RequestOutput, merge_outputs
from .multimodal import check_image_inputs


def freeze_startup_heap() -> int:
    """Collect once, then hide every object alive now from the cyclic collector (gc.freeze); returns
    how many objects are frozen.

    A full (generation 2) collection walks every tracked object. A serving process holds a few
    hundred thousand of them from its imports alone (torch: ~170k), and after torch.compile and the
    CUDA graph captures many more; such a collection stalled the engine's decode steps for 0.42-0.45 s
    twice in one c=100 run on the H200 (bench/host_trace, session 10). Objects made at start-up
    live as long as the process, so leaving them out of every later collection loses nothing.
    For processes fastlfm owns (the server's, its engine's), not a user's."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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


class EngineDeadError(RuntimeError):
    """The engine is gone (its process exited): nothing can run until the server restarts."""


class EngineLoop:
    """The step loop on a daemon thread that owns an LLMEngine. Any thread may submit and abort;
    each step's outputs, merged per the stream interval, go to `sink` as (request id, output or
    exception) pairs, on the loop's thread. Engine state is touched by that thread only; the lock
    guards the queues alone, so no caller ever waits for a step."""

    def __init__(self, engine: LLMEngine, sink: Callable[[list[tuple[str, Any]]], None], *,
                 stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S, stream_every_step: int = STREAM_EVERY_STEP,
                 stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S):
        self.check_options(stream_interval_s, stream_events_per_s)
        self.engine, self.sink = engine, sink
        self.stream_interval_s, self.stream_every_step = stream_interval_s, stream_every_step
        self.stream_events_per_s = stream_events_per_s
        # loop thread only: live requests, outputs not yet handed out (merged once, when they go: a
        # merge per step costs ~5 us a stream, 0.5 ms a step at 100 streams), when each last got one
        self._live: set[str] = set()
        self._held: dict[str, list[RequestOutput]] = {}
        self._last_sent: dict[str, float] = {}
        self._wake = threading.Condition(threading.Lock())
        self._submissions: deque = deque()
        self._aborts: deque[str] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fastlfm-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def check_options(stream_interval_s: float, stream_events_per_s: float) -> None:
        if not stream_interval_s >= 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {stream_interval_s}")
        if not stream_events_per_s > 0:
            raise ValueError(f"stream_events_per_s must be > 0, got {stream_events_per_s}")

    def submit(self, prompt: list[int], params, request_id: str, image_inputs=None) -> None:
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._submissions.append((prompt, params, request_id, image_inputs))
            self._wake.notify()

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def stop(self) -> None:
        """Stop after the current step; requests still running end with finish_reason "abort"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stream_interval(self, num_streams: int) -> float:
        """Seconds a stream's outputs may be held (above `stream_every_step` live streams)."""
        return max(self.stream_interval_s, num_streams / self.stream_events_per_s)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to the sink, holding back (merged) what may wait: see STREAM_EVERY_STEP."""
        now = time.monotonic()
        every_step = len(self._live) <= self.stream_every_step
        interval = self.stream_interval(len(self._live))
        send: list[tuple[str, Any]] = []
        for out in outputs:
            rid = out.request_id
            if out.error is not None:
                send.append((rid, out.error))
                continue
            if every_step or out.finished or rid not in self._last_sent or now - self._last_sent[rid] >= interval:
                send.append((rid, out))  # _deliver puts what was held in front
            else:
                self._held.setdefault(rid, []).append(out)
        # held outputs of requests that had no token this step (preempted, waiting) still go on time
        for rid in [rid for rid in self._held if now - self._last_sent[rid] >= interval]:
            send.append((rid, merge_outputs(self._held.pop(rid))))
        self._deliver(send)

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        now = time.monotonic()
        out = []
        for request_id, item in items:
            held = self._held.pop(request_id, None)
            if held is not None and not isinstance(item, BaseException):
                item = merge_outputs([*held, item])
            if request_id not in self._live:
                self._last_sent.pop(request_id, None)
                continue
            if isinstance(item, BaseException) or item.finished:
                self._live.discard(request_id)
                self._last_sent.pop(request_id, None)
            else:
                self._last_sent[request_id] = now
            out.append((request_id, item))
        if out:
            self.sink(out)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not (self._stopping or self._submissions or self._aborts or engine.has_unfinished()):
                    self._wake.wait()
                if self._stopping:
                    break
                submissions, aborts = _drain(self._submissions), _drain(self._aborts)
            for prompt, params, rid, images in submissions:
                self._live.add(rid)
                try:
                    engine.add_request(prompt, params, rid, image_inputs=images)
                except Exception as e:  # bad params: fail this request only
                    self._deliver([(rid, e)])
            for rid in aborts:
                out = engine.abort(rid)
                if out is not None:
                    self._deliver([(rid, out)])
                else:
                    self._live.discard(rid)
                    self._held.pop(rid, None)
                    self._last_sent.pop(rid, None)
            try:
                outputs = engine.step() if engine.has_unfinished() else []
            except Exception as e:  # the engine aborted the step's requests: they fail, the loop goes on
                self._deliver([(out.request_id, e) for out in engine.failed_outputs])
                continue
            self._deliver_step(outputs)
        self._deliver([(rid, engine.abort(rid)) for rid in list(engine.requests)])


class StreamingFrontend:
    """What the server (or any asyncio code) streams from: `generate()` per request, fed by
    `_dispatch` from an engine loop's thread. Subclasses say where the loop runs (`_submit`,
    `_abort`, `stats`, `shutdown`): in this process (AsyncLLMEngine) or in an engine process
    (fastlfm.engine.engine_process.EngineProcessClient)."""

    tokenizer: Any
    processor: Any
    config: Any
    max_model_len: int
    max_num_seqs: int
    generation_config: dict | None
    error: EngineDeadError | None = None  # set once the engine is gone (it then takes no requests)

    def __init__(self) -> None:
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params, request_id: str, *,
                       image_inputs: Mapping[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs; stopping the iteration aborts it.
        `image_inputs`: the LFM2-VL processor's tensors for the prompt's `<image>` runs."""
        self._validate(prompt_token_ids, request_id)
        check_image_inputs(self.config, [int(t) for t in prompt_token_ids], image_inputs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, queue)
        try:
            self._submit(list(prompt_token_ids), params, request_id, image_inputs)
        except BaseException:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            raise
        finished = False
        held = None  # an error that arrived behind outputs not yet handed out
        try:
            while True:
                item, held = (held, None) if held is not None else (await queue.get(), None)
                # A consumer that fell behind gets what it missed as one output (one SSE event, not many).
                behind = [item]
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    item = queue.get_nowait()
                    if isinstance(item, BaseException):
                        held, item = item, behind[-1]
                        break
                    behind.append(item)
                if len(behind) > 1:
                    item = merge_outputs(behind)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._streams_lock:
                    self._streams.pop(request_id, None)
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    # -- for subclasses -----------------------------------------------------------------
    def _submit(self, prompt: list[int], params, request_id: str, image_inputs) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    def _validate(self, prompt: list[int], request_id: str) -> None:
        if not prompt:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, more than max_model_len={self.max_model_len}")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})")

    def _dispatch(self, items: list[tuple[str, Any]]) -> None:
        """Hand (request id, output or exception) pairs to their streams, from any thread: one
        callback per event loop for all of them (a step of 100 requests wakes the loop once)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._streams_lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if isinstance(item, BaseException) or item.finished:
                    del self._streams[request_id]
                loop, queue = stream
                by_loop.setdefault(loop, []).append((queue, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def _fail_all(self, error: BaseException) -> None:
        """Every open stream ends with `error` (the engine is gone)."""
        with self._streams_lock:
            rids = list(self._streams)
        self._dispatch([(rid, error) for rid in rids])


class AsyncLLMEngine(StreamingFrontend):
    """The engine loop on a thread of this process (EngineLoop), streams for asyncio consumers."""

    def __init__(self, engine: LLMEngine, *, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
                 stream_every_step: int = STREAM_EVERY_STEP,
                 stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S):
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.processor = engine.processor  # LFM2-VL: images -> pixel tensors + expanded prompt
        self.config = engine.config
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.max_num_seqs
        self.generation_config = engine.generation_config
        self.loop = EngineLoop(engine, self._dispatch, stream_interval_s=stream_interval_s,
                               stream_every_step=stream_every_step, stream_events_per_s=stream_events_per_s)

    @classmethod
    def from_pretrained(cls, model: str, *, device=None, dtype="auto", max_num_seqs: int = 256,
                        max_model_len: int | None = None, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
                        stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S,
                        **engine_kwargs) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_pretrained(model, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                                             max_model_len=max_model_len, **engine_kwargs),
                   stream_interval_s=stream_interval_s, stream_events_per_s=stream_events_per_s)

    @property
    def grammars(self):
        return self.engine.grammars

    def stream_interval(self, num_streams: int) -> float:
        return self.loop.stream_interval(num_streams)

    def stats(self) -> EngineStats:
        return self.engine.stats()  # plain counters; a snapshot at most one step old

    async def shutdown(self) -> None:
        self.loop.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.loop.join)

    def _submit(self, prompt, params, request_id, image_inputs) -> None:
        self.loop.submit(prompt, params, request_id, image_inputs)

    def _abort(self, request_id: str) -> None:
        self.loop.abort(request_id)


def _drain(q: deque) -> list:
    items = list(q)
    q.clear()
    return items


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in puts:
        queue.put_nowait(item)
