"""Bounded requests and connections, for real: 2 ranks under torchrun on the tiny preset, a 4 s deadline,
a 1 s read timeout, a small work limit. Long requests are 64x64 with 1000 steps (about 10 s here if they ran)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import Server, call, decode_png, read_png, server_with_cli_image

GEN = "/v1/images/generations"
PROMPT = "a red fox standing in fresh snow at dawn"
GOOD = {"prompt": PROMPT, "size": "64x64", "num_inference_steps": 2, "seed": 7}
LONG = {"prompt": "a slow one", "size": "64x64", "num_inference_steps": 1000, "seed": 1}
DEADLINE_S, READ_S, MAX_WORK, MAX_CONN = 4.0, 1.0, 64 * 64 * 1000, 48
ERROR_KEYS = {"message", "type", "param", "code"}


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    code, _, body = call(port, "GET", "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def responses(m: dict, code: int) -> float:
    return m.get(("flux_dist_http_responses_total", (("code", str(code)),)), 0.0)


def stopped(m: dict, reason: str) -> float:
    return m[("flux_dist_requests_stopped_total", (("reason", reason),))]


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh socket, read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def threads(pid: int) -> int:
    return int(next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith("Threads:")))


def rss_mb(pid: int) -> float:
    return int(next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith("VmRSS:"))) / 1024


def full_log(s: Server) -> str:
    return s.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    flags = ["--request-timeout", str(DEADLINE_S), "--read-timeout", str(READ_S), "--max-work", str(MAX_WORK),
             "--max-connections", str(MAX_CONN)]
    with server_with_cli_image(tmp_path_factory.mktemp("bounded"), flags, PROMPT, 7) as s:
        yield s


def test_errors_have_openai_shape_and_metrics_count_every_reply(bounded):
    port = bounded.port
    before = metrics(port)
    cases = [  # (method, path, body, headers, code, words in the message)
        ("POST", GEN, {**GOOD, "n": 4, "num_inference_steps": 1000}, None, 400, "work limit of 4096000"),
        ("POST", GEN, b"{nope", None, 400, "not valid JSON"),
        ("POST", GEN, {**GOOD, "prompt": "\ud800"}, None, 400, "lone surrogate"),
        ("POST", GEN, {**GOOD, "size": " 64 x 64 "}, None, 400, "no spaces"),
        ("POST", GEN, json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415, "application/json"),
        ("GET", "/nope", None, None, 404, "no route GET /nope"),
        ("GET", GEN, None, None, 405, "not allowed"),
        ("DELETE", "/health", None, None, 405, "not allowed"),
    ]
    for method, path, body, headers, code, words in cases:
        got, h, raw_body = call(port, method, path, body, headers=headers)
        assert got == code, (method, path, raw_body)
        assert h["Content-Type"] == "application/json"
        err = json.loads(raw_body)["error"]
        assert set(err) == ERROR_KEYS and words in err["message"], err
        assert err["type"] == "invalid_request_error"
    err = json.loads(call(port, "POST", GEN, {**GOOD, "size": "6x6"})[2])["error"]
    assert err["param"] is None and "multiple of 16" in err["message"]
    assert json.loads(call(port, "POST", GEN, {**GOOD, "n": 9})[2])["error"]["param"] == "n"
    # Over the body limit (from Content-Length, before reading) and unparseable HTTP: the same shape, then closed.
    big = raw(port, b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413") and set(json.loads(big.split(b"\r\n\r\n", 1)[1])["error"]) == ERROR_KEYS
    junk = raw(port, b"NOT HTTP AT ALL\r\n\r\n")
    assert junk.startswith(b"HTTP/1.1 400") and set(json.loads(junk.split(b"\r\n\r\n", 1)[1])["error"]) == ERROR_KEYS
    assert call(port, "POST", GEN, GOOD)[0] == 200
    after = metrics(port)
    want = {400: 7, 415: 1, 404: 1, 405: 2, 413: 1, 200: 2}  # 200: the good request and the first /metrics
    for code, n in want.items():
        assert responses(after, code) - responses(before, code) == n, (code, after)
    assert after[("flux_dist_requests_total", ())] - before[("flux_dist_requests_total", ())] == 8
    lat = "flux_dist_request_latency_seconds_count"
    assert after[(lat, ())] - before[(lat, ())] == 1


def test_stalled_clients_are_closed_and_hold_no_threads(bounded):
    port, pid = bounded.port, bounded.rank_pid(0)
    base = threads(pid)
    socks: list[socket.socket] = []
    head = b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3 == 1:
            s.sendall(head)  # partial headers
        elif i % 3 == 2:
            s.sendall(head + b"Content-Length: 100\r\n\r\n{\"prompt\"")  # a short body
        socks.append(s)  # i % 3 == 0: nothing at all
    t0 = time.monotonic()
    code, _, _ = call(port, "GET", "/health")  # served meanwhile
    assert code == 200
    assert threads(pid) <= base + 2  # no thread per connection
    replies = []
    for s in socks:
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except OSError:
            pass
        replies.append(out)
        s.close()
    waited = time.monotonic() - t0
    assert waited < READ_S + 3, waited
    for i, out in enumerate(replies):
        if i % 3 == 2:
            assert out.startswith(b"HTTP/1.1 408"), out  # the body did not come: answered, then closed
        else:
            assert out == b"", out  # no complete request head: closed without a word
    time.sleep(0.5)
    m = metrics(port)
    assert m[("flux_dist_http_connections", ())] <= 2  # the metrics request itself (and its keep-alive)
    assert threads(pid) <= base + 2
    assert "Traceback" not in full_log(bounded)


def test_connection_cap_answers_503_then_recovers(bounded):
    port = bounded.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONN + 2)]
    try:
        time.sleep(0.2)
        code, h, body = call(port, "GET", "/health")
        assert code == 503 and h["Retry-After"] == "1", body
        err = json.loads(body)["error"]
        assert set(err) == ERROR_KEYS and "too many open connections" in err["message"]
        far = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONN)]
        try:  # beyond twice the cap: closed at accept, before a byte is read
            far[-1].settimeout(5)
            assert far[-1].recv(100) == b""
        finally:
            for s in far:
                s.close()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert call(port, "GET", "/health")[0] == 200


def test_deadline_stops_a_long_request_and_the_ranks_stay_in_step(bounded):
    before = metrics(bounded.port)
    t0 = time.monotonic()
    code, _, body = call(bounded.port, "POST", GEN, LONG)
    took = time.monotonic() - t0
    assert code == 504, body
    err = json.loads(body)["error"]
    assert "stopped before denoise step" in err["message"] and err["code"] == "deadline_exceeded"
    assert DEADLINE_S <= took < DEADLINE_S + 3, took
    after = metrics(bounded.port)
    assert stopped(after, "deadline") - stopped(before, "deadline") == 1
    assert responses(after, 504) - responses(before, 504) == 1
    code, _, body = call(bounded.port, "POST", GEN, GOOD)  # the ranks are still in step: the CLI's image
    assert code == 200, body
    img = decode_png(json.loads(body)["data"][0]["b64_json"])
    assert np.abs(img - read_png(bounded.cli_png)).max() <= 1


def test_a_client_that_leaves_cancels_its_request(bounded):
    before = metrics(bounded.port)
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", bounded.port), timeout=10) as s:
        s.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(1.0)  # running by now
    t0 = time.monotonic()
    code, _, out = call(bounded.port, "POST", GEN, GOOD)  # starts once the long one stopped at its next step
    took = time.monotonic() - t0
    assert code == 200, out
    assert took < DEADLINE_S - 1.5, took  # well before the long one's deadline would have stopped it
    after = metrics(bounded.port)
    assert stopped(after, "cancelled") - stopped(before, "cancelled") == 1
    assert stopped(after, "deadline") == stopped(before, "deadline")
    assert responses(after, 499) - responses(before, 499) == 1
    log = full_log(bounded)
    assert "cancelled" in log and "stopped before denoise step" in log
    assert "Traceback" not in log and "BrokenPipe" not in log


def test_mixed_load_every_request_answered_or_its_client_gone(bounded):
    """300 requests, 6 at a time: good, bad, over the work limit, oversized, slow (no head, short body) and
    disconnecting clients. Every client that waits gets its answer; /metrics counts exactly the replies;
    every rank's memory is flat after the first 60 (warm-up)."""
    port = bounded.port
    head = b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    long_body = json.dumps(LONG).encode()
    kinds = ["good", "bad_json", "work", "size", "oversized", "short_body", "no_head", "leaves"]

    def one(i: int) -> tuple[str, int | bytes | None]:
        kind = "good" if i % 6 == 0 else kinds[1 + i % (len(kinds) - 1)]
        if kind == "good":
            return kind, call(port, "POST", GEN, {**GOOD, "seed": 1000 + i})[0]
        if kind in ("bad_json", "work", "size"):
            body = {"bad_json": b"{", "work": {**GOOD, "n": 2, "num_inference_steps": 1000},
                    "size": {**GOOD, "size": "\uff16\uff14x64"}}[kind]
            return kind, call(port, "POST", GEN, body)[0]
        if kind == "oversized":
            return kind, raw(port, head + b"Content-Length: 5000000\r\n\r\n")[:12]  # refused before the body
        if kind in ("short_body", "no_head"):
            data = head + b"Content-Length: 50\r\n\r\n{" if kind == "short_body" else b""
            return kind, raw(port, data)[:12]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # leaves
            s.sendall(head + b"Content-Length: " + str(len(long_body)).encode() + b"\r\n\r\n" + long_body)
            time.sleep(0.5)
        return kind, None

    before = metrics(port)
    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as ex:
        out = list(ex.map(one, range(60)))
        warm = [rss_mb(bounded.rank_pid(r)) for r in range(2)]
        out += list(ex.map(one, range(60, 300)))
    took = time.monotonic() - t0
    grown = [rss_mb(bounded.rank_pid(r)) - w for r, w in enumerate(warm)]
    assert max(grown) < 40, f"rank memory grew by {grown} MB over 240 requests after warm-up"
    want = {"good": 200, "bad_json": 400, "work": 400, "size": 400, "oversized": b"HTTP/1.1 413",
            "short_body": b"HTTP/1.1 408", "no_head": b"", "leaves": None}
    for kind, got in out:
        assert got == want[kind], (kind, got)
    n = {k: sum(1 for kk, _ in out if kk == k) for k in kinds}
    assert took < 120, took  # no disconnecting client's 10 s job ran to its end (6 workers, 36 leave)
    time.sleep(0.5)  # the last cancellations are counted
    after = metrics(port)
    expect = {200: n["good"] + 1, 400: n["bad_json"] + n["work"] + n["size"], 413: n["oversized"],
              408: n["short_body"], 499: n["leaves"], 500: 0, 503: 0, 504: 0, 429: 0}
    for code, count in expect.items():
        assert responses(after, code) - responses(before, code) == count, (code, count, n)
    assert stopped(after, "cancelled") - stopped(before, "cancelled") == n["leaves"]
    lat = "flux_dist_request_latency_seconds_count"
    assert after[(lat, ())] - before[(lat, ())] == n["good"]
    assert call(port, "GET", "/health")[0] == 200
    assert "Traceback" not in full_log(bounded)


def test_sigterm_stops_the_running_request_and_every_rank_exits_0(bounded):
    """Last in the module: it ends the server."""
    got: dict = {}

    def long_call() -> None:
        got["reply"] = call(bounded.port, "POST", GEN, LONG, timeout=60)

    def queued_call() -> None:
        got["queued"] = call(bounded.port, "POST", GEN, {**LONG, "seed": 2}, timeout=60)

    a = threading.Thread(target=long_call)
    a.start()
    time.sleep(1.0)  # the long one runs
    b = threading.Thread(target=queued_call)
    b.start()
    time.sleep(0.3)  # the second one waits in the queue
    t0 = time.monotonic()
    os.kill(bounded.rank_pid(0), signal.SIGTERM)
    a.join(timeout=30)
    b.join(timeout=30)
    code, _, body = got["reply"]
    assert code == 503 and "stopped before denoise step" in json.loads(body)["error"]["message"], body
    assert time.monotonic() - t0 < 5
    code, _, body = got["queued"]
    assert code == 503 and set(json.loads(body)["error"]) == ERROR_KEYS, body
    assert bounded.wait(timeout=60) == [0], full_log(bounded)[-3000:]  # torchrun: every worker exited 0
    assert "Traceback" not in full_log(bounded)
