"""The server's engine in a process of its own (vLLM's engine-core split).

In one process the engine thread shares the GIL with the event loop and the request-preparation
threads: at 100 streams the loop's Python per SSE event, and a big chat body's template (pure
Python, seconds for 100k messages), took the GIL from the engine for most of every step. Here the
engine loop (EngineLoop: scheduling, the forward, sampling, detokenization) runs in a spawned
process, the HTTP side in the server's; they talk over a pipe:

  server -> engine   ("add", (prompt ids, params, request id, image tensors)), ("abort", id), ("stop", None)
  engine -> server   ("ready", EngineInfo) or ("error", exception) once; then ("out", (outputs, stats))
                     per delivery, ("stopped", None) last

Outputs cross as deltas (`_wire`): a RequestOutput shares its sequence's whole token list and text,
which must not be pickled at every token; the client rebuilds `token_ids` / `text` per request.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Any

from ..structured import GrammarCache
from .async_engine import (DEFAULT_STREAM_EVENTS_PER_S, DEFAULT_STREAM_INTERVAL_S, EngineDeadError, EngineLoop,
                           StreamingFrontend, freeze_startup_heap)
from .llm_engine import EngineStats, LLMEngine, load_tokenizer

# Seconds the engine process gets to finish its loop after "stop" (then it is killed).
STOP_TIMEOUT_S = 30.0


@dataclass
class EngineInfo:
    """What the server needs of the engine that lives in the other process."""

    config: Any
    max_model_len: int
    max_num_seqs: int
    generation_config: dict | None
    eos_token_ids: frozenset[int]
    stats: EngineStats
    frozen_objects: int = 0  # objects the engine process hid from later full collections (gc.freeze)


def _send(conn, message: tuple) -> None:
    # plain pickle: torch's multiprocessing reductions would pass tensors as shared-memory handles
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn) -> tuple:
    return pickle.loads(conn.recv_bytes())


def _picklable(error: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _wire(item: Any) -> Any:
    """An output as it crosses the pipe: what this delivery added, not the request's whole history."""
    if isinstance(item, BaseException):
        return _picklable(item)
    return replace(item, all_token_ids=[], text_stream=None,
                   error=None if item.error is None else _picklable(item.error))


def delivery_message(engine: LLMEngine, items: list[tuple[str, Any]]) -> tuple:
    """What the engine process sends for one delivery of (request id, output or exception) pairs:
    their wire deltas and the engine's stats."""
    return ("out", ([(rid, _wire(item)) for rid, item in items], engine.stats()))


def run_engine_process(conn, model: str, engine_kwargs: dict, loop_kwargs: dict) -> None:
    """The engine process's main: build the engine, report ready, then serve the pipe until "stop"
    or until the server's end of it closes (the server died: nobody is left to serve)."""
    # Ctrl-C (and a SIGTERM to the process group) reach us too: the server drains, then stops us; if
    # the server dies instead, its end of the pipe closes and this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = LLMEngine.from_pretrained(model, **engine_kwargs)
    except BaseException as e:  # a bad checkpoint or option: the server reports it and exits
        _send(conn, ("error", _picklable(e)))
        return
    frozen = freeze_startup_heap()  # the model, compiled graphs and captures: no collection walks them again
    _send(conn, ("ready", EngineInfo(engine.config, engine.max_model_len, engine.max_num_seqs,
                                     engine.generation_config, frozenset(engine.eos_token_ids), engine.stats(),
                                     frozen)))
    send_lock = threading.Lock()

    def sink(items: list[tuple[str, Any]]) -> None:  # the loop's thread: stats read between steps
        message = delivery_message(engine, items)
        with send_lock:
            try:
                _send(conn, message)
            except OSError:  # the server is gone
                pass

    loop = EngineLoop(engine, sink, **loop_kwargs)
    try:
        while True:
            kind, payload = _recv(conn)
            if kind == "add":
                try:
                    loop.submit(*payload)
                except RuntimeError as e:
                    sink([(payload[2], e)])
            elif kind == "abort":
                loop.abort(payload)
            elif kind == "stop":
                break
    except (EOFError, OSError):
        pass
    loop.stop()
    loop.join()
    with send_lock:
        try:
            _send(conn, ("stopped", None))
        except OSError:
            pass
    # Nothing is left to save or send: skip the interpreter's teardown (CUDA context, inductor's
    # compile workers), seconds that a server's SIGTERM would otherwise wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class EngineProcessClient(StreamingFrontend):
    """`AsyncLLMEngine`'s interface over an engine in a spawned process (see the module's doc). The
    tokenizer (and LFM2-VL processor) are loaded here too: the server prepares requests with them."""

    def __init__(self, model: str, *, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
                 stream_events_per_s: float = DEFAULT_STREAM_EVENTS_PER_S, **engine_kwargs):
        super().__init__()
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child = ctx.Pipe()
        loop_kwargs = dict(stream_interval_s=stream_interval_s, stream_events_per_s=stream_events_per_s)
        EngineLoop.check_options(stream_interval_s, stream_events_per_s)
        self._process = ctx.Process(target=run_engine_process, args=(child, model, engine_kwargs, loop_kwargs),
                                    name="fastlfm-engine", daemon=True)
        self._process.start()
        child.close()
        try:
            kind, payload = _recv(self._conn)
        except (EOFError, OSError):
            self._process.join()
            raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})"
                               ) from None
        if kind == "error":
            self._process.join()
            raise payload
        info: EngineInfo = payload
        self.config, self.max_model_len, self.max_num_seqs = info.config, info.max_model_len, info.max_num_seqs
        self.generation_config = info.generation_config
        self._stats = info.stats
        self.tokenizer, self.processor = load_tokenizer(model, info.config)
        self._eos_token_ids = info.eos_token_ids
        self.frozen_objects = info.frozen_objects
        self._grammars: GrammarCache | None = None
        # per live request: its token ids so far and its text, rebuilt from the deltas
        self._history: dict[str, tuple[list[int], list[str]]] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        threading.Thread(target=self._send_loop, name="fastlfm-engine-send", daemon=True).start()
        self._reader = threading.Thread(target=self._read_loop, name="fastlfm-engine-recv", daemon=True)
        self._reader.start()

    @property
    def grammars(self) -> GrammarCache:
        """Grammars compiled here to validate constraints (the engine compiles its own)."""
        if self._grammars is None:
            self._grammars = GrammarCache(self.tokenizer, self.config.vocab_size, self._eos_token_ids)
        return self._grammars

    def stats(self) -> EngineStats:
        return self._stats  # sent with every delivery: at most one step old

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        if self._process.is_alive():
            self._outbox.put(("stop", None))
            self._stopped.wait(STOP_TIMEOUT_S)
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._outbox.put(None)

    def _submit(self, prompt, params, request_id, image_inputs) -> None:
        if self.error is not None:
            raise self.error
        tokens = list(prompt)
        self._history[request_id] = (tokens, [])
        self._outbox.put(("add", (tokens, params, request_id, dict(image_inputs) if image_inputs else None)))

    def _abort(self, request_id: str) -> None:
        if self.error is None:
            self._outbox.put(("abort", request_id))

    def _send_loop(self) -> None:  # pickling and writing off the event loop (image tensors can be MBs)
        while (message := self._outbox.get()) is not None:
            try:
                _send(self._conn, message)
            except OSError:
                return

    def _read_loop(self) -> None:
        try:
            while True:
                kind, payload = _recv(self._conn)
                if kind == "stopped":
                    break
                items, self._stats = payload
                self._dispatch([(rid, self._rebuild(rid, item)) for rid, item in items])
        except (EOFError, OSError):
            pass
        finally:
            self._stopped.set()
            self._process.join(1)
            self.error = EngineDeadError(f"the engine process exited (exit code {self._process.exitcode})")
            self._fail_all(self.error)

    def _rebuild(self, request_id: str, item: Any) -> Any:
        """The output with the request's whole token list and text, as the engine's own has them."""
        if isinstance(item, BaseException):
            self._history.pop(request_id, None)
            return item
        tokens, text = self._history.get(request_id) or ([], [])
        tokens[item.num_tokens - len(item.new_token_ids):] = item.new_token_ids  # the prompt is already there
        text.append(item.new_text)
        if item.finished:
            self._history.pop(request_id, None)
        return replace(item, all_token_ids=tokens, text_stream=_Text(text))


class _Text:
    """Stands in for a TextStream on the server's side: the text released so far, joined when read."""

    def __init__(self, parts: list[str]):
        self.parts = parts

    @property
    def text(self) -> str:
        return "".join(self.parts)
