"""The app's outermost ASGI middleware: what every request passes before any route."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .edits import EDITS
from .metrics import Metrics
from .schema import APIError, ServeOptions, error_body


async def _send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """An error straight from ASGI middleware (before the app): same body as everywhere."""
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class FrontDoor:
    """Outermost middleware: counts every response by code, caps connections, checks the API key, and
    bounds the request body (``max_body_bytes``; all of it within ``read_timeout_s`` of the request head)."""

    def __init__(self, app: ASGIApp, *, opts: ServeOptions, metrics: Metrics,
                 connections: Callable[[], int] | None = None) -> None:
        self.app, self.opts, self.metrics = app, opts, metrics
        self.connections = connections

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics

        async def counted(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                metrics.response(msg["status"])
            await send(msg)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        has_body = (length not in (None, "0")) or "chunked" in headers.get("transfer-encoding", "").lower()
        close = {"Connection": "close"} if has_body else {}  # the body stays unread: do not reuse the connection
        open_now = self.connections() if self.connections is not None else 0
        if open_now > self.opts.max_connections:
            await _send_error(counted, 503, f"too many open connections ({open_now}, limit "
                              f"{self.opts.max_connections}); retry later", {"Retry-After": "1", "Connection": "close"})
            return
        key = self.opts.api_key
        if key:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                await _send_error(counted, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                  {"WWW-Authenticate": "Bearer", **close})
                return
        limit = self.opts.max_upload_bytes if scope.get("path") == EDITS else self.opts.max_body_bytes
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n > limit:
                await _send_error(counted, 413, f"body of {n} bytes is over the limit of {limit}", close)
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.read_timeout_s
        state = {"received": 0, "done": not has_body}

        async def bounded() -> Message:
            if state["done"]:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(0.001, deadline - loop.time()))
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.opts.read_timeout_s:g} s",
                               headers={"Connection": "close"}) from None
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > limit:
                    raise APIError(413, f"body is over the limit of {limit} bytes", headers={"Connection": "close"})
                state["done"] = not msg.get("more_body", False)
            else:
                state["done"] = True
            return msg

        await self.app(scope, bounded, counted)
