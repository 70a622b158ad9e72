"""The HTTP layer under the app: uvicorn, configured against slow and hostile clients.

What uvicorn provides is used as is:
- ``timeout_keep_alive``: an idle connection between two requests is closed after this long;
- ``timeout_graceful_shutdown``: on SIGTERM uvicorn stops accepting, closes idle connections,
  waits for running requests at most this long, then cancels them (their engine requests are
  aborted by the handlers' cleanup) and runs the app's shutdown (the engine's);
- h11's limit on an incomplete request head (16 KiB): larger heads get a 400.

What it does not provide is added by `GuardedH11Protocol`, a subclass of its h11 protocol
(the timeouts are h11-protocol code: the server always uses it, httptools or not):
- **Header and body read timeouts.** uvicorn arms no timer while a request head or body is
  arriving, so a client that connects and sends nothing, or trickles, held its connection
  (and a task) for ever. Here the whole head must arrive within ``header_timeout`` seconds of
  the connection (or of its first byte, on a kept-alive connection) and the whole body within
  ``body_timeout`` seconds of the head; otherwise the client gets a 408 and is disconnected.
  The deadlines are totals, not per read, so a byte every few seconds does not extend them.
- **A connection cap with clean refusals.** uvicorn's ``limit_concurrency`` answers a plain
  503 that the app never sees (so it is not counted in /metrics) and refuses health probes
  with the rest. Here a connection beyond ``max_connections`` is flagged in its ASGI scope
  (``scope["state"][OVER_CAPACITY]``) and the app answers it a 503 in the OpenAI schema,
  except /health and /metrics; beyond a further reserve, connections are closed at accept.
- **File descriptors.** At start-up the soft descriptor limit is raised to the hard one and
  the connection cap (and accept backlog) shrunk to what it leaves, so connections cannot
  exhaust descriptors; if they are exhausted anyway, asyncio's selector loop logs every failed
  accept() with a traceback, up to ``backlog`` times per loop iteration (330k lines in 35 s
  were seen): the server's loop exception handler logs one line per 10 s instead.
- **Quiet logs.** Messages any client can trigger at will (a malformed request head) are
  logged at most once per 10 s.
- **Lingering close.** A response sent before the request body was read (413, 408, 401...)
  closes a socket with unread bytes, which resets the connection and can destroy the response
  before the client reads it. The write side is shut first and what the client still sends is
  read and dropped for up to `LINGER_SECONDS` (what nginx's ``lingering_close`` does).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("fastlfm.server")

#: Key in an ASGI scope's "state": set (to the cap) on connections beyond max_connections.
OVER_CAPACITY = "fastlfm_over_capacity"

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
LINGER_SECONDS = 2.0
_SHUTDOWN_BACKSTOP = 5.0  # after the drain timeout, seconds for aborted requests to end before uvicorn cancels them
_FD_RESERVE = 64  # descriptors kept for everything but client connections (files, logs, image fetches)


class _RateLimitedLog:
    """At most one log line per `period` seconds for a repeated event, with its count."""

    def __init__(self, period: float = 10.0):
        self.period = period
        self._last = -float("inf")
        self._count = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.period:
            logger.log(level, message + " (%d times since the last such message)", *args, self._count)
            self._last, self._count = now, 0


class _QuietRepeats(logging.Filter):
    """Lets a message that clients can trigger at will (uvicorn's "Invalid HTTP request received."
    for each malformed request head) through at most once per `period` seconds."""

    MESSAGES = ("Invalid HTTP request received.",)

    def __init__(self, period: float = 10.0):
        super().__init__()
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in self.MESSAGES:
            return True
        now = time.monotonic()
        if now - self._last.get(message, -float("inf")) < self.period:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return False
        self._last[message] = now
        suppressed = self._suppressed.pop(message, 0)
        if suppressed:
            record.msg, record.args = f"{message} ({suppressed} more since the last such message)", ()
        return True


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close()` lingers while the client is
    still sending a request that will not be read (see the module docstring)."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedH11Protocol"):
        self._transport = transport
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if not self._protocol.client_still_sending() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # the response is sent, then FIN; the client can read it all
        self._transport.resume_reading()  # and what it still sends is dropped (data_received)
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header/body timeouts, a connection cap and lingering close.
    `make_server` makes a subclass with the limits filled in."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    hard_connection_limit: int = DEFAULT_MAX_CONNECTIONS + 64
    on_error: Callable[[int], None] = staticmethod(lambda status: None)
    _refusal_log = _RateLimitedLog()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head" or "body": what the running read deadline is for
        self._fresh = True  # no request head received yet on this connection
        wrapped = _LingeringTransport(transport, self)
        super().connection_made(wrapped)  # type: ignore[arg-type]
        open_now = len(self.connections)
        if open_now > self.hard_connection_limit:
            self._refusal_log(logging.WARNING, "closing new connections at accept: %d open, beyond the limit of %d "
                              "plus its reserve for health probes", open_now, self.max_connections)
            transport.close()
            return
        if open_now > self.max_connections:
            self._refusal_log(logging.WARNING, "refusing requests on new connections with 503: %d open, limit %d",
                              open_now, self.max_connections)
            self.app_state = {**self.app_state, OVER_CAPACITY: self.max_connections}
        self._update_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_read_deadline(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # lingering after an early response: drop what arrives
            return
        super().data_received(data)
        if self._fresh and self.conn.their_state is not h11.IDLE:
            self._fresh = False
        self._update_read_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_read_deadline()

    def send_400_response(self, msg: str) -> None:  # a malformed request head (uvicorn answers it)
        self.on_error(400)
        super().send_400_response(msg)

    # -- read deadlines ------------------------------------------------------------------
    def client_still_sending(self) -> bool:
        """Whether the client is in the middle of sending a request we have not read in full."""
        their = self.conn.their_state
        return their is h11.SEND_BODY or (their is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _update_read_deadline(self) -> None:
        if self.transport.is_closing():
            phase = None
        elif self.conn.their_state is h11.SEND_BODY:
            phase = "body"
        elif self.conn.their_state is h11.IDLE and (self._fresh or self._phase == "head"
                                                     or self.conn.trailing_data[0]):
            # A head is due: on a new connection, or once a following request has begun (between
            # requests, silence is uvicorn's keep-alive timeout's business).
            phase = "head"
        else:
            phase = None
        self._set_read_deadline(phase)

    def _set_read_deadline(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # a running deadline keeps its start: it bounds the total time
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        self._phase = phase
        if phase is not None:
            timeout = self.header_timeout if phase == "head" else self.body_timeout
            self._read_timer = self.loop.call_later(timeout, self._read_timed_out)

    def end_request(self) -> None:
        """Disconnect a request whose body is still arriving (its handler gets http.disconnect)."""
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _read_timed_out(self) -> None:
        phase, self._read_timer, self._phase = self._phase, None, None
        if self.transport.is_closing():
            return
        cycle = self.cycle if phase == "body" else None
        began = phase == "body" or bool(self.conn.trailing_data[0])
        if cycle is not None:
            cycle.disconnected = True  # the handler waiting for the body gets http.disconnect
            cycle.message_event.set()
        if began and (cycle is None or not cycle.response_started):
            timeout = self.body_timeout if phase == "body" else self.header_timeout
            what = "body" if phase == "body" else "headers"
            self.transport.write(_raw_error(408, f"The request {what} did not arrive within {timeout:g} s"))
            self.on_error(408)
        self.transport.close()


def _raw_error(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the OpenAI error schema, for the protocol layer."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout" if status == 408 else None}}).encode()
    reason = {408: b"Request Timeout"}.get(status, b"Error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body)) + body)


# ----------------------------------------------------------------------------- file descriptors


def fit_connections_to_descriptors(max_connections: int) -> tuple[int, int, int]:
    """Raise the soft descriptor limit to the hard one and fit the connections in it.

    Returns (max_connections, hard_connection_limit, backlog): the cap (lowered, with a
    warning, when descriptors are short), the cap plus a reserve in which health probes are
    still served, and the accept backlog (asyncio accepts up to that many connections per loop
    iteration before any is refused, so it comes out of the same budget)."""
    reserve = max(16, max_connections // 16)
    backlog = 2048
    try:
        import resource
    except ImportError:  # not a Unix: nothing to fit
        return max_connections, max_connections + reserve, backlog
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    budget = soft - in_use - _FD_RESERVE
    if max_connections + reserve + backlog > budget:
        backlog = max(8, min(backlog, budget // 4))
        reserve = max(4, min(reserve, budget // 16))
        fitted = min(max_connections, budget - reserve - backlog)
        if fitted < 1:
            raise ValueError(f"the file-descriptor limit ({soft}, {in_use} in use) leaves no room for client "
                             "connections; raise it (ulimit -n)")
        if fitted < max_connections:
            logger.warning("max connections lowered from %d to %d to fit the file-descriptor limit of %d "
                           "(ulimit -n)", max_connections, fitted, soft)
        max_connections = fitted
    return max_connections, max_connections + reserve, backlog


class _QuietAcceptErrors:
    """Loop exception handler: failed accept()s (descriptors or memory exhausted) are logged
    one line per 10 s instead of one traceback each; anything else goes to the previous handler."""

    _ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self, previous):
        self.previous = previous
        self.log = _RateLimitedLog()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in self._ERRNOS and "accept" in context.get("message", ""):
            self.log(logging.ERROR, "cannot accept connections: %s; retrying", os.strerror(exc.errno))
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class FastLFMServer(uvicorn.Server):
    """uvicorn's server with the quiet accept-error handler on its loop, and a shutdown that
    ends what is still running after `drain_timeout` seconds itself: the app's engine requests
    are aborted (streams end with finish_reason "abort" and [DONE], responses return what they
    have) and requests whose body is still arriving are disconnected. uvicorn's own deadline,
    a few seconds later, cancels whatever is left (logging a traceback for each)."""

    drain_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    interrupted = False  # a SIGINT (Ctrl-C) started the shutdown

    def handle_exit(self, sig, frame) -> None:
        # Noted here because uvicorn's way of reporting it (raising the signal again once it has shut
        # down, for the handler it replaced) did not always reach the caller as KeyboardInterrupt:
        # `fastlfm serve` then exited 0 after a Ctrl-C, now and then.
        if sig == signal.SIGINT:
            self.interrupted = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_QuietAcceptErrors(loop.get_exception_handler()))
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self._end_in_flight)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            timer.cancel()

    def _end_in_flight(self) -> None:
        serving = getattr(getattr(self.config.app, "state", None), "serving", None)
        if not self.server_state.tasks:
            return
        logger.warning("shutdown: %d requests still running after %g s; aborting them", len(self.server_state.tasks),
                       self.drain_timeout)
        if serving is not None:
            self._aborting = asyncio.ensure_future(serving.abort_all())  # referenced: a task may be collected
        for connection in list(self.server_state.connections):
            if isinstance(connection, GuardedH11Protocol) and connection.client_still_sending():
                connection.end_request()


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                max_connections: int = DEFAULT_MAX_CONNECTIONS, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
                keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT) -> uvicorn.Server:
    """A uvicorn server for `app` with the limits above (``server.run()`` serves until SIGTERM)."""
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout),
                        ("shutdown_timeout", shutdown_timeout), ("keep_alive_timeout", keep_alive_timeout),
                        ("max_connections", max_connections)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    max_connections, hard_limit, backlog = fit_connections_to_descriptors(int(max_connections))
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    protocol = type("FastLFMH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(header_timeout), "body_timeout": float(body_timeout),
        "max_connections": max_connections, "hard_connection_limit": hard_limit,
        "on_error": staticmethod(metrics.error if metrics is not None else (lambda status: None)),
        "_refusal_log": _RateLimitedLog(),
    })
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, backlog=backlog,
                            timeout_keep_alive=keep_alive_timeout,
                            timeout_graceful_shutdown=shutdown_timeout + _SHUTDOWN_BACKSTOP)
    if not any(isinstance(f, _QuietRepeats) for f in logging.getLogger("uvicorn.error").filters):
        logging.getLogger("uvicorn.error").addFilter(_QuietRepeats())
    server = FastLFMServer(config)
    server.drain_timeout = float(shutdown_timeout)
    return server
