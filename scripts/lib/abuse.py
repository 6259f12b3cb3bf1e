#!/usr/bin/env python3
"""Load and abuse roles for scripts/bench/soak (Python 3.11, standard library only).

Each role runs as its own process until --until (a Unix time), against the gateway at --url,
and writes what it saw as JSON to --out; the soak script starts them, and `report` reads
everything back, prints the summary and decides pass or fail:

  shop       well-behaved customers: register, sign in, then order (POST /api/v1/orders), pay
             (POST /api/v1/payments) and read the order back, each customer from its own
             X-Forwarded-For address, paced; every answer must be 2xx
  slowloris  many connections that send a request line and headers a byte every few seconds,
             never finishing them; the gateway must cut each within its header-read timeout
  oversized  POSTs of 2-8 MiB bodies (declared or chunked); the answer must be 413 (or the
             connection cut), never 2xx or 5xx
  random     random method tokens and random or mangled paths; the answer must be 4xx, never
             5xx, and nothing the client chose may show up in /metrics
  longid     GETs with X-Request-Id values too long, with odd bytes, or repeated; the id must
             not be echoed, the answer never 5xx
  sample     the platform process's RSS and open descriptors every few seconds, and the
             gateway's /metrics at the end of the warm-up
  report     the summary and the verdict (exit 1 on any failure)

The HTTP/1.1 client here is deliberately minimal (keep-alive, Content-Length or chunked
answers) so that requests can be malformed on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import string
import sys
import time
import urllib.parse
import uuid

# --------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client


class NoAnswer(Exception):
    """The connection ended before a complete answer (reset, closed, timed out)."""

    def __init__(self, kind: str, detail: str = "", started: bool = False):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.started = started


def split_url(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def build_request(method: str, target: str, headers: list[tuple[str, str]], body: bytes | None,
                  host: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + (body or b"")


async def read_answer(reader: asyncio.StreamReader, method: str):
    """(status, headers with lower-case names, body, close?) of one answer."""
    line = await reader.readline()
    if not line:
        raise NoAnswer("closed", "no answer")
    if not line.endswith(b"\n"):
        raise NoAnswer("closed", "partial status line", started=True)
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise NoAnswer("garbled", repr(line[:80]), started=True)
    status = int(parts[1])
    headers: dict[str, str] = {}
    repeated: dict[str, list[str]] = collections.defaultdict(list)
    while True:
        h = await reader.readline()
        if not h:
            raise NoAnswer("closed", "inside headers", started=True)
        if h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = value
        repeated[name].append(value)
    close = "close" in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise NoAnswer("closed", "inside chunked body", started=True)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
        close = True
    headers["__repeated__"] = repeated  # type: ignore[assignment]
    return status, headers, body, close


class Client:
    """One keep-alive connection to the gateway, reopened when the server closes it."""

    def __init__(self, url: str, forwarded_for: str | None = None, timeout: float = 30.0):
        self.host, self.port = split_url(url)
        self.authority = f"{self.host}:{self.port}"
        self.forwarded_for = forwarded_for
        self.timeout = timeout
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def close(self):
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes | None = None, raw: bytes | None = None):
        headers = list(headers or [])
        if self.forwarded_for:
            headers.append(("X-Forwarded-For", self.forwarded_for))
        data = raw if raw is not None else build_request(method, target, headers, body, self.authority)
        for attempt in range(2):
            reused = self.conn is not None
            if not reused:
                try:
                    self.conn = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout)
                except (OSError, asyncio.TimeoutError) as e:
                    raise NoAnswer("connect", str(e) or type(e).__name__) from None
            reader, writer = self.conn
            try:
                writer.write(data)
                await writer.drain()
                status, answer_headers, answer_body, close = await asyncio.wait_for(
                    read_answer(reader, method), self.timeout)
            except asyncio.TimeoutError:
                self.close()
                raise NoAnswer("timeout", f"no answer in {self.timeout:.0f} s") from None
            except NoAnswer as e:
                self.close()
                # A kept-alive connection the server closed while idle: what every client
                # retries once on a fresh connection.
                if reused and attempt == 0 and not e.started:
                    continue
                raise
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                self.close()
                if reused and attempt == 0 and isinstance(e, (ConnectionResetError, BrokenPipeError)):
                    continue
                raise NoAnswer("reset", f"{type(e).__name__}: {e}") from None
            if close:
                self.close()
            return status, answer_headers, answer_body
        raise NoAnswer("closed", "twice")


class Tally:
    """Answers by kind and status, latencies, and the first few surprises."""

    def __init__(self):
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies: list[float] = []
        self.unexpected: list[str] = []
        self.unexpected_count = 0
        self.notes: dict[str, object] = {}

    def add(self, kind: str, outcome: str | int, latency: float | None = None):
        self.counts[kind][str(outcome)] += 1
        if latency is not None:
            self.latencies.append(latency)

    def surprise(self, text: str):
        self.unexpected_count += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(text[:600])

    def dump(self, path: str, **extra):
        lat = sorted(self.latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1000, 2) if lat else None

        doc = {
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": pct(100),
            "unexpected": self.unexpected, "unexpected_count": self.unexpected_count,
            **self.notes, **extra,
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def body_text(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


def left(until: float) -> float:
    return until - time.time()


# --------------------------------------------------------------------------------------------
# shop: well-behaved customers


async def shop(args) -> int:
    tally = Tally()
    run = uuid.uuid4().hex[:8]
    start_gate = asyncio.Event()

    async def customer(i: int):
        client = Client(args.url, f"10.20.{i // 250}.{i % 250 + 1}")
        email, password = f"soak-{run}-{i}@example.com", "a soak customer password"

        async def call(kind, method, target, body=None, token=None, expect=(200, 201), extra=()):
            headers = [("content-type", "application/json")] if body is not None else []
            if token:
                headers.append(("authorization", f"Bearer {token}"))
            headers.extend(extra)
            raw = json.dumps(body).encode() if body is not None else None
            t0 = time.monotonic()
            try:
                status, _, answer = await client.request(method, target, headers, raw)
            except NoAnswer as e:
                tally.add(kind, e.kind)
                tally.surprise(f"{method} {target} (customer {i}): {e}")
                return None, None
            tally.add(kind, status, time.monotonic() - t0)
            if status not in expect:
                tally.surprise(f"{method} {target} (customer {i}): {status} {body_text(answer)}")
            try:
                return status, json.loads(answer) if answer else None
            except ValueError:
                return status, None

        status, _ = await call("register", "POST", "/api/v1/users",
                               {"name": f"Soak Customer {i}", "email": email, "password": password},
                               expect=(201,))
        if status != 201:
            return

        async def sign_in():
            status, doc = await call("sign-in", "POST", "/api/v1/auth/token",
                                     {"email": email, "password": password}, expect=(200,))
            return doc.get("access_token") if status == 200 and doc else None

        token = await sign_in()
        signed_in = time.time()
        if not token:
            return
        await start_gate.wait()
        # Spread the customers over the first period.
        await asyncio.sleep(random.uniform(0, args.period))
        while left(args.until) > 0:
            began = time.monotonic()
            if time.time() - signed_in > 600:  # access tokens last 15 minutes
                token = await sign_in() or token
                signed_in = time.time()
            status, order = await call(
                "order", "POST", "/api/v1/orders",
                {"items": [{"product_id": args.product, "quantity": 1}],
                 "shipping_address": "1 Soak Way"}, token, expect=(201,))
            if status == 201 and order and "id" in order:
                oid = order["id"]
                status, _ = await call(
                    "pay", "POST", "/api/v1/payments",
                    {"order_id": oid, "card_number": "4242 4242 4242 4242"}, token,
                    expect=(201,), extra=[("Idempotency-Key", f"soak-{uuid.uuid4()}")])
                status, read = await call("read-order", "GET", f"/api/v1/orders/{oid}",
                                          token=token, expect=(200,))
                if status == 200 and read:
                    tally.notes.setdefault("order_status_after_pay", collections.Counter())
                    tally.notes["order_status_after_pay"][read.get("status", "?")] += 1
            await asyncio.sleep(max(0.0, args.period - (time.monotonic() - began)))
        client.close()

    tasks = [asyncio.create_task(customer(i)) for i in range(args.customers)]
    await asyncio.sleep(0)
    start_gate.set()
    await asyncio.gather(*tasks)
    tally.dump(args.out, customers=args.customers)
    return 0


# --------------------------------------------------------------------------------------------
# slowloris


async def slowloris(args) -> int:
    host, port = split_url(args.url)
    stats = {
        "opened": 0, "connect_errors": 0, "closed_by_server": 0, "still_open_at_end": 0,
        "answers": collections.Counter(), "lifetimes": [], "held_to_end": [], "bytes_dripped": 0, "open_now": 0,
        "max_open": 0,
    }

    async def one(i: int):
        await asyncio.sleep(i * args.ramp / max(1, args.connections))
        while left(args.until) > 0:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            except (OSError, asyncio.TimeoutError):
                stats["connect_errors"] += 1
                await asyncio.sleep(1)
                continue
            stats["opened"] += 1
            stats["open_now"] += 1
            stats["max_open"] = max(stats["max_open"], stats["open_now"])
            opened = time.monotonic()
            ended_by_server = False
            try:
                writer.write(f"GET /api/v1/products?loris={i} HTTP/1.1\r\nHost: soak\r\n"
                             f"X-Forwarded-For: {args.forwarded_for}\r\nX-Slow: ".encode())
                await writer.drain()
                while left(args.until) > 0:
                    try:
                        data = await asyncio.wait_for(reader.read(4096), args.interval)
                    except asyncio.TimeoutError:
                        data = None
                    if data == b"":
                        ended_by_server = True
                        break
                    if data:
                        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
                        stats["answers"][m.group(1).decode() if m else "garbled"] += 1
                        continue  # then the server closes
                    writer.write(random.choice(string.ascii_letters).encode())
                    await writer.drain()
                    stats["bytes_dripped"] += 1
            except (OSError, asyncio.IncompleteReadError):
                ended_by_server = True
            finally:
                stats["open_now"] -= 1
                writer.close()
            if ended_by_server:
                stats["closed_by_server"] += 1
                stats["lifetimes"].append(time.monotonic() - opened)
            else:
                stats["still_open_at_end"] += 1
                stats["held_to_end"].append(time.monotonic() - opened)

    await asyncio.gather(*(one(i) for i in range(args.connections)))
    lifetimes = sorted(stats.pop("lifetimes"))
    held = stats.pop("held_to_end")
    stats["longest_held_to_end_s"] = round(max(held), 1) if held else 0.0
    stats["answers"] = dict(stats["answers"])
    stats["lifetime_s"] = {
        "min": round(lifetimes[0], 1) if lifetimes else None,
        "p50": round(lifetimes[len(lifetimes) // 2], 1) if lifetimes else None,
        "max": round(lifetimes[-1], 1) if lifetimes else None,
    }
    stats["connections"] = args.connections
    stats["interval_s"] = args.interval
    with open(args.out, "w") as f:
        json.dump(stats, f, indent=1)
    return 0


# --------------------------------------------------------------------------------------------
# oversized bodies


async def register(url: str, forwarded_for: str, label: str) -> str | None:
    client = Client(url, forwarded_for)
    email, password = f"soak-{label}-{uuid.uuid4().hex[:8]}@example.com", "an abusive password"
    try:
        status, _, _ = await client.request(
            "POST", "/api/v1/users", [("content-type", "application/json")],
            json.dumps({"name": "Soak abuser", "email": email, "password": password}).encode())
        if status != 201:
            return None
        status, _, body = await client.request(
            "POST", "/api/v1/auth/token", [("content-type", "application/json")],
            json.dumps({"email": email, "password": password}).encode())
        return json.loads(body)["access_token"] if status == 200 else None
    except (NoAnswer, ValueError, KeyError):
        return None
    finally:
        client.close()


async def oversized(args) -> int:
    tally = Tally()
    host, port = split_url(args.url)
    token = await register(args.url, args.forwarded_for, "oversized")
    tally.notes["signed_in"] = token is not None
    blob = os.urandom(64 * 1024)
    targets = [
        ("POST", "/api/v1/orders", True),
        ("POST", "/api/v1/payments", True),
        ("POST", "/api/v1/users", False),
        ("POST", "/api/v1/auth/token", False),
    ]

    async def one(method: str, path: str, with_token: bool, size: int, chunked: bool) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError):
            return "connect-error"
        head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
                "Content-Type: application/json", f"X-Forwarded-For: {args.forwarded_for}"]
        if with_token and token:
            head.append(f"Authorization: Bearer {token}")
        head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")

        async def send():
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            # A JSON-looking start, then filler.
            sent = 0
            first = b'{"name":"' if not chunked else b'{"name":"'
            pieces = [first]
            while sent < size:
                piece = pieces.pop() if pieces else blob[: min(len(blob), size - sent)]
                if chunked:
                    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                else:
                    writer.write(piece)
                sent += len(piece)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            status, _, body, _ = await asyncio.wait_for(read_answer(reader, method), 30)
            outcome = str(status)
            if status != 413:
                tally.surprise(f"{method} {path} {size} B {'chunked' if chunked else 'declared'}:"
                               f" {status} {body_text(body)}")
        except asyncio.TimeoutError:
            outcome = "timeout"
            tally.surprise(f"{method} {path} {size} B: no answer in 30 s")
        except (NoAnswer, OSError, asyncio.IncompleteReadError, ValueError):
            outcome = "cut-before-answer"
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, OSError):
                pass
            writer.close()
        return outcome

    async def worker(w: int):
        while left(args.until) > 0:
            method, path, with_token = random.choice(targets)
            size = random.randint(2 * 1024 * 1024, 8 * 1024 * 1024)
            chunked = random.random() < 0.3
            t0 = time.monotonic()
            outcome = await one(method, path, with_token, size, chunked)
            tally.add(("chunked " if chunked else "declared ") + path, outcome, time.monotonic() - t0)
            await asyncio.sleep(args.pause)

    await asyncio.gather(*(worker(w) for w in range(args.workers)))
    tally.dump(args.out)
    return 0


# --------------------------------------------------------------------------------------------
# uploads given up half way


async def aborted(args) -> int:
    """Bursts of uploads (bodies under the size limit) whose client goes away mid-body, as a
    phone that loses its signal does; then a probe of each service behind them. The
    gateway must answer the probes as before: a client giving up is not the service failing."""
    tally = Tally()
    host, port = split_url(args.url)
    token = await register(args.url, args.forwarded_for, "aborted")
    tally.notes["signed_in"] = token is not None
    targets = [("/api/v1/users", False, "users", "/.well-known/jwks.json"),
               ("/api/v1/orders", True, "orders", "/api/v1/orders/" + str(uuid.uuid4()))]
    probe = Client(args.url, args.forwarded_for)

    async def check(service: str, probe_path: str, with_token: bool, after: str):
        headers = [("authorization", f"Bearer {token}")] if with_token and token else []
        try:
            status, _, answer = await probe.request("GET", probe_path, headers)
        except NoAnswer as e:
            tally.add(f"probe {service} {after}", e.kind)
            return
        tally.add(f"probe {service} {after}", status)
        if status >= 500:
            tally.surprise(f"{after}: GET {probe_path}: {status} {body_text(answer)}")

    async def one(path: str, with_token: bool, chunked: bool) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError):
            return "connect-error"
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"X-Forwarded-For: {args.forwarded_for}"]
        if with_token and token:
            head.append(f"Authorization: Bearer {token}")
        head.append("Transfer-Encoding: chunked" if chunked else "Content-Length: 200000")
        piece = b'{"name":"' + b"a" * 2000
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode()
                     + (f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece))
        try:
            await writer.drain()
            # An answer before the body ended would be the gateway refusing early: fine too.
            data = await asyncio.wait_for(reader.read(64), args.hold)
            outcome = ("answered " + data.split(b" ")[1].decode()) if data.startswith(b"HTTP/") else "closed"
        except asyncio.TimeoutError:
            outcome = "aborted mid-body"
        except OSError:
            outcome = "cut"
        writer.transport.abort()  # a reset, as when the client's process or network dies
        return outcome

    for _, with_token, service, probe_path in targets:  # how they answer before
        await check(service, probe_path, with_token, "before")
    burst = 0
    while left(args.until) > args.hold + 1:
        path, with_token, service, probe_path = targets[burst % len(targets)]
        chunked = burst % 4 >= 2
        burst += 1
        outcomes = await asyncio.gather(*(one(path, with_token, chunked) for _ in range(args.burst)))
        for outcome in outcomes:
            tally.add(f"{'chunked' if chunked else 'declared'} POST {path}", outcome)
        await asyncio.sleep(0.2)
        await check(service, probe_path, with_token, f"after {args.burst} aborted uploads to {path}")
        await asyncio.sleep(args.pause)
    probe.close()
    tally.dump(args.out, burst=args.burst)
    return 0


# --------------------------------------------------------------------------------------------
# random methods and paths

MARKER = "zzsoak"  # in every random segment: must never appear in /metrics
STANDARD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]
TEMPLATES = [
    "/api/v1/users", "/api/v1/users/me", "/api/v1/users/{id}", "/api/v1/auth/token",
    "/api/v1/auth/logout", "/.well-known/jwks.json", "/api/v1/products", "/api/v1/products/{id}",
    "/api/v1/products/{id}/stock", "/api/v1/orders", "/api/v1/orders/{id}",
    "/api/v1/orders/{id}/status", "/api/v1/orders/user/{id}", "/api/v1/payments",
    "/api/v1/payments/{id}", "/api/v1/payments/{id}/refund", "/api/v1/payments/webhooks/stripe",
    "/api/v1/payments/order/{id}", "/api/v1/notifications", "/api/v1/analytics/windows",
    "/api/v1/analytics/summary", "/api/v1/analytics/top-products", "/api/v1/analytics/stream",
    "/openapi.json",
]
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


def random_token() -> str:
    return "".join(random.choice(TCHAR) for _ in range(random.randint(1, 16)))


def random_segment() -> str:
    kind = random.random()
    if kind < 0.5:
        return MARKER + "".join(random.choice(string.ascii_lowercase + string.digits)
                                for _ in range(random.randint(1, 20)))
    if kind < 0.6:
        return random.choice(["..", ".", "%2e%2e", "%2F", "%00", "%ff%fe", "~", "%20", "%"])
    if kind < 0.7:
        return MARKER + "%" + random.choice(["41", "zz", "e2%82%ac", "c3"])
    return MARKER + "".join(random.choice(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@")
                            for _ in range(random.randint(1, 12)))


def random_id() -> str:
    return random.choice([str(uuid.uuid4()), MARKER + uuid.uuid4().hex[:6], "0", "-1",
                          "9" * 40, "%00", "null", MARKER + "'%20OR%201=1"])


def nowhere() -> str:
    """A path no route matches (the gateway's 404, route label `unmatched`)."""
    kind = random.random()
    if kind < 0.8:
        path = "/" + "/".join(random_segment() for _ in range(random.randint(1, 6)))
    elif kind < 0.95:  # what the gateway must not expose, and near misses
        path = random.choice(["/internal/", "/metrics/", "/ready/", "/health/", "/api/v1/",
                              "/api/v2/products/", "//api/v1/products/", "/api/v1//products/",
                              "/api/v1/products/../users/"]) + random_segment()
    else:  # long
        path = "/" + MARKER + "a" * random.randint(2_000, 12_000)
    return path


def with_query(path: str) -> str:
    if random.random() < 0.3:
        path += "?" + "&".join(f"{random_segment()}={random_segment()}"
                               for _ in range(random.randint(1, 4)))
    return path


# Standard methods on real routes: a fixed set, so that the label combinations they reach in
# /metrics (method, route, status) are all reached during the warm-up.
KNOWN = [
    ("GET", "/api/v1/products/{uuid}"),       # 404
    ("GET", "/api/v1/products/{id}"),         # 400 (not an id) or 404
    ("GET", "/api/v1/orders/{id}"),           # 401
    ("DELETE", "/api/v1/users/{id}"),         # 401
    ("POST", "/api/v1/orders"),               # 401
    ("PUT", "/api/v1/products/{id}"),         # 401
    ("PATCH", "/api/v1/products"),            # 405
    ("OPTIONS", "/api/v1/orders"),            # 405
    ("HEAD", "/api/v1/products/{id}"),        # 405 (HEAD is not routed)
    ("TRACE", "/openapi.json"),               # 405
    ("POST", "/api/v1/payments/webhooks/stripe"),  # the payments service refuses it
]


class Cycle:
    """Items in a shuffled order, every item once per round."""

    def __init__(self, items):
        self.items, self.queue = list(items), []

    def next(self):
        if not self.queue:
            self.queue = random.sample(self.items, len(self.items))
        return self.queue.pop()


async def random_requests(args) -> int:
    tally = Tally()
    methods_seen = collections.Counter()
    templates, known = Cycle(TEMPLATES), Cycle(KNOWN)

    def pick() -> tuple[str, str]:
        roll = random.random()
        if roll < 0.6:  # a method no route has (the `other` label): anywhere
            if random.random() < 0.85:
                method = random_token()
                methods_seen["random token"] += 1
            else:
                method = random.choice(STANDARD).lower()
                methods_seen["lower-case standard"] += 1
            if random.random() < 0.5:
                return method, with_query(templates.next().replace("{id}", random_id()))
            return method, with_query(nowhere())
        methods_seen["standard"] += 1
        if roll < 0.85:
            return random.choice(STANDARD), with_query(nowhere())
        method, template = known.next()
        return method, template.replace("{uuid}", str(uuid.uuid4())).replace("{id}", random_id())

    async def worker(w: int):
        client = Client(args.url, args.forwarded_for, timeout=30)
        while left(args.until) > 0:
            method, path = pick()
            body = None
            headers: list[tuple[str, str]] = []
            if random.random() < 0.3 and (method not in STANDARD or "api/v1" not in path):
                body = os.urandom(random.randint(0, 2_000)) if random.random() < 0.5 else \
                    json.dumps({random_segment(): random_segment()}).encode()
                headers.append(("content-type", random.choice(
                    ["application/json", "text/plain", MARKER + "/" + random_token(),
                     "application/json; charset=utf-16"])))
            t0 = time.monotonic()
            try:
                status, _, answer = await client.request(method, path, headers, body)
            except NoAnswer as e:
                tally.add("answer", e.kind)
                if e.kind == "timeout":
                    tally.surprise(f"{method} {path[:200]}: {e}")
                continue
            tally.add("answer", status, time.monotonic() - t0)
            if status >= 500:
                tally.surprise(f"{method} {path[:300]}: {status} {body_text(answer)}")
            await asyncio.sleep(args.pause)
        client.close()

    await asyncio.gather(*(worker(w) for w in range(args.workers)))
    tally.notes["methods"] = dict(methods_seen)
    tally.dump(args.out, marker=MARKER)
    return 0


# --------------------------------------------------------------------------------------------
# request ids that are too long or odd


async def long_ids(args) -> int:
    tally = Tally()
    id_chars = string.ascii_letters + string.digits + "-_.:"

    def make():
        roll = random.random()
        if roll < 0.5:
            return "too long", ["".join(random.choice(id_chars) for _ in range(random.randint(65, 7_000)))]
        if roll < 0.6:
            return "huge (48-96 KiB)", ["x" * random.randint(48 * 1024, 96 * 1024)]
        if roll < 0.75:
            return "odd characters", [random.choice(["has space", "<script>x</script>", "a\tb", "caf\xe9",
                                                     "%0d%0aSet-Cookie:x", "id\"quoted\"", "{json}", "a/b"])]
        if roll < 0.85:
            return "repeated", ["first-id", "second-id"]
        return "usable (control)", ["".join(random.choice(id_chars) for _ in range(random.randint(1, 64)))]

    async def worker(w: int):
        client = Client(args.url, args.forwarded_for)
        while left(args.until) > 0:
            kind, ids = make()
            headers = [("X-Request-Id", v) for v in ids]
            t0 = time.monotonic()
            try:
                status, answer_headers, answer = await client.request(
                    "GET", f"/api/v1/products/{args.product}", headers)
            except NoAnswer as e:
                tally.add(kind, e.kind)
                if e.kind == "timeout":
                    tally.surprise(f"{kind}: {e}")
                continue
            tally.add(kind, status, time.monotonic() - t0)
            echoed = answer_headers.get("x-request-id")
            if status >= 500:
                tally.surprise(f"{kind} ({len(ids[0])} chars): {status} {body_text(answer)}")
            elif status < 400:
                if kind == "usable (control)":
                    if echoed != ids[0]:
                        tally.surprise(f"usable id {ids[0]!r} not echoed: got {echoed!r}")
                        tally.add(kind, "id not echoed")
                else:
                    if echoed in ids or echoed is None or len(echoed) > 64:
                        tally.surprise(f"{kind}: unusable id echoed or missing: {str(echoed)[:100]!r}")
                        tally.add(kind, "bad id echoed")
                    else:
                        tally.add(kind, "replaced by a fresh id")
            await asyncio.sleep(args.pause)
        client.close()

    await asyncio.gather(*(worker(w) for w in range(args.workers)))
    tally.dump(args.out)
    return 0


# --------------------------------------------------------------------------------------------
# sampling the process


def proc_sample(pid: int) -> tuple[int, int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds, threads
    except (OSError, AttributeError):
        return None


async def fetch_text(url: str, target: str) -> str | None:
    try:
        status, _, body = await Client(url, timeout=20).request("GET", target)
        return body.decode() if status == 200 else None
    except NoAnswer:
        return None


async def sample(args) -> int:
    started = time.time()
    warm_scraped = False
    with open(args.out, "a") as out:
        while True:
            now = time.time()
            got = proc_sample(args.pid)
            if got is None:
                out.write(f"{now - started:.1f} gone\n")
                out.flush()
                return 1
            rss, fds, threads = got
            out.write(f"{now - started:.1f} {rss} {fds} {threads}\n")
            out.flush()
            if not warm_scraped and now - started >= args.warm_at:
                text = await fetch_text(args.ops, "/metrics")
                with open(args.warm_metrics, "w") as f:
                    f.write(text or "")
                warm_scraped = True
            if args.scrape_every and int(now - started) % args.scrape_every < args.every:
                await fetch_text(args.ops, "/metrics")  # what a Prometheus scrape would do
            if now >= args.until:
                return 0
            await asyncio.sleep(min(args.every, max(0.0, args.until - time.time())) or 0.01)


# --------------------------------------------------------------------------------------------
# the report


def read_wrk(path: str) -> dict:
    doc: dict = {"statuses": {}, "errors": {}}
    try:
        text = open(path).read()
    except OSError:
        return {"missing": True, **doc}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "status":
            doc["statuses"][words[1]] = int(words[2])
        elif len(words) == 3 and words[0] == "error":
            doc["errors"][words[1]] = int(words[2])
        elif len(words) == 2 and words[0] in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "requests", "rate", "seconds"):
            doc[words[0]] = float(words[1])
    doc["text"] = text
    return doc


def series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def series_key(line: str) -> str:
    """A series without its value and histogram bucket: one key per label set."""
    name = line.rsplit(" ", 1)[0]
    name = re.sub(r'(,?)le="[^"]*"', "", name).replace("{,", "{").replace(",}", "}").replace("{}", "")
    return re.sub(r"_(bucket|sum|count)\b", "", name)


def load_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def classes(counts: dict[str, int]) -> dict[str, int]:
    out: collections.Counter = collections.Counter()
    for status, n in counts.items():
        out[status[0] + "xx" if status.isdigit() else status] += n
    return dict(sorted(out.items()))


def fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))) or "none"


def report(args) -> int:
    w = args.work
    failures: list[str] = []
    print()
    print(f"==== soak summary: {args.duration} s of well-behaved load and abuse at the same time ====")

    # -- well-behaved reads (wrk)
    reads = read_wrk(f"{w}/reads.wrk")
    print("\n-- well-behaved: reads (wrk, GET /api/v1/products/{id} and /api/v1/products, "
          f"{args.read_addresses} forwarded addresses)")
    if reads.get("missing") or "requests" not in reads:
        failures.append("the well-behaved wrk run left no result")
        print("   no result")
    else:
        total = int(reads["requests"])
        print(f"   requests: {total}  ({reads.get('rate', 0):.0f}/s)   statuses: {fmt_counts(reads['statuses'])}"
              f"   by class: {fmt_counts(classes(reads['statuses']))}")
        print(f"   latency p50: {reads.get('p50_ms')} ms  p90: {reads.get('p90_ms')} ms  p99: {reads.get('p99_ms')} ms"
              f"  max: {reads.get('max_ms')} ms")
        print(f"   socket errors: {fmt_counts({k: v for k, v in reads['errors'].items() if k != 'status'})}")
        bad = {s: n for s, n in reads["statuses"].items() if not s.startswith("2")}
        if bad:
            failures.append(f"well-behaved reads got non-2xx answers: {fmt_counts(bad)}")
        errs = {k: v for k, v in reads["errors"].items() if v and k != "status"}  # status: non-2xx above
        if errs:
            failures.append(f"well-behaved reads had socket errors: {fmt_counts(errs)}")
        if total == 0:
            failures.append("well-behaved reads made no request")

    # -- well-behaved shop (python)
    shop_doc = load_json(f"{w}/shop.json")
    print("\n-- well-behaved: customers (register, sign in, then order, pay, read the order; "
          "each customer its own forwarded address)")
    if not shop_doc:
        failures.append("the customers' client left no result")
        print("   no result")
    else:
        total = 0
        for kind, counts in sorted(shop_doc["counts"].items()):
            total += sum(counts.values())
            print(f"   {kind:<11} {fmt_counts(counts)}")
        print(f"   requests: {total}  latency p50: {shop_doc['p50_ms']} ms  p99: {shop_doc['p99_ms']} ms"
              f"  max: {shop_doc['max_ms']} ms   order status after paying: "
              f"{fmt_counts(shop_doc.get('order_status_after_pay', {}))}")
        paid = shop_doc["counts"].get("pay", {}).get("201", 0)
        if shop_doc["unexpected_count"]:
            failures.append(f"customers got {shop_doc['unexpected_count']} unexpected answers, first: "
                            + " | ".join(shop_doc["unexpected"][:5]))
        if paid == 0:
            failures.append("no customer order was paid")

    # -- abuse
    print("\n-- abuse (each kind from its own forwarded address)")
    flood = read_wrk(f"{w}/flood.wrk")
    if args.no_flood:
        print("   flood: off (SOAK_FLOOD_CONNECTIONS=0)")
    elif flood.get("missing") or "requests" not in flood:
        failures.append("the flood's wrk run left no result")
    else:
        print(f"   flood (wrk max rate, one address): {int(flood['requests'])} requests "
              f"({flood.get('rate', 0):.0f}/s): {fmt_counts(flood['statuses'])}; "
              f"socket errors: {fmt_counts({k: v for k, v in flood['errors'].items() if v and k != 'status'})}")
        limited = flood["statuses"].get("429", 0)
        if limited < 0.5 * max(1, flood["requests"]):
            failures.append(f"the flood was mostly served: 429 for {limited} of {int(flood['requests'])}")
        five = {s: n for s, n in flood["statuses"].items() if s.startswith("5")}
        if five:
            failures.append(f"the flood got 5xx answers: {fmt_counts(five)}")

    loris = load_json(f"{w}/slowloris.json")
    if not loris:
        failures.append("slowloris left no result")
    else:
        print(f"   slowloris ({loris['connections']} connections, a byte every {loris['interval_s']} s): "
              f"opened {loris['opened']}, cut by the server {loris['closed_by_server']}, "
              f"still open at the end {loris['still_open_at_end']}, connect errors {loris['connect_errors']}, "
              f"most open at once {loris['max_open']}, answers {fmt_counts(loris['answers'])}, "
              f"time to the cut s min/p50/max {loris['lifetime_s']['min']}/{loris['lifetime_s']['p50']}/"
              f"{loris['lifetime_s']['max']} (open at the end: for at most {loris['longest_held_to_end_s']} s)")
        if loris["closed_by_server"] == 0:
            failures.append("no slowloris connection was cut by the gateway")
        if max(loris["lifetime_s"]["max"] or 0, loris["longest_held_to_end_s"]) > args.loris_max_lifetime:
            failures.append(f"a slowloris connection stayed open {loris['lifetime_s']['max']} s "
                            f"(bound {args.loris_max_lifetime} s, the header-read timeout is 10 s)")

    for name, title in (("oversized", "oversized bodies (2-8 MiB)"), ("random", "random methods and paths"),
                        ("longid", "unusable request ids"),
                        ("aborted", "uploads given up half way (bursts, then a probe)")):
        doc = load_json(f"{w}/{name}.json")
        if not doc:
            failures.append(f"{name} left no result")
            continue
        total = sum(sum(c.values()) for c in doc["counts"].values())
        timing = f", p50 {doc['p50_ms']} ms, max {doc['max_ms']} ms" if doc["p50_ms"] is not None else ""
        print(f"   {title}: {total} requests{timing}")
        for kind, counts in sorted(doc["counts"].items()):
            print(f"      {kind:<36} {fmt_counts(counts)}")
        if name == "random":
            print(f"      methods: {fmt_counts(doc.get('methods', {}))}")
        all_counts: collections.Counter = collections.Counter()
        for counts in doc["counts"].values():
            all_counts.update(counts)
        five = {s: n for s, n in all_counts.items() if s.startswith("5")}
        if five:
            failures.append(f"{name}: 5xx answers {fmt_counts(five)}: " + " | ".join(doc["unexpected"][:5]))
        if name == "oversized":
            served = {s: n for s, n in all_counts.items() if s.startswith("2")}
            if served:
                failures.append(f"oversized bodies were accepted: {fmt_counts(served)}")
            if all_counts.get("413", 0) == 0:
                failures.append("no oversized body got 413")
            if all_counts.get("timeout"):
                failures.append(f"oversized bodies went unanswered {all_counts['timeout']} times")
        if name == "random":
            if all_counts.get("timeout"):
                failures.append(f"random requests went unanswered {all_counts['timeout']} times: "
                                + " | ".join(doc["unexpected"][:3]))
            served = sum(n for s, n in all_counts.items() if s[0] in "23")
            print(f"      (2xx/3xx: {served}: routes that exist answer them, e.g. OPTIONS or /health)")
        if name == "aborted" and doc["unexpected_count"]:
            failures.append(f"clients giving up uploads made the gateway fail others: "
                            + " | ".join(doc["unexpected"][:3]))
        if name == "longid":
            wrong = all_counts.get("bad id echoed", 0) + all_counts.get("id not echoed", 0)
            if wrong:
                failures.append(f"request ids mishandled {wrong} times: " + " | ".join(doc["unexpected"][:3]))
            if all_counts.get("timeout"):
                failures.append(f"request-id requests went unanswered {all_counts['timeout']} times")
            limited = all_counts.get("429", 0)
            if limited:
                print(f"      note: {limited} answers 429 (the per-address limit)")

    # -- memory and descriptors
    rows = []
    gone = False
    for line in open(f"{w}/samples.txt"):
        words = line.split()
        if len(words) == 2 and words[1] == "gone":
            gone = True
            continue
        if len(words) == 4:
            rows.append((float(words[0]), int(words[1]), int(words[2]), int(words[3])))
    print("\n-- the mercato process, every 5 s")
    print(f"   {'t (s)':>6} {'RSS MiB':>8} {'fds':>6} {'threads':>8}")
    for t, rss, fds, threads in rows:
        print(f"   {t:>6.0f} {rss / 1024:>8.1f} {fds:>6} {threads:>8}")
    if gone:
        failures.append("the mercato process went away during the soak")
    if len(rows) >= 5:
        fifth = args.duration / 5
        warm_rows = [r for r in rows if r[0] <= fifth]
        warm = warm_rows[-1] if warm_rows else rows[0]
        last = [r for r in rows if r[0] >= args.duration - fifth] or rows[-1:]
        last_peak = max(last, key=lambda r: r[1])
        peak = max(rows, key=lambda r: r[1])
        growth = (last_peak[1] - warm[1]) / warm[1]
        print(f"   RSS MiB: start {rows[0][1] / 1024:.1f}, after warm-up (t={warm[0]:.0f} s) {warm[1] / 1024:.1f}, "
              f"peak {peak[1] / 1024:.1f} (t={peak[0]:.0f} s), end {rows[-1][1] / 1024:.1f}; "
              f"last fifth's peak is {growth * 100:+.1f} % over warm-up (bound +{args.rss_growth:.0f} %)")
        print(f"   open fds: start {rows[0][2]}, after warm-up {warm[2]}, peak {max(r[2] for r in rows)}, "
              f"end {rows[-1][2]}")
        # Steady growth: the least-squares slope over the second half of the run, when the
        # warm-up's allocations (password hashing's blocks, kept by idle threads' arenas for a
        # while) have settled. A single step (the allocator keeping a block) is not a trend,
        # hence the rise it must also reach.
        second = [r for r in rows if r[0] >= args.duration / 2]
        slope = 0.0
        if len(second) >= 3:
            mean_t = sum(r[0] for r in second) / len(second)
            mean_m = sum(r[1] / 1024 for r in second) / len(second)
            var = sum((r[0] - mean_t) ** 2 for r in second)
            slope = sum((r[0] - mean_t) * (r[1] / 1024 - mean_m) for r in second) / var * 60 if var else 0.0
        rise = (second[-1][1] - second[0][1]) / 1024 if second else 0.0
        print(f"   second half: {slope:+.1f} MiB/min (least squares), {rise:+.1f} MiB from t={second[0][0]:.0f} s "
              f"to the end (bound: {args.rss_slope:.0f} MiB/min and {args.rss_rise:.0f} MiB)" if second else "")
        if slope > args.rss_slope and rise > args.rss_rise:
            failures.append(f"memory keeps growing: {slope:+.1f} MiB/min over the second half, "
                            f"{rise:+.1f} MiB from t={second[0][0]:.0f} s to the end")
        if growth * 100 > args.rss_growth:
            failures.append(f"memory grew: RSS {warm[1] / 1024:.1f} MiB after warm-up, "
                            f"{last_peak[1] / 1024:.1f} MiB at t={last_peak[0]:.0f} s "
                            f"({growth * 100:+.1f} %, bound +{args.rss_growth:.0f} %)")
        final = rows[-1]
        if args.final_fds is not None:
            print(f"   open fds once the load stopped: {args.final_fds} (warm-up {warm[2]})")
            if args.final_fds > args.fd_slack + rows[0][2]:
                failures.append(f"descriptors leaked: {args.final_fds} open once the load stopped, "
                                f"{rows[0][2]} before it (bound +{args.fd_slack})")
        del final
    else:
        failures.append("too few memory samples")

    # -- metrics
    print("\n-- GET /metrics on the operations listener (series lines)")
    texts = {}
    for when in ("start", "warm", "end"):
        try:
            texts[when] = open(f"{w}/metrics-{when}.txt").read()
        except OSError:
            texts[when] = ""
    counts = {k: len(series(v)) for k, v in texts.items()}
    print(f"   before the load: {counts['start']}, after warm-up: {counts['warm']}, at the end: {counts['end']}"
          f" (growth after warm-up {counts['end'] - counts['warm']:+d}, bound +{args.series_growth})")
    if not texts["end"]:
        failures.append("/metrics could not be read at the end")
    else:
        if texts["warm"] and counts["end"] - counts["warm"] > args.series_growth:
            new = sorted({series_key(s) for s in series(texts["end"])} - {series_key(s) for s in series(texts["warm"])})
            failures.append(f"/metrics grew by {counts['end'] - counts['warm']} series lines after warm-up "
                            f"(bound {args.series_growth}); new: " + "; ".join(new[:15]))
        if MARKER in texts["end"]:
            leaked = [s for s in series(texts["end"]) if MARKER in s][:5]
            failures.append("client-chosen text reached /metrics labels: " + " | ".join(leaked))
        def label_values(text):
            values = collections.defaultdict(set)
            for name, value in re.findall(r'(\w+)="([^"]*)"', "\n".join(series(text))):
                if name != "le":
                    values[name].add(value)
            return values
        before, after = label_values(texts["warm"]), label_values(texts["end"])
        for name in sorted(after):
            fresh = sorted(after[name] - before.get(name, set()))
            if fresh and texts["warm"]:
                print(f"   label values first seen after warm-up: {name}: {', '.join(fresh[:10])}")
        methods = set(re.findall(r'method="([^"]*)"', texts["end"]))
        odd = methods - set(STANDARD) - {"CONNECT", "other"}
        if odd:
            failures.append(f"/metrics has method labels a client chose: {sorted(odd)[:10]}")
        print(f"   method labels: {', '.join(sorted(methods))}")
        routes = sorted(set(re.findall(r'route="([^"]*)"', texts["end"])))
        print(f"   route labels: {len(routes)}")

    # -- the platform's log
    if os.path.exists(f"{w}/err"):
        lines = open(f"{w}/err", errors="replace").read().splitlines()
        levels = collections.Counter()
        for line in lines:
            m = re.search(r'"level":"(\w+)"', line) or re.search(r"\b(WARN|ERROR)\b", line)
            levels[m.group(1).upper() if m else "other"] += 1
        messages = collections.Counter()
        for line in lines:
            m = re.search(r'"message":"([^"]*)"', line)
            messages[m.group(1) if m else line[:120]] += 1
        print(f"\n-- mercato's log (level warn and above): {len(lines)} lines ({fmt_counts(levels)})")
        for message, n in messages.most_common(10):
            print(f"   {n:>7} x {message[:300]}")
        for line in lines[:3]:
            print("   first: " + line[:400])
        opened = sum(n for message, n in messages.items() if "breaker is open" in message)
        if opened:
            failures.append(f"the gateway opened a circuit breaker {opened} times (every client of that "
                            "service got 503 for 2 s)")
    if args.after:
        print(f"\n-- after the load: {args.after}")

    print()
    if failures:
        print(f"SOAK FAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("SOAK PASSED: no 5xx or 429 to well-behaved clients, abuse answered as expected, "
          "memory and /metrics bounded")
    return 0


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)

    def role(name, **defaults):
        p = sub.add_parser(name)
        p.add_argument("--url", required=name not in ("report", "sample"))
        p.add_argument("--until", type=float, required=name != "report")
        p.add_argument("--out", required=name != "report")
        p.add_argument("--forwarded-for", default=defaults.pop("forwarded_for", None))
        for key, value in defaults.items():
            p.add_argument("--" + key.replace("_", "-"), type=type(value) if value is not None else str,
                           default=value)
        return p

    role("shop", product="", customers=8, period=1.0)
    role("slowloris", forwarded_for="10.66.0.1", connections=600, interval=3.0, ramp=5.0)
    role("oversized", forwarded_for="10.77.0.1", workers=2, pause=0.3)
    role("random", forwarded_for="10.88.0.1", workers=4, pause=0.08)
    role("aborted", forwarded_for="10.33.0.1", burst=6, hold=0.3, pause=4.0)
    role("longid", forwarded_for="10.55.0.1", product="", workers=2, pause=0.1)
    role("sample", pid=0, every=5.0, warm_at=0.0, ops="", warm_metrics="", scrape_every=0)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--duration", type=int, required=True)
    r.add_argument("--read-addresses", type=int, default=50)
    r.add_argument("--rss-growth", type=float, default=25.0)
    r.add_argument("--rss-slope", type=float, default=10.0)
    r.add_argument("--rss-rise", type=float, default=8.0)
    r.add_argument("--series-growth", type=int, default=40)
    r.add_argument("--loris-max-lifetime", type=float, default=30.0)
    r.add_argument("--final-fds", type=int)
    r.add_argument("--fd-slack", type=int, default=200)
    r.add_argument("--after", default="")
    r.add_argument("--no-flood", action="store_true")
    args = parser.parse_args()
    if args.role == "report":
        return report(args)
    handler = {"shop": shop, "slowloris": slowloris, "oversized": oversized, "random": random_requests, "aborted": aborted,
               "longid": long_ids, "sample": sample}[args.role]
    return asyncio.run(handler(args))


if __name__ == "__main__":
    sys.exit(main())
