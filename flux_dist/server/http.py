"""Rank 0's HTTP transport: the FastAPI app (``app.py``) under uvicorn, in a thread of its own.

The event loop never touches the model or a collective: a handler checks a request, puts a ``Job``
on the bounded queue (full -> 429) and awaits its future; the serving loop on the main thread takes
jobs one at a time and broadcasts them to every rank. Signals stay with ``StopSignal`` (uvicorn's
handlers are never installed).

Bounds on a connection (``ServeOptions.read_timeout_s`` = T, ``max_connections`` = C):

- the request head must be complete within T of the connection opening or of the previous response
  (nothing sent, partial headers, an idle keep-alive connection: closed after T);
- the body must be complete within T of the head (else 408, closed) and at most ``max_body_bytes``
  (else 413, closed);
- more than C open connections: 503 with ``Retry-After``; more than 2C: closed at accept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Generator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import RequestValidator, create_app
from .jobs import JobQueue
from .metrics import Metrics
from .schema import ServeOptions, error_body

log = logging.getLogger("flux_dist")

__all__ = ["FrontEnd", "ServeOptions"]


def _protocol(read_timeout_s: float, hard_cap: int, metrics: Metrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a read deadline for the request head and a hard connection cap."""

    class BoundedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def, override]
            super().connection_made(transport)
            if len(self.connections) > hard_cap:
                transport.close()  # far over the cap: no reply, do not even read
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(read_timeout_s, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # no new request head within the deadline
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

        def send_400_response(self, msg: str) -> None:  # unparseable HTTP: our error shape, counted
            body = json.dumps(error_body(400, f"malformed HTTP request: {msg}")).encode()
            metrics.response(400)
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
            self.transport.write(head + body)
            self.transport.close()

    return BoundedH11


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM / SIGINT belong to the serving loop's StopSignal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn spells it so
        pass


def _share_log_handlers() -> None:
    """uvicorn's warnings and errors (malformed HTTP, a handler bug) through flux-dist's "[rank0]" handler."""
    ours, theirs = logging.getLogger("flux_dist"), logging.getLogger("uvicorn")
    if ours.handlers and not theirs.handlers:
        for h in ours.handlers:
            theirs.addHandler(h)
        theirs.setLevel(logging.WARNING)
        theirs.propagate = False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class FrontEnd:
    """The listening socket, the job queue, the app and its uvicorn server (rank 0 only)."""

    def __init__(self, opts: ServeOptions, validator: RequestValidator, jobs: JobQueue | None = None) -> None:
        self.opts = opts
        self.jobs = jobs or JobQueue(opts.max_queue)
        self.app = create_app(opts, validator, self.jobs)
        self.metrics: Metrics = self.app.state.metrics
        self.sock = _listen(opts.host, opts.port)  # OSError here: the caller says "cannot listen"
        config = uvicorn.Config(
            self.app, http=_protocol(opts.read_timeout_s, 2 * opts.max_connections, self.metrics), lifespan="off",
            log_config=None, access_log=False, server_header=False, timeout_keep_alive=opts.read_timeout_s,  # type: ignore[arg-type]
            timeout_graceful_shutdown=5)
        self.server = _Server(config)
        _share_log_handlers()
        self.app.state.connections = lambda: len(self.server.server_state.connections)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="flux-dist-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")

    def mark_ready(self) -> None:
        self.jobs.mark_ready()

    def mark_down(self, reason: str) -> None:
        self.jobs.mark_down(reason)

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.sock.close()
